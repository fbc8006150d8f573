import io

import pytest
import torch

from conftest import STORIES260K, asset
from llama import Llama, load_pretrained
from lora import (ALL_TARGETS, LoRALinear, inject_lora, is_adapter, lora_layers, lora_state_dict, merge_lora,
                  unmerge_lora)
from hf import to_rotate_half
from bench.oracle import to_transformers


def randomize_adapters(model):
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)  # B starts at zero; make the adapters do something


def test_matches_peft_on_the_same_weights_and_adapters(tiny_model):
    from peft import LoraConfig, get_peft_model

    hf = to_transformers(tiny_model)  # the base weights, before any adapter
    inject_lora(tiny_model, ("wq", "wv"), rank=4, alpha=8.0)
    randomize_adapters(tiny_model)
    peft_model = get_peft_model(hf, LoraConfig(r=4, lora_alpha=8.0, target_modules=["q_proj", "v_proj"],
                                               lora_dropout=0.0)).eval()
    n_heads = tiny_model.config.n_heads
    with torch.no_grad():
        for i, layer in enumerate(tiny_model.layers):
            attn = peft_model.base_model.model.model.layers[i].self_attn
            attn.q_proj.lora_A["default"].weight.copy_(layer.attention.wq.lora_A)
            attn.q_proj.lora_B["default"].weight.copy_(to_rotate_half(layer.attention.wq.lora_B, n_heads))
            attn.v_proj.lora_A["default"].weight.copy_(layer.attention.wv.lora_A)
            attn.v_proj.lora_B["default"].weight.copy_(layer.attention.wv.lora_B)
        tokens = torch.randint(0, 97, (2, 11))
        ours, _ = tiny_model(tokens, all_logits=True)
        theirs = peft_model(tokens).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    assert tiny_model(tokens)[0].abs().sum() > 0


def test_fresh_adapters_leave_the_model_unchanged(tiny_model):
    tokens = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        before, _ = tiny_model(tokens)
        inject_lora(tiny_model, ALL_TARGETS, rank=2, alpha=4.0)
        after, _ = tiny_model(tokens)
    assert torch.equal(before, after)


def test_merge_and_unmerge(tiny_model):
    base_wq = tiny_model.layers[0].attention.wq.weight.detach().clone()
    inject_lora(tiny_model, ("wq", "wk", "wv", "wo"), rank=4, alpha=1.0)
    randomize_adapters(tiny_model)
    tokens = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        unmerged, _ = tiny_model(tokens, all_logits=True)
        merge_lora(tiny_model)
        merged, _ = tiny_model(tokens, all_logits=True)
        merge_lora(tiny_model)  # merging twice must not add the update twice
        assert torch.allclose(tiny_model(tokens, all_logits=True)[0], merged)
        unmerge_lora(tiny_model)
    assert torch.allclose(merged, unmerged, atol=1e-5)
    assert torch.allclose(tiny_model.layers[0].attention.wq.weight, base_wq, atol=1e-6)


def test_adapters_on_16_bit_weights_stay_apart_so_that_no_update_is_rounded_away(tiny_model):
    tiny_model.to(torch.bfloat16)
    base_wq = tiny_model.layers[0].attention.wq.weight.detach().clone()
    inject_lora(tiny_model, ("wq", "wv"), rank=4, alpha=1.0)
    for layer in lora_layers(tiny_model):  # an update the size lr 1e-4 makes: below the bf16 weights' step
        torch.nn.init.normal_(layer.lora_B, std=1e-4)
    tokens = torch.randint(0, 97, (2, 9))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # as a --dtype bf16 run computes
        unmerged, _ = tiny_model(tokens, all_logits=True)
        merge_lora(tiny_model)
        after, _ = tiny_model(tokens, all_logits=True)
    assert torch.equal(after, unmerged)
    assert torch.equal(tiny_model.layers[0].attention.wq.weight, base_wq)


def test_only_adapters_train_and_the_checkpoint_names_stay():
    model = load_pretrained(asset(STORIES260K))
    names_before = set(model.state_dict())
    inject_lora(model, rank=4, alpha=1.0)
    assert all(not layer.weight.requires_grad for layer in model.modules() if isinstance(layer, LoRALinear))
    for p in model.parameters():
        p.requires_grad = False
    for p in lora_state_dict(model).values():
        assert not p.requires_grad  # a detached copy, safe to save
    for name, p in model.named_parameters():
        p.requires_grad = is_adapter(name)
    assert names_before <= set(model.state_dict())  # base weights keep their names: a base checkpoint loads
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable < 0.05 * sum(p.numel() for p in model.parameters())

    adapter, full = io.BytesIO(), io.BytesIO()
    torch.save(lora_state_dict(model), adapter)
    torch.save(model.state_dict(), full)
    assert adapter.tell() < 0.05 * full.tell()


def test_adapter_state_dict_round_trips(tiny_model):
    inject_lora(tiny_model, rank=2, alpha=2.0)
    randomize_adapters(tiny_model)
    saved = lora_state_dict(tiny_model)
    assert all(k.endswith(("lora_A", "lora_B")) for k in saved) and len(saved) == 4 * tiny_model.config.n_layers
    fresh = Llama(tiny_model.config).eval()
    fresh.load_state_dict({k: v for k, v in tiny_model.state_dict().items() if k not in saved})
    inject_lora(fresh, rank=2, alpha=2.0)
    fresh.load_state_dict(saved, strict=False)
    tokens = torch.randint(0, 97, (1, 6))
    with torch.no_grad():
        assert torch.equal(fresh(tokens)[0], tiny_model(tokens)[0])


def test_unknown_targets_are_refused(tiny_model):
    with pytest.raises(ValueError, match="no nn.Linear"):
        inject_lora(tiny_model, ("query",))


def test_lora_linear_gradients_reach_only_the_adapter():
    base = torch.nn.Linear(6, 5)
    layer = LoRALinear(base, rank=2, alpha=2.0)
    layer(torch.randn(3, 6)).sum().backward()
    assert base.weight.grad is None and layer.weight.grad is None
    assert layer.lora_B.grad is not None and layer.lora_B.grad.abs().sum() > 0
