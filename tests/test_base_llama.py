import math

import torch

from conftest import tiny_config
from llama import Llama


def test_initialisation_scales_the_residual_projections_down():
    torch.manual_seed(0)
    config = tiny_config(dim=256, n_heads=4, n_kv_heads=4, n_layers=8)
    model = Llama(config)
    residual_std = 0.02 / math.sqrt(2 * config.n_layers)
    for name, param in model.named_parameters():
        if name.endswith(("wo.weight", "w3.weight")):
            assert abs(param.std().item() - residual_std) < 0.15 * residual_std, name
        elif name.endswith(("wq.weight", "w1.weight", "output.weight")):
            assert abs(param.std().item() - 0.02) < 0.1 * 0.02, name


def test_a_tied_matrix_counts_once():
    tied, untied = Llama(tiny_config()), Llama(tiny_config(), tied_embeddings=False)
    config = tiny_config()
    assert untied.num_parameters() - tied.num_parameters() == config.vocab_size * config.dim
