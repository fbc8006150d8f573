"""The weights laid out for generating text (`--option generate`), with int8 as an option (`--quantize int8`),
and the timed generation that the CLI and bench.py share.

Decoding one token reads every weight matrix once and does two flops per weight, so its speed is the speed of
reading the weights. Two things make that reading faster:
- Layout. nn.Linear keeps a weight as (out, in) and multiplies by its transpose; for a single row of input,
  MKL's product with the weight stored (in, out) reads it about 1.5x faster on this project's CPUs (measured:
  a stories42M token's products take 20-22 ms against 29-34 ms, the 32000 x 512 output matrix 5.4-6.3 ms
  against 11-14 ms). TransposedLinear stores it that way: the same numbers, the same memory.
- Size. Int8Linear keeps each row (one output feature) as int8 with one scale, W[i] ~ scale[i] * q[i] with q in
  [-127, 127], so every weight is off by at most half a step, scale[i] / 2 = max|W[i]| / 254: a quarter of
  the bytes. Activations stay floating point. On the CPU the products run in PyTorch's int8-weight kernel,
  which takes bf16 activations (fp32 ones take it 4x longer, measured). The kernel gives wrong sums, or crashes,
  when a row's length is not a multiple of its vector block (torch 2.13 on AVX2: 172 and 100 fail, multiples of
  8 pass), so it only gets rows of a multiple of 32. Elsewhere, and on other devices, the rows are dequantized
  to the activations' dtype for each product: slower, never different.
The token embeddings read their rows from the output matrix's new form when the two are tied (stored once).
"""
import time
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from llama import Llama


class TransposedLinear(nn.Module):
    """A bias-free linear layer for inference whose weight is stored (in, out)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.register_buffer("weight_t", weight.detach().t().contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight_t

    def rows(self, indices: torch.Tensor) -> torch.Tensor:
        """Rows of the (out, in) weight, as an embedding table reads them."""
        return self.weight_t.t()[indices]


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight (out, in) -> int8 q (out, in) and scale (out,) in bf16 with weight ~ scale[:, None] * q.

    The scale is rounded to bf16 first, since that is how the CPU kernel reads it, and q is computed against
    the rounded scale: the rounding then costs nothing beyond the half step."""
    weight = weight.detach().float()
    scale = (weight.abs().amax(dim=1) / 127).clamp(min=1e-12).to(torch.bfloat16)
    q = torch.round(weight / scale.float()[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


class Int8Linear(nn.Module):
    """A bias-free linear layer for inference, its weight (out, in) in int8 with one scale per output row."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        q, scale = quantize_rows(weight)
        self.register_buffer("weight", q)
        self.register_buffer("scale", scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and self.in_features % 32 == 0:
            flat = x.reshape(-1, self.in_features).to(torch.bfloat16)
            out = torch._weight_int8pack_mm(flat, self.weight, self.scale)  # (rows, out) bf16
            return out.view(*x.shape[:-1], self.out_features).to(x.dtype)
        # the rows scaled first: an int8 product scaled afterwards can pass fp16's 65504 where the model's never does
        return F.linear(x, self.weight.to(x.dtype) * self.scale[:, None].to(x.dtype))

    def rows(self, indices: torch.Tensor) -> torch.Tensor:
        return self.weight[indices].float() * self.scale[indices, None].float()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-row scales"


class TableEmbedding(nn.Module):
    """Token embeddings read from the rows of a TransposedLinear or an Int8Linear."""

    def __init__(self, table: nn.Module):
        super().__init__()
        self.table = table

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.table.rows(tokens)


def prepare_for_decoding(model: Llama, quantize: Optional[str] = None) -> Llama:
    """Replace, in place, every nn.Linear of the model (all bias-free) by a TransposedLinear, or by an Int8Linear
    with quantize="int8", and the token embeddings by rows of the output matrix's new form (or of their own, when
    untied). Each float matrix is freed once replaced. The model is for inference only from then on."""
    if quantize not in (None, "int8"):
        raise ValueError(f"quantize must be None or 'int8', got {quantize!r}")
    kind = Int8Linear if quantize == "int8" else TransposedLinear
    embeddings = None if model.tied_embeddings else model.tok_embeddings.weight
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear):
            model.set_submodule(name, kind(module.weight))
    model.tok_embeddings = TableEmbedding(model.output if embeddings is None else kind(embeddings))
    return model


def timed_generation(llama: Llama, idx: torch.Tensor, max_new_tokens: int, temperature: float,
                     top_k: Optional[int] = None, top_p: Optional[float] = None) -> tuple[torch.Tensor, int, float]:
    """The prompt and its continuation, and the decoding steps' count and seconds: the clock starts once the
    first new token (the prefill's) exists."""
    tokens, start = [idx], None
    for token in llama.new_tokens(idx, max_new_tokens, temperature, top_k=top_k, top_p=top_p):
        tokens.append(token)
        if start is None:
            token.cpu()  # waits for the device: the prefill is over
            start = time.perf_counter()
    out = torch.cat(tokens, dim=1).cpu()
    return out, max(0, len(tokens) - 2), time.perf_counter() - start if start else 0.0


def weight_megabytes(model: nn.Module) -> float:
    tensors = {t.data_ptr(): t for t in [*model.parameters(), *model.buffers()]}  # a tied matrix counts once
    return sum(t.numel() * t.element_size() for t in tensors.values()) / 1e6
