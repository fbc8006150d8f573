"""Operations whose plain PyTorch form costs more than it must: products with a weight held in 16 bits where the
CPU has no kernel for them that runs at full speed, and the two of a Llama layer that autograd makes keep more for
the backward pass than its gradients need.

Without AVX512-BF16 or AMX, PyTorch's bf16 products fall back to a generic kernel (measured on an AVX2 EPYC: one
(256 x 2048) x (2048 x 5632) product takes 0.5 s forward and 21 s backward, against 0.16 and 0.15 s here).
Bf16ProductsInFp32Kernels computes them in fp32 kernels instead and gives what a bf16 kernel gives: a bf16 value is
exact in fp32, so is the product of two, and a bf16 kernel sums in fp32 too, so the outputs, rounded to bf16, are
the bf16 kernel's up to the order of the sums. The weights stay bf16: a block of a weight's rows is made fp32 for its
product alone, and the backward pass keeps the bf16 weight, never an fp32 copy.

rms_norm and swiglu give autograd's values and gradients (the same operations), keeping only their inputs: autograd
keeps RMSNorm's float32 copy of the input and its normalised output beside it, and SwiGLU's silu(gate) beside gate
and up. Of what a bf16 Llama-2-7B layer keeps for a token (about 150 KB), that is 54 KB, measured.
"""
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

BLOCK = 1 << 24  # elements of a weight converted at a time: 64 MB of fp32 (one block for every matrix of stories42M)


def cpu_has_bf16_matmul() -> bool:
    """Whether bf16 matrix products run natively on this CPU. Without AVX512-BF16 or AMX, PyTorch falls back
    to a generic kernel (measured on an AVX2-only CPU: 1.7 GFLOP/s in bf16 against 90 in fp32)."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def row_blocks(weight: torch.Tensor, elements: int = BLOCK) -> list[slice]:
    """The weight's rows in blocks of at most `elements`."""
    rows = max(1, elements // weight.shape[1])
    return [slice(start, start + rows) for start in range(0, weight.shape[0], rows)]


class Bf16ProductsInFp32Kernels(TorchFunctionMode):
    """Within it, every product (F.linear: nn.Linear, LoRA's base layer) with a bf16 weight on the CPU that gets no
    gradient runs in fp32 kernels (see the top). Other products, a trained weight's among them, are left as they are."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, weight = args[:2]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            trained = torch.is_grad_enabled() and (weight.requires_grad or bias is not None and bias.requires_grad)
            if weight.dtype == torch.bfloat16 and weight.device.type == "cpu" and not trained:
                return Bf16Product.apply(x, weight, bias)
        return func(*args, **kwargs)


class Bf16Product(torch.autograd.Function):
    """x W^T + b for a frozen bf16 weight W, a block of W's rows at a time (a 32000-row output matrix in fp32 would
    be a quarter of a GB); bf16 out, as autocast's product."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        ctx.save_for_backward(weight)
        ctx.x_dtype = x.dtype
        x = x.to(torch.bfloat16).float()  # autocast would round x to bf16 first
        with torch.autocast("cpu", enabled=False):
            blocks = [x @ weight[rows].float().t() for rows in row_blocks(weight)]
            out = blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=-1)
            if bias is not None:
                out = out + bias.float()
        return out.to(torch.bfloat16)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        weight, = ctx.saved_tensors
        grad = grad.float()
        x_grad = sum(grad[..., rows] @ weight[rows].float() for rows in row_blocks(weight))
        return x_grad.to(torch.bfloat16).to(ctx.x_dtype), None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * weight, normalised in float32 (the mean of squares loses too much in half
    precision), the product in x's dtype."""
    return RMSNormFunction.apply(x, weight, eps)


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x_float = x.float()
        inverse_rms = torch.rsqrt(x_float.pow(2).mean(-1, keepdim=True) + eps)  # (..., 1)
        ctx.save_for_backward(x, weight, inverse_rms)
        return (x_float * inverse_rms).type_as(x) * weight

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], None]:
        x, weight, inverse_rms = ctx.saved_tensors
        x_float = x.float()
        weight_grad = None
        if ctx.needs_input_grad[1]:
            weight_grad = (grad * (x_float * inverse_rms).type_as(x)).sum_to_size(weight.shape)
        normed_grad = (grad * weight).float()
        # through x * r and through r = rsqrt(mean(x^2) + eps), whose gradient is -r^3 x / n
        rms_grad = (normed_grad * x_float).sum(-1, keepdim=True) * (-0.5 * inverse_rms.pow(3)) / x.shape[-1]
        x_grad = normed_grad * inverse_rms + rms_grad * 2 * x_float
        return x_grad.type_as(x), weight_grad, None


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up."""
    return SwiGLUFunction.apply(gate, up)


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate, up = ctx.saved_tensors
        return torch.ops.aten.silu_backward(grad * up, gate), grad * F.silu(gate)
