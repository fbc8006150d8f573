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
