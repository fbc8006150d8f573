"""python -m bench.int8_kernels [--shape 1b|7b] [--threads N]: the one-row products PyTorch offers for int8 weights,
beside the bf16 product that --dtype bf16 decodes with, on each matrix shape of a layer (and the output head). Every
candidate runs over enough copies of a matrix (200 MB) that none of them sits in the cache, as in decoding, and is
given as GB/s of int8 weight bytes read (bf16's as bf16 bytes), beside the machine's read bandwidth. It is the evidence
for why `--quantize int8` decodes with torch._weight_int8pack_mm:
  pack     torch._weight_int8pack_mm, bf16 row, int8 (out, in) weights, bf16 row scales: what Int8Linear runs
  int_mm   torch._int_mm, the row quantized to int8 too (W8A8: not weight-only, so it changes the numerics)
  int_mm2  the same with two int8 rows (a bf16 row as high and low int8 digits, to stay weight-only)
  blocked  an inductor-compiled product over weights laid out 16 output rows at a time (out/16, in, 16)
"""
import argparse
import time
from typing import Callable

import torch

from bench.big import SHAPES, read_bandwidth
from decoding import without_onednn

COPY_BYTES = 200e6
REPEATS = 5


def layer_shapes(shape: dict) -> list[tuple[int, int]]:
    """(out, in) of each product of a decoding step, once each: wq (= wo), wk (= wv), w1 (= w3), w2, the output head."""
    dim, hidden = shape["hidden_size"], shape["intermediate_size"]
    kv = dim * shape["num_key_value_heads"] // shape["num_attention_heads"]
    return list(dict.fromkeys([(dim, dim), (kv, dim), (hidden, dim), (dim, hidden), (shape["vocab_size"], dim)]))


def blocked_product(x: torch.Tensor, blocks: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # x (in,) float32, blocks (out/16, in, 16) int8: the reduction runs down each block, 16 outputs a vector
    return (blocks.to(torch.float32) * x[None, :, None]).sum(1).reshape(-1) * scale


def gigabytes_per_second(products: list[Callable[[], object]], weight_bytes: int) -> float:
    for product in products:
        product()
    start = time.perf_counter()
    for _ in range(REPEATS):
        for product in products:
            product()
    return REPEATS * len(products) * weight_bytes / (time.perf_counter() - start) / 1e9


def candidates(n_out: int, n_in: int) -> dict[str, float]:
    copies = max(2, int(COPY_BYTES / (n_out * n_in)))
    weights = [torch.randint(-127, 128, (n_out, n_in), dtype=torch.int8) for _ in range(copies)]
    scale = torch.rand(n_out, dtype=torch.bfloat16)
    row = torch.randn(1, n_in, dtype=torch.bfloat16)
    int8_rows = torch.randint(-127, 128, (2, n_in), dtype=torch.int8)
    compiled = torch.compile(blocked_product, dynamic=False)
    blocks = [w.view(n_out // 16, 16, n_in).transpose(1, 2).contiguous() for w in weights]
    size = n_out * n_in
    speeds = {
        "pack": gigabytes_per_second([lambda w=w: torch._weight_int8pack_mm(row, w, scale) for w in weights], size),
        "int_mm": gigabytes_per_second([lambda w=w: torch._int_mm(int8_rows[:1], w.t()) for w in weights], size),
        "int_mm2": gigabytes_per_second([lambda w=w: torch._int_mm(int8_rows, w.t()) for w in weights], size),
        "blocked": gigabytes_per_second([lambda b=b: compiled(row[0].float(), b, scale.float()) for b in blocks],
                                        size),
    }
    del weights, blocks
    bf16 = [torch.randn(n_out, n_in, dtype=torch.bfloat16) for _ in range(max(2, copies // 2))]
    with without_onednn():  # as Decoder.step_context multiplies one bf16 row
        speeds["bf16"] = gigabytes_per_second([lambda w=w: torch.nn.functional.linear(row, w) for w in bf16],
                                              2 * size)
    return speeds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"read bandwidth {read_bandwidth():.1f} GB/s, {args.threads} threads, GB/s of weight bytes read:")
    for n_out, n_in in layer_shapes(SHAPES[args.shape]):
        speeds = candidates(n_out, n_in)
        print(f"{n_out:>6} x {n_in:<6}", "  ".join(f"{name} {value:5.1f}" for name, value in speeds.items()),
              flush=True)


if __name__ == "__main__":
    main()
