"""LoRA (Hu et al., 2021): freeze a linear layer's weight W and learn a low-rank update,
y = x W^T + (alpha / rank) * x A^T B^T, with A (rank, in) random and B (out, rank) zero, so training starts
from the base model exactly. Works on any module tree of nn.Linear layers, chosen by name."""
import math
import sys
from typing import Iterable, Union

import torch
import torch.nn.functional as F
from torch import nn

from quantized import QuantizedLinear
from settings import LoRASettings

ATTENTION_TARGETS = ("wq", "wk", "wv", "wo")
ALL_TARGETS = ATTENTION_TARGETS + ("w1", "w2", "w3")
DEFAULT_TARGETS = ("wq", "wv")


class LoRALinear(nn.Linear):
    """An nn.Linear with the same (frozen) weight under the same name, plus lora_A and lora_B, so a base
    checkpoint loads into it and a merged one is a plain base checkpoint again. Above a quantized layer (QLoRA) it
    holds that layer as `frozen` and no weight of its own, until dequantize_base."""

    def __init__(self, base: Union[nn.Linear, QuantizedLinear], rank: int, alpha: float, dropout: float = 0.0):
        super().__init__(base.in_features, base.out_features, bias=getattr(base, "bias", None) is not None,
                         device="meta")
        quantized = isinstance(base, QuantizedLinear)
        self.frozen = base if quantized else None
        self.weight = None if quantized else base.weight
        self.bias = None if quantized else base.bias
        for param in (self.weight, self.bias):
            if param is not None:
                param.requires_grad_(False)
        self.rank = rank
        self.scaling = alpha / rank
        # fp32 at least: under a bf16 or fp16 run the frozen weight is held in it, but what trains keeps fp32 masters
        held = base.dtype if quantized else base.weight.dtype
        device = next(base.buffers()).device if quantized else base.weight.device
        factory = dict(device=device, dtype=torch.promote_types(held, torch.float32))
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, **factory))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear initialises, and PEFT
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias) if self.frozen is None else self.frozen(x)
        if self.merged:
            return out
        # scale the rank-r intermediate, not the (.., out_features) update: the same product, less work
        return out + F.linear(F.linear(self.lora_dropout(x), self.lora_A) * self.scaling, self.lora_B)

    @torch.no_grad()
    def merge(self) -> None:
        # fp32 weights only: W + BA rounded to bf16 or fp16 would lose the update where it is below the weight's
        # rounding step, as a LoRA update mostly is (a weight of 0.02 has a bf16 step of 1.2e-4). A quantized
        # weight is merged by dequantize_base.
        if not self.merged and self.weight is not None and self.weight.dtype == torch.float32:
            self.weight += (self.lora_B @ self.lora_A) * self.scaling
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.weight -= (self.lora_B @ self.lora_A) * self.scaling
            self.merged = False

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, scaling={self.scaling:g}"


def inject_lora(model: nn.Module, targets: Iterable[str] = DEFAULT_TARGETS, rank: int = 4, alpha: float = 1.0,
                dropout: float = 0.0) -> list[str]:
    """Replace every nn.Linear (or quantized frozen layer) whose attribute name is in targets by a LoRALinear;
    return their full names."""
    targets = set(targets)
    chosen = [(name, module) for name, module in model.named_modules()
              if isinstance(module, (nn.Linear, QuantizedLinear)) and not isinstance(module, LoRALinear)
              and name.rsplit(".", 1)[-1] in targets]
    if not chosen:
        raise ValueError(f"no nn.Linear named any of {sorted(targets)} in the model")
    for name, module in chosen:
        model.set_submodule(name, LoRALinear(module, rank, alpha, dropout))
    return [name for name, _ in chosen]


def train_adapters(model: nn.Module, base: nn.Module, lora: LoRASettings, also_trained: str = "") -> None:
    """Put adapters on base (a part of model) and train them alone, with model's parameters whose names start with
    also_trained (a classifier's head) if given: the base stays frozen."""
    adapted = inject_lora(base, lora.targets, lora.rank, lora.alpha, lora.dropout)
    for name, param in model.named_parameters():
        param.requires_grad = is_adapter(name) or bool(also_trained) and name.startswith(also_trained)
    print(f"LoRA rank {lora.rank} on {len(adapted)} layers ({', '.join(lora.targets)})")
    warn_if_adapters_outgrow(base, adapted, lora.rank)


def warn_if_adapters_outgrow(model: nn.Module, adapted: list[str], rank: int) -> None:
    """A rank beyond a matrix's smaller side buys nothing: the adapter then holds more numbers than the matrix."""
    for name in dict.fromkeys(name.rsplit(".", 1)[-1] for name in adapted):
        layer = next(model.get_submodule(full) for full in adapted if full.endswith("." + name))
        if rank > min(layer.in_features, layer.out_features):
            ratio = rank * (layer.in_features + layer.out_features) / (layer.in_features * layer.out_features)
            print(f"warning: --lora_rank {rank} exceeds {name}'s smaller side ({layer.out_features} x "
                  f"{layer.in_features}): its adapter is {ratio:.1f}x the size of the matrix it adapts",
                  file=sys.stderr)


def is_adapter(parameter_name: str) -> bool:
    return parameter_name.rsplit(".", 1)[-1] in ("lora_A", "lora_B")


def lora_layers(model: nn.Module) -> list[LoRALinear]:
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def merge_lora(model: nn.Module) -> None:
    """Fold every adapter into its weight, where the weight is fp32: inference then costs exactly what the base
    model costs. An adapter on a bf16 or fp16 weight stays apart (see LoRALinear.merge), a small product more."""
    for layer in lora_layers(model):
        layer.merge()


@torch.no_grad()
def dequantize_base(model: nn.Module, dtype: torch.dtype) -> None:
    """Turn every quantized frozen layer into a plain one holding its dequantized weight in dtype, the adapters
    above one merged into it in fp32 first (in bf16 they would be lost, see LoRALinear.merge): what an export and
    decoding read. One layer at a time, so only one fp32 matrix is held beside the model."""
    for layer in lora_layers(model):
        if layer.frozen is not None:
            layer.weight = nn.Parameter(layer.frozen.dequantize(torch.float32), requires_grad=False)
            layer.frozen = None
            layer.merge()
            layer.weight.data = layer.weight.data.to(dtype)
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantizedLinear):
            model.set_submodule(name, module.as_linear(dtype))


def unmerge_lora(model: nn.Module) -> None:
    for layer in lora_layers(model):
        layer.unmerge()


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters alone: lora_A and lora_B of every LoRALinear, a few kilobytes."""
    return {name: p.detach().clone() for name, p in model.named_parameters() if is_adapter(name)}
