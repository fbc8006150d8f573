import contextlib

import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels import Bf16ProductsInFp32Kernels, row_blocks


def bf16_product_and_grad(x: torch.Tensor, weight: torch.Tensor, fp32_kernels: bool):
    x = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16), \
            (Bf16ProductsInFp32Kernels() if fp32_kernels else contextlib.nullcontext()):
        out = F.linear(x, weight)
    out.backward(torch.linspace(-1, 1, out.numel()).view_as(out).bfloat16())
    return out, x.grad


@pytest.mark.parametrize("block_rows", [None, 7])  # one block, or several (a big matrix's way)
def test_fp32_kernels_give_the_bf16_kernels_products_and_gradients(block_rows, monkeypatch):
    torch.manual_seed(0)
    weight, x = torch.randn(30, 40).bfloat16(), torch.randn(3, 5, 40)
    if block_rows:
        monkeypatch.setattr(kernels, "row_blocks", lambda weight: row_blocks(weight, block_rows * weight.shape[1]))
    out, grad = bf16_product_and_grad(x, weight, fp32_kernels=True)
    expected_out, expected_grad = bf16_product_and_grad(x, weight, fp32_kernels=False)
    assert out.dtype == torch.bfloat16 and grad.dtype == torch.float32
    # the same exact products summed in fp32, in another order: at most one bf16 rounding step apart
    torch.testing.assert_close(out, expected_out, rtol=2 ** -8, atol=0)
    torch.testing.assert_close(grad, expected_grad, rtol=2 ** -8, atol=0)


def test_fp32_kernels_keep_no_fp32_copy_of_a_weight_and_leave_trained_weights_to_autocast(monkeypatch):
    weight = torch.randn(64, 32).bfloat16()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        bf16_product_and_grad(torch.randn(4, 32), weight, fp32_kernels=True)
    assert [t.dtype for t in saved if t.numel() == weight.numel()] == [torch.bfloat16]

    taken = []
    apply = kernels.Bf16Product.apply
    monkeypatch.setattr(kernels.Bf16Product, "apply", lambda *args: taken.append(args[1]) or apply(*args))
    trained = weight.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16), Bf16ProductsInFp32Kernels():
        F.linear(torch.randn(4, 32), trained)
        assert taken == []
        with torch.no_grad():  # no gradient to make (classify of a fully fine-tuned model held in bf16): taken
            F.linear(torch.randn(4, 32), trained)
    assert len(taken) == 1 and taken[0] is trained


def plain_rms_norm(x, weight, eps):
    x_float = x.float()
    return (x_float * torch.rsqrt(x_float.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * weight


def saved_bytes(fn, *inputs):
    """The bytes autograd keeps for the backward pass of fn(*inputs), each tensor counted once."""
    saved = {}
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.setdefault(t.data_ptr(), t.nbytes) and t,
                                                  lambda t: t):
        fn(*inputs)
    return sum(saved.values())


def values_and_grads(fn, *inputs):
    inputs = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
    out = fn(*inputs)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype))
    return [out] + [t.grad for t in inputs if t.requires_grad]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weight_trains", [True, False])
def test_rms_norm_gives_autograds_values_and_gradients_keeping_only_its_input(dtype, weight_trains):
    torch.manual_seed(0)
    x = (torch.randn(3, 5, 64) * 3).to(dtype).requires_grad_()
    weight = (1 + torch.randn(64) / 10).to(dtype).requires_grad_(weight_trains)
    ours = values_and_grads(lambda a, w: kernels.rms_norm(a, w, 1e-5), x, weight)
    plain = values_and_grads(lambda a, w: plain_rms_norm(a, w, 1e-5), x, weight)
    assert torch.equal(ours[0], plain[0])
    for a, b in zip(ours[1:], plain[1:]):
        torch.testing.assert_close(a, b, rtol=1e-5 if dtype == torch.float32 else 1.6e-2, atol=1e-6)
    kept = x.nbytes + weight.nbytes + 3 * 5 * 4  # and one float32 per row
    assert saved_bytes(lambda: kernels.rms_norm(x, weight, 1e-5)) == kept
    # autograd keeps a float32 copy of a bf16 input, and the normalised rows where the weight trains
    extra = x.numel() * 2 * (dtype == torch.bfloat16) + x.numel() * x.element_size() * weight_trains
    assert saved_bytes(lambda: plain_rms_norm(x, weight, 1e-5)) == kept + extra


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_gives_autograds_values_and_gradients_to_the_bit_keeping_only_its_inputs(dtype):
    torch.manual_seed(0)
    gate, up = (torch.randn(2, 7, 96).to(dtype).requires_grad_() for _ in range(2))
    ours = values_and_grads(kernels.swiglu, gate, up)
    plain = values_and_grads(lambda g, u: F.silu(g) * u, gate, up)
    assert all(torch.equal(a, b) for a, b in zip(ours, plain))
    assert saved_bytes(lambda: kernels.swiglu(gate, up)) == gate.nbytes + up.nbytes
    assert saved_bytes(lambda: F.silu(gate) * up) == 3 * gate.nbytes
