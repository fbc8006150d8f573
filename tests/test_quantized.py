"""Quantized frozen layers (QLoRA): NF4 against QLoRA's published levels and torchao's NF4Tensor, its round-trip
error bounds, products whose backward pass keeps no dequantized weight, LoRA above an nf4 base against LoRA above
the same weights in bf16, and loading that quantizes each matrix."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import quantized
from conftest import STORIES260K, asset, tiny_config
from llama import Llama, load_pretrained
from lora import LoRALinear, dequantize_base, inject_lora, lora_layers
from quantized import NF4_BLOCK, NF4_LEVELS, SCALE_GROUP, Int8RowsLinear, NF4Linear, QuantizedLinear, quantize_nf4

# QLoRA (Dettmers et al., 2023), Appendix E: the NF4 data type
PUBLISHED_LEVELS = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                    0.7229568362236023, 1.0]


def test_nf4_levels_are_qloras_published_ones():
    assert torch.allclose(NF4_LEVELS, torch.tensor(PUBLISHED_LEVELS), atol=1e-6, rtol=0)


def test_nf4_codes_scales_and_dequantized_weights_equal_torchaos(monkeypatch):
    nf4_tensor = pytest.importorskip("torchao.quantization.quantize_.workflows.nf4.nf4_tensor")
    torch.manual_seed(0)
    weight = torch.randn(256, 512) * 0.02
    theirs = nf4_tensor.to_nf4(weight, NF4_BLOCK, SCALE_GROUP)
    monkeypatch.setattr(quantized, "NF4_LEVELS", theirs.nf4.clone())  # theirs are rounded to 4 decimals
    ours = NF4Linear(weight, torch.float32)
    assert torch.equal(ours.codes, theirs.quantized_data)
    assert torch.equal(ours.scale_codes, theirs.quantized_scalers)
    assert torch.equal(ours.dequantize(torch.float32), theirs.get_original_weight())


@pytest.mark.parametrize("shape", [(256, 512), (172, 64), (5, 50)])  # whole groups; a part group; a part block
def test_nf4_round_trip_error_is_within_its_bounds_and_below_a_uniform_4_bit_grids(shape):
    torch.manual_seed(1)
    weight = torch.randn(shape) * 0.02
    layer = NF4Linear(weight, torch.float32)
    error = (layer.dequantize(torch.float32) - weight).flatten()
    blocks = F.pad(weight.flatten(), (0, -weight.numel() % NF4_BLOCK)).view(-1, NF4_BLOCK)
    absmax = blocks.abs().amax(dim=1)
    # nearest level: half the widest gap; the double-quantized scale: one int8 step of its group at most
    half_gap = (NF4_LEVELS[1:] - NF4_LEVELS[:-1]).max() / 2
    scale_step = (1 / layer.scale_factors).repeat_interleave(SCALE_GROUP)[:absmax.numel()]
    bound = (absmax * half_gap + scale_step).repeat_interleave(NF4_BLOCK)[:weight.numel()]
    assert (error.abs() <= bound * (1 + 1e-5)).all()
    # normal weights: NF4 is the better 4-bit grid (the paper's claim), and about 9% of their spread off
    uniform = (blocks / absmax[:, None] * 7).round() / 7 * absmax[:, None]
    uniform_error = (uniform.flatten()[:weight.numel()] - weight.flatten()).pow(2).mean().sqrt()
    assert error.pow(2).mean().sqrt() < 0.1 * weight.std()
    if weight.numel() > 1000:
        assert error.pow(2).mean().sqrt() < 0.9 * uniform_error


def test_nf4_holds_about_4_13_bits_a_weight():
    parts = quantize_nf4(torch.randn(1024, 1024))
    bits = sum(t.numel() * t.element_size() * 8 for t in parts.values())
    assert 4.12 < bits / (1024 * 1024) < 4.14


def test_int8_rows_are_within_half_a_step():
    torch.manual_seed(2)
    weight = torch.randn(48, 64)
    layer = Int8RowsLinear(weight, torch.float32)
    assert ((layer.dequantize(torch.float32) - weight).abs() <= layer.scale.float()[:, None] / 2 + 1e-6).all()


@pytest.mark.parametrize("kind", [NF4Linear, Int8RowsLinear])
def test_the_product_and_its_input_gradient_are_those_of_the_dequantized_weight(kind):
    torch.manual_seed(3)
    layer = kind(torch.randn(96, 64), torch.float64)
    x = torch.randn(2, 5, 64, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,))
    assert torch.equal(layer(x), F.linear(x, layer.dequantize(torch.float64)))


@pytest.mark.parametrize("kind", [NF4Linear, Int8RowsLinear])
def test_layers_of_any_size_share_the_products_buffer_and_each_gets_its_own_weight(kind):
    """Every product dequantizes into one buffer: a larger layer after a smaller one grows it, a smaller one after
    a larger one reads only its own part, and the backward pass dequantizes again after the other layers' forward."""
    torch.manual_seed(5)
    layers = [kind(torch.randn(shape) * 0.02, torch.float32) for shape in [(40, 24), (300, 40), (40, 300), (7, 40)]]
    x = torch.randn(3, 24, requires_grad=True)
    plain = x.detach().clone().requires_grad_()
    y, z = x, plain
    for layer in layers:
        y, z = layer(y), F.linear(z, layer.dequantize(torch.float32))
    y.sum().backward()
    z.sum().backward()
    assert torch.equal(y, z) and torch.equal(x.grad, plain.grad)
    assert layers[0].product_weight().data_ptr() == layers[1].product_weight().data_ptr()


def test_the_backward_pass_keeps_no_dequantized_weight():
    """What autograd saves during the forward pass of a quantized model: activations, never a (out, in) matrix."""
    torch.manual_seed(4)
    model = Llama(tiny_config(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96, max_seq_len=16))
    for name, module in list(model.named_modules()):
        if name.startswith("layers.") and isinstance(module, nn.Linear):
            model.set_submodule(name, NF4Linear(module.weight, torch.float32))
    inject_lora(model, ("wq", "wv"), rank=4)
    matrices = {(m.out_features, m.in_features) for m in model.modules() if isinstance(m, QuantizedLinear)}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        loss = model(torch.randint(0, 96, (1, 3)))[0].float().sum()
    loss.backward()
    assert saved and not matrices & {s[-2:] for s in saved if len(s) == 2}
    assert all(layer.lora_A.grad is not None for layer in lora_layers(model))


def test_lora_above_an_nf4_base_is_lora_above_its_dequantized_weights_in_bf16():
    torch.manual_seed(5)
    base = Llama(tiny_config(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96, max_seq_len=16))
    quantized_model, plain = base.to(torch.bfloat16), copy.deepcopy(base.to(torch.bfloat16))
    for name, module in list(quantized_model.named_modules()):
        if name.startswith("layers.") and isinstance(module, nn.Linear):
            layer = NF4Linear(module.weight, torch.bfloat16)
            quantized_model.set_submodule(name, layer)
            plain.get_submodule(name).weight.data = layer.dequantize(torch.float32).to(torch.bfloat16)
    losses, grads = [], []
    tokens = torch.randint(0, 96, (2, 12))
    for model in (quantized_model, plain):
        torch.manual_seed(6)
        inject_lora(model, ("wq", "wv", "w2"), rank=4)
        for layer in lora_layers(model):
            nn.init.normal_(layer.lora_B, std=0.05)  # a trained-looking update, so the adapters' path counts
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(tokens, all_logits=True)[0].float().flatten(0, 1), tokens.flatten())
        loss.backward()
        losses.append(loss.item())
        grads.append(torch.cat([p.grad.flatten() for name, p in model.named_parameters() if "lora_" in name]))
    assert losses[0] == pytest.approx(losses[1], rel=1e-2)
    assert torch.allclose(grads[0], grads[1], rtol=0.05, atol=0.05 * grads[1].abs().max().item())


def test_dequantize_base_merges_the_adapters_in_fp32_and_leaves_plain_layers():
    torch.manual_seed(7)
    model = load_pretrained(asset(STORIES260K), torch.float32, "nf4")
    inject_lora(model, ("wq",), rank=2)
    for layer in lora_layers(model):
        nn.init.normal_(layer.lora_B, std=0.1)
    tokens = torch.randint(0, 512, (1, 8))
    with torch.no_grad():
        before = model(tokens, all_logits=True)[0]
        dequantize_base(model, torch.float32)
        after = model(tokens, all_logits=True)[0]
    assert not any(isinstance(m, QuantizedLinear) for m in model.modules())
    assert all(isinstance(layer, LoRALinear) and layer.merged for layer in lora_layers(model))
    assert torch.allclose(before, after, atol=1e-5)


def test_loading_quantizes_every_layer_matrix_and_nothing_else():
    plain = load_pretrained(asset(STORIES260K))
    model = load_pretrained(asset(STORIES260K), torch.float32, "nf4")
    layers = {name for name, m in model.named_modules() if isinstance(m, NF4Linear)}
    assert layers == {name for name, m in plain.named_modules() if name.startswith("layers.")
                      and isinstance(m, nn.Linear)}
    assert model.num_parameters() == plain.num_parameters()
    for name in layers:
        plain.get_submodule(name).weight.data = model.get_submodule(name).dequantize(torch.float32)
    tokens = torch.randint(0, 512, (2, 10))
    with torch.no_grad():
        assert torch.allclose(model(tokens, all_logits=True)[0], plain(tokens, all_logits=True)[0], atol=1e-5)


def test_loading_returns_each_matrixs_temporaries_to_the_system(monkeypatch):
    # glibc keeps freed pages in its heap: without a trim after each matrix, a 7B nf4 base peaked 2.7 GB above its
    # quantized weights (6.5 GB against 4.0 GB, measured)
    import llama
    trims = []
    monkeypatch.setattr(llama, "return_free_memory", lambda: trims.append(len(trims)))
    model = load_pretrained(asset(STORIES260K), torch.float32, "nf4")
    assert len(trims) == sum(isinstance(m, NF4Linear) for m in model.modules()) == 5 * 7
