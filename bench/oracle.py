"""Our weights in transformers' Llama: the oracle that the tests and bench/run.py compare against. transformers is a
test and benchmark extra (./setup.sh --test), never a dependency of the model or the CLI, neither of which
imports this module. The names and the rotary layout are hf.py's, the ones an export writes."""
import torch

from config import LlamaConfig
from hf import hf_config, hf_weights
from llama import Llama


def transformers_config(config: LlamaConfig, tied: bool = True, **extra):
    from transformers import LlamaConfig as HFConfig

    fields = {k: v for k, v in hf_config(config, tied).items() if k not in ("model_type", "architectures")}
    return HFConfig(**{**fields, **extra})


def transformers_weights(model: Llama) -> dict[str, torch.Tensor]:
    """Our state dict under transformers' names (LlamaModel's, without the "model." prefix)."""
    weights = hf_weights(model.state_dict(), model.config, tied=True)
    return {name.removeprefix("model."): tensor.clone() for name, tensor in weights.items()}


def to_transformers(model: Llama, attn_implementation: str = "eager"):
    """transformers' LlamaForCausalLM with the same weights."""
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM(transformers_config(model.config, model.tied_embeddings,
                                              attn_implementation=attn_implementation))
    weights = hf_weights(model.state_dict(), model.config, tied=False)
    hf.load_state_dict({name: tensor.clone() for name, tensor in weights.items()}, strict=True)
    return hf.eval()
