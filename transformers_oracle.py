"""Our weights in transformers' Llama: the oracle that the tests and bench.py compare against. transformers is a
test and benchmark extra (./setup.sh --test), never a dependency of the model or the CLI, neither of which
imports this module."""
import torch

from config import LlamaConfig
from llama import Llama


def rotate_half_layout(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """wq/wk rows in llama2.c's interleaved-pair RoPE order -> transformers' rotate-half order: within each
    head, the even components first, then the odd ones."""
    out_features, in_features = weight.shape
    head_dim = out_features // n_heads
    return weight.view(n_heads, head_dim // 2, 2, in_features).transpose(1, 2).reshape(out_features, in_features)


def transformers_config(config: LlamaConfig, tied: bool = True, **extra):
    from transformers import LlamaConfig as HFConfig

    return HFConfig(vocab_size=config.vocab_size, hidden_size=config.dim, intermediate_size=config.hidden_dim,
                    num_hidden_layers=config.n_layers, num_attention_heads=config.n_heads,
                    num_key_value_heads=config.n_kv_heads, max_position_embeddings=config.max_seq_len,
                    rms_norm_eps=config.norm_eps, tie_word_embeddings=tied,
                    rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta}, **extra)


def transformers_weights(model: Llama) -> dict[str, torch.Tensor]:
    """Our state dict under transformers' names (LlamaModel's, without the "model." prefix)."""
    c = model.config
    weights = {"embed_tokens.weight": model.tok_embeddings.weight, "norm.weight": model.norm.weight}
    for i, layer in enumerate(model.layers):
        a, f, p = layer.attention, layer.feed_forward, f"layers.{i}."
        weights.update({
            p + "self_attn.q_proj.weight": rotate_half_layout(a.wq.weight, c.n_heads),
            p + "self_attn.k_proj.weight": rotate_half_layout(a.wk.weight, c.n_kv_heads),
            p + "self_attn.v_proj.weight": a.wv.weight, p + "self_attn.o_proj.weight": a.wo.weight,
            p + "mlp.gate_proj.weight": f.w1.weight, p + "mlp.up_proj.weight": f.w3.weight,
            p + "mlp.down_proj.weight": f.w2.weight, p + "input_layernorm.weight": layer.attention_norm.weight,
            p + "post_attention_layernorm.weight": layer.ffn_norm.weight,
        })
    return {k: v.detach().clone() for k, v in weights.items()}


def to_transformers(model: Llama, attn_implementation: str = "eager"):
    """transformers' LlamaForCausalLM with the same weights."""
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM(transformers_config(model.config, model.tied_embeddings,
                                              attn_implementation=attn_implementation))
    weights = {"model." + k: v for k, v in transformers_weights(model).items()}
    weights["lm_head.weight"] = model.output.weight.detach().clone()
    hf.load_state_dict(weights, strict=True)
    return hf.eval()
