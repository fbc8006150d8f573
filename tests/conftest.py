"""Shared fixtures: where setup.sh put the assets, tiny configs, and the transformers oracle."""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from config import LlamaConfig  # noqa: E402
from llama import Llama  # noqa: E402


def asset(name: str) -> str:
    """A file that setup.sh puts at the repo root (from ../shared/assets or the public sources)."""
    path = os.path.join(ROOT, name)
    if not os.path.exists(path):
        pytest.fail(f"{name} is missing: run ./setup.sh --mirror ../shared/assets --test first")
    return path


STORIES260K = "stories260K.pt"
TOK512 = "tok512.model"


def tiny_config(**overrides) -> LlamaConfig:
    """Small enough to run in milliseconds, with grouped-query attention and an odd hidden size."""
    settings = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, multiple_of=8, max_seq_len=64)
    settings.update(overrides)
    return LlamaConfig(**settings)


@pytest.fixture
def tiny_model() -> Llama:
    torch.manual_seed(0)
    return Llama(tiny_config()).eval()


def rotate_half_layout(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """wq/wk rows in llama2.c's interleaved-pair RoPE order -> transformers' rotate-half order: within each
    head, the even components first, then the odd ones."""
    out_features, in_features = weight.shape
    head_dim = out_features // n_heads
    return weight.view(n_heads, head_dim // 2, 2, in_features).transpose(1, 2).reshape(out_features, in_features)


def to_transformers(model: Llama):
    """transformers' LlamaForCausalLM with the same weights: the independent oracle."""
    from transformers import LlamaConfig as HFConfig, LlamaForCausalLM

    c = model.config
    hf = LlamaForCausalLM(HFConfig(
        vocab_size=c.vocab_size, hidden_size=c.dim, intermediate_size=c.hidden_dim, num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads, max_position_embeddings=c.max_seq_len,
        rms_norm_eps=c.norm_eps, rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
        tie_word_embeddings=model.tied_embeddings, attn_implementation="eager"))
    weights = {"model.embed_tokens.weight": model.tok_embeddings.weight, "model.norm.weight": model.norm.weight,
               "lm_head.weight": model.output.weight}
    for i, layer in enumerate(model.layers):
        a, f, p = layer.attention, layer.feed_forward, f"model.layers.{i}."
        weights.update({
            p + "self_attn.q_proj.weight": rotate_half_layout(a.wq.weight, c.n_heads),
            p + "self_attn.k_proj.weight": rotate_half_layout(a.wk.weight, c.n_kv_heads),
            p + "self_attn.v_proj.weight": a.wv.weight, p + "self_attn.o_proj.weight": a.wo.weight,
            p + "mlp.gate_proj.weight": f.w1.weight, p + "mlp.up_proj.weight": f.w3.weight,
            p + "mlp.down_proj.weight": f.w2.weight,
            p + "input_layernorm.weight": layer.attention_norm.weight,
            p + "post_attention_layernorm.weight": layer.ffn_norm.weight,
        })
    hf.load_state_dict({k: v.detach().clone() for k, v in weights.items()}, strict=True)
    return hf.eval()
