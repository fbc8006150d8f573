"""llama2.c's files through load_pretrained: .pt and .bin, their naming variants, and what is refused."""
import os
import struct

import pytest
import torch

from conftest import STORIES260K, asset, tiny_config
from llama import Llama, load_pretrained
from utils import UsageError


def test_pt_and_bin_exports_give_identical_logits():
    pt, bin_ = load_pretrained(asset("stories260K.pt")), load_pretrained(asset("stories260K.bin"))
    tokens = torch.randint(0, 512, (2, 30))
    with torch.no_grad():
        assert torch.equal(pt(tokens, all_logits=True)[0], bin_(tokens, all_logits=True)[0])
    assert pt.config.hidden_dim == bin_.config.hidden_dim == 172


def save_checkpoint(tmp_path, state_dict, model_args, name="model.pt"):
    path = os.path.join(tmp_path, name)
    torch.save({"model": state_dict, "model_args": model_args, "iter_num": 0}, path)
    return path


def test_loads_assignment_names_and_compile_prefix(tmp_path, tiny_model):
    renames = {"wq": "compute_query", "wk": "compute_key", "wv": "compute_value", "wo": "compute_output"}
    state = {}
    for name, tensor in tiny_model.state_dict().items():
        parts = [renames.get(p, p) for p in name.split(".")]
        state["_orig_mod." + ".".join(parts)] = tensor
    args = {k: getattr(tiny_model.config, k) for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size",
                                                         "multiple_of", "max_seq_len")}
    loaded = load_pretrained(save_checkpoint(tmp_path, state, args)).eval()
    tokens = torch.randint(0, 97, (2, 8))
    with torch.no_grad():
        assert torch.equal(loaded(tokens)[0], tiny_model(tokens)[0])
    assert loaded.tied_embeddings


@pytest.mark.parametrize("corrupt, message", [
    (lambda s: s.pop("layers.1.attention.wk.weight"), "missing"),
    (lambda s: s.__setitem__("layers.0.extra.weight", torch.zeros(3)), "unexpected"),
    (lambda s: s.__setitem__("norm.weight", torch.ones(31)), "shape"),
])
def test_strict_loading_refuses_mismatched_tensors(tmp_path, tiny_model, corrupt, message):
    state = dict(tiny_model.state_dict())
    corrupt(state)
    args = {"dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 97, "multiple_of": 8}
    with pytest.raises(UsageError, match=message):
        load_pretrained(save_checkpoint(tmp_path, state, args))


def test_untied_bin_export_loads_its_own_output_matrix(tmp_path):
    torch.manual_seed(0)
    model = Llama(tiny_config(), tied_embeddings=False).eval()
    c = model.config
    tensors = [model.tok_embeddings.weight]
    for name in ("attention_norm", "attention.wq", "attention.wk", "attention.wv", "attention.wo", "ffn_norm",
                 "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"):
        tensors += [layer.get_submodule(name).weight for layer in model.layers]
    tensors += [model.norm.weight, model.freqs_cis.real, model.freqs_cis.imag, model.output.weight]
    path = os.path.join(tmp_path, "untied.bin")
    with open(path, "wb") as f:
        f.write(struct.pack("7i", c.dim, c.hidden_dim, c.n_layers, c.n_heads, c.n_kv_heads, -c.vocab_size,
                            c.max_seq_len))
        for t in tensors:
            f.write(t.detach().float().numpy().tobytes())
    loaded = load_pretrained(path).eval()
    assert not loaded.tied_embeddings
    tokens = torch.randint(0, 97, (1, 7))
    with torch.no_grad():
        assert torch.equal(loaded(tokens)[0], model(tokens)[0])


def test_loads_torch_s_old_non_zip_format(tmp_path):
    path = os.path.join(tmp_path, "old.pt")
    torch.save(torch.load(asset(STORIES260K)), path, _use_new_zipfile_serialization=False)  # cannot be mmapped
    tokens = torch.randint(0, 512, (1, 9))
    with torch.no_grad():
        assert torch.equal(load_pretrained(path)(tokens)[0], load_pretrained(asset(STORIES260K))(tokens)[0])
