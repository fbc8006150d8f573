"""Frozen linear layers held quantized, so that adapters can train above a base model too large to hold in bf16
(QLoRA, Dettmers et al., 2023): `--option lora --quantize nf4|int8`.

- NF4, 4-bit NormalFloat. Each block of 64 consecutive weights is divided by its largest magnitude, which brings it
  into [-1, 1], and each weight is kept as the nearest of 16 levels. The levels are quantiles of the standard normal
  distribution, so normally distributed weights use each level about equally often. Two levels fit in one byte.
- Double quantization. One fp32 scale per block would cost 0.5 bit a weight. The scales are quantized again: their
  mean is subtracted, and each group of 256 is kept as int8 with one fp32 factor. That costs 0.127 bit a weight, so
  NF4 holds 4.13 bits a weight. This is the layout of torchao's NF4Tensor, which the tests compare against.
- Int8: one bf16 scale per output row, as decoding.py's Int8Linear (8.0 bits a weight).

llama.load_pretrained quantizes each matrix as it is read, so the base is never held in full precision. The
forward pass dequantizes a layer's weight for its one product and drops it. The backward pass dequantizes it
again: keeping each layer's dequantized weight until the backward pass would hold the bf16 model again. Every
product dequantizes into one buffer that all layers share: a new 90 MB tensor for each matrix spent most of its
time in page faults (the kernel zeroes every new page), 4x the lookup itself.
"""
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from kernels import BLOCK, row_blocks

NF4_BLOCK = 64  # weights per absmax scale
SCALE_GROUP = 256  # scales per int8 factor of the double quantization
PAIR_AS_INTEGER = {2: torch.int32, 4: torch.int64}  # two levels of a bf16/fp16 or fp32 weight as one integer
LOOKUP_CHUNK = 1 << 20  # codes widened to int32 at a time for the lookup: 4 MB, not a second copy of the matrix


def nf4_levels() -> torch.Tensor:
    """The 16 NF4 levels in [-1, 1]: 8 quantiles of the standard normal distribution above zero, 7 below, and an
    exact zero. Both sides reach 1, so the outermost quantile probability is the mean of 1 - 1/(2 * 16) and
    1 - 1/(2 * 15): 0.9677."""
    outermost = (1 - 1 / 32 + 1 - 1 / 30) / 2
    positive = torch.special.ndtri(torch.linspace(outermost, 0.5, 9, dtype=torch.float64)[:-1])
    negative = -torch.special.ndtri(torch.linspace(outermost, 0.5, 8, dtype=torch.float64)[:-1])
    levels = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive]).sort().values
    return (levels / levels.max()).float()


NF4_LEVELS = nf4_levels()


def quantize_rows(weight: Union[torch.Tensor, list[torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """weight (out, in), or matrices stacked by rows -> int8 q (out, in) and scale (out,) in bf16 with
    weight ~ scale[:, None] * q.

    The scale is rounded to bf16 first, since that is how the CPU kernel reads it, and q is computed against
    the rounded scale: the rounding then costs nothing beyond the half step. A block of rows at a time, and stacked
    matrices one by one: the few float temporaries of a block are all that converting adds to the weights. A block
    is 1 MB of fp32, which stays in the core's cache through its passes, worked in place (3.9x faster than 16 MB
    blocks with a new tensor a pass, measured on an 11008 x 4096 matrix)."""
    parts = weight if isinstance(weight, list) else [weight]
    out_features, device = sum(part.shape[0] for part in parts), parts[0].device
    q = torch.empty(out_features, parts[0].shape[1], dtype=torch.int8, device=device)
    scale = torch.empty(out_features, dtype=torch.bfloat16, device=device)
    start = 0
    for part in parts:
        for rows in row_blocks(part, 1 << 18):
            block = part[rows].detach().to(torch.float32, copy=True)  # worked in place: never the weight itself
            out = slice(start + rows.start, start + min(rows.stop, part.shape[0]))
            scale[out] = block_scale = (block.abs().amax(dim=1) / 127).clamp_(min=1e-12).to(torch.bfloat16)
            q[out] = block.div_(block_scale.float()[:, None]).round_().clamp_(-127, 127)
        start += part.shape[0]
    return q, scale


def quantize_nf4(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """A weight's NF4 form: codes (two 4-bit level indices a byte, the first in the high half), and the double-
    quantized block scales (scale_codes int8, scale_factors fp32 per group of 256, scale_mean). The weight is
    flattened and padded with zeros to whole blocks and groups; a row of blocks at a time bounds the temporaries."""
    flat = weight.detach().reshape(-1)
    n_blocks = -(-flat.numel() // NF4_BLOCK)
    n_groups = -(-n_blocks // SCALE_GROUP)
    absmax = torch.zeros(n_groups * SCALE_GROUP, device=weight.device)
    codes = torch.empty(n_groups * SCALE_GROUP * NF4_BLOCK // 2, dtype=torch.uint8, device=weight.device)
    boundaries = ((NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2).tolist()  # nearest level: below the midpoint
    step = BLOCK // 4 // NF4_BLOCK * NF4_BLOCK
    for start in range(0, n_groups * SCALE_GROUP * NF4_BLOCK, step):
        chunk = flat[start:start + step].float()
        chunk = F.pad(chunk, (0, min(step, n_groups * SCALE_GROUP * NF4_BLOCK - start) - chunk.numel()))
        blocks = chunk.view(-1, NF4_BLOCK)  # (blocks, 64)
        first = start // NF4_BLOCK
        absmax[first:first + blocks.shape[0]] = block_absmax = blocks.abs().amax(dim=1)
        scaled = blocks / block_absmax.clamp(min=1e-30)[:, None]
        # the level's index is the count of midpoints below the weight: 15 comparisons take 0.4x bucketize's time
        level = torch.zeros_like(scaled, dtype=torch.uint8)
        for boundary in boundaries:
            level += scaled > boundary
        codes[start // 2:(start + chunk.numel()) // 2] = (level[:, 0::2] << 4 | level[:, 1::2]).flatten()
    # the padding's scales are left out of the mean, then set to it: they quantize to 0 and change no factor
    scale_mean = absmax[:n_blocks].mean()
    centered = absmax - scale_mean
    centered[n_blocks:] = 0
    groups = centered.view(n_groups, SCALE_GROUP)
    scale_factors = SCALE_GROUP / 2 / groups.abs().amax(dim=1).clamp(min=1e-30)  # int8 steps per unit of scale
    scale_codes = (groups * scale_factors[:, None]).round().clamp(-128, 127).to(torch.int8).flatten()
    return dict(codes=codes, scale_codes=scale_codes, scale_factors=scale_factors, scale_mean=scale_mean)


class QuantizedLinear(nn.Module):
    """A frozen bias-free linear layer (out, in) whose weight is stored quantized; its products take the weight
    dequantized to `dtype`. Subclasses store the weight and say how to dequantize it."""

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.dtype = dtype

    def dequantize(self, dtype: torch.dtype, buffer: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The weight (out, in) in dtype: written into buffer (1-D, at least stored_weights long) or a new tensor."""
        if buffer is None:
            buffer = torch.empty(self.stored_weights, dtype=dtype, device=self.device)
        flat = buffer[:self.stored_weights]
        self.dequantize_into(flat)
        return flat[:self.out_features * self.in_features].view(self.out_features, self.in_features)

    @property
    def device(self) -> torch.device:
        return next(self.buffers()).device

    @property
    def stored_weights(self) -> int:
        """How many weights the stored form holds, padding included."""
        return self.out_features * self.in_features

    def dequantize_into(self, flat: torch.Tensor) -> None:
        raise NotImplementedError

    def product_weight(self) -> torch.Tensor:
        """The weight in the products' dtype, in the buffer that every layer's products share: valid until the next
        layer's product asks for its own."""
        key = (self.device, self.dtype)
        if key not in _PRODUCT_BUFFERS or _PRODUCT_BUFFERS[key].numel() < self.stored_weights:
            _PRODUCT_BUFFERS.pop(key, None)  # the smaller one goes before the larger one is made
            _PRODUCT_BUFFERS[key] = torch.empty(self.stored_weights, dtype=self.dtype, device=self.device)
        return self.dequantize(self.dtype, _PRODUCT_BUFFERS[key])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _DequantizedProduct.apply(x, self)

    def as_linear(self, dtype: torch.dtype) -> nn.Linear:
        """A plain frozen nn.Linear of the dequantized weight, held in dtype: for an export or for decoding."""
        linear = nn.Linear(self.in_features, self.out_features, bias=False, device="meta")
        linear.weight = nn.Parameter(self.dequantize(torch.float32).to(dtype), requires_grad=False)
        return linear

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, products in {self.dtype}"


_PRODUCT_BUFFERS: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


class _DequantizedProduct(torch.autograd.Function):
    """x @ W^T with W dequantized in the forward pass and again in the backward pass, never kept in between. W is
    frozen: only x gets a gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: QuantizedLinear) -> torch.Tensor:
        ctx.layer, ctx.x_dtype = layer, x.dtype
        return F.linear(x.to(layer.dtype), layer.product_weight())

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        layer = ctx.layer
        return F.linear(grad.to(layer.dtype), layer.product_weight().t()).to(ctx.x_dtype), None


class NF4Linear(QuantizedLinear):
    """NF4 with double-quantized scales (see the top): 4.13 bits a weight."""

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype):
        super().__init__(weight, dtype)
        for name, tensor in quantize_nf4(weight).items():
            self.register_buffer(name, tensor, persistent=False)

    def level_pairs(self, dtype: torch.dtype) -> torch.Tensor:
        """(256, 2): the two levels that each byte of codes holds, high half first."""
        levels = NF4_LEVELS.to(self.codes.device, dtype)
        return torch.stack([levels.repeat_interleave(16), levels.repeat(16)], dim=1)

    @property
    def stored_weights(self) -> int:
        return self.codes.numel() * 2

    def dequantize_into(self, flat: torch.Tensor) -> None:
        # One lookup gives both levels of a byte, then one pass scales them: the fewest passes over the weight. Read
        # as one integer, the two levels are a 1-D lookup, 3x faster than gathering rows of two.
        pairs, out = self.level_pairs(flat.dtype), flat.view(-1, 2)
        if flat.element_size() in PAIR_AS_INTEGER:
            pair = PAIR_AS_INTEGER[flat.element_size()]
            pairs, out = pairs.view(pair).view(-1), flat.view(pair)
        index = torch.empty(min(LOOKUP_CHUNK, self.codes.numel()), dtype=torch.int32, device=self.device)
        for start in range(0, self.codes.numel(), LOOKUP_CHUNK):
            codes = self.codes[start:start + LOOKUP_CHUNK]
            torch.index_select(pairs, 0, index[:codes.numel()].copy_(codes), out=out[start:start + codes.numel()])
        scales = (self.scale_codes.view(-1, SCALE_GROUP) / self.scale_factors[:, None]).flatten() + self.scale_mean
        flat.view(-1, NF4_BLOCK).mul_(scales.to(flat.dtype)[:, None])


class Int8RowsLinear(QuantizedLinear):
    """int8 with one bf16 scale per output row (quantize_rows): 8 bits a weight."""

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype):
        super().__init__(weight, dtype)
        q, scale = quantize_rows(weight)
        self.register_buffer("q", q, persistent=False)
        self.register_buffer("scale", scale, persistent=False)

    def dequantize_into(self, flat: torch.Tensor) -> None:
        flat.view_as(self.q).copy_(self.q).mul_(self.scale.to(flat.dtype)[:, None])


QUANTIZED_LAYERS = {"nf4": NF4Linear, "int8": Int8RowsLinear}


def quantized_weights(model: nn.Module) -> int:
    """How many weights the model's quantized layers hold (they are buffers, not parameters)."""
    return sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, QuantizedLinear))
