"""bench/run.py --quick runs end to end and prints every row (a smoke run: no speed is asserted); each child process
reports its own peak memory."""
import argparse
import os
import subprocess
import sys

import pytest
import torch

from bench import int8_kernels, run as bench
from bench.big import SHAPES
from conftest import ROOT, asset, one_line_error


def test_quick_bench_prints_the_whole_table():
    asset("tokenizer.model")
    result = subprocess.run([sys.executable, "-m", "bench", "--quick", "--repeats", "1", "--threads", "1"], cwd=ROOT,
                            capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    names = " ".join(rows)
    for measure in ("greedy decode fp32", "greedy decode int8", "greedy decode fp16", "everything but the products",
                    "resident MB while decoding", "prefill",
                    "full fine-tuning 8 x 16", "LoRA r=4 q/k/v/o 8 x 16", "peak RSS", "model GFLOP/s",
                    "one SST train epoch",
                    "zero-shot SST dev"):
        assert measure in names
    assert len(rows) == 1 + 9 + 6 + 3
    assert "16/16 greedy tokens identical" in result.stdout


def test_a_child_reports_its_own_peak_memory_not_its_parents():
    held = torch.ones(2**28)  # 1 GiB, touched: this process's peak is at least that
    with open("/proc/self/status") as f:
        parent_peak_mb = int(f.read().split("VmHWM:")[1].split()[0]) / 1024
    args = argparse.Namespace(threads=1, repeats=1, dtype="fp32", quick=True, checkpoint=None)
    child = bench.child_result({"impl": "ours", "mode": "lora", "batch": 2, "seqlen": 8}, args)
    del held
    assert child["peak_mb"] < parent_peak_mb - 512


def test_a_step_s_model_flops_are_what_torch_counts_for_the_layers():
    """bench's step_gflop: the layers' products as torch's flop counter counts them on a full padded forward pass
    (it has no formula for the CPU attention kernel), plus attention's two products over the causal half."""
    from torch.utils.flop_counter import FlopCounterMode

    from conftest import tiny_config
    from llama import Llama

    config = tiny_config(n_layers=3)
    batch, seqlen = 5, 12
    with FlopCounterMode(display=False) as counter:
        Llama(config).hidden_states(torch.randint(0, 97, (batch, seqlen)))
    products = counter.get_total_flops()
    attention = 2 * 2 * config.n_layers * batch * config.n_heads * seqlen * (seqlen / 2) * config.head_dim
    forward = products + attention
    assert products > 0 and abs(bench.step_gflop(config, batch, seqlen, trains_weights=True) * 1e9 - 3 * forward) < 1
    assert abs(bench.step_gflop(config, batch, seqlen, trains_weights=False) * 1e9 - 2 * forward) < 1


@pytest.mark.parametrize("argv, words", [
    (["--decode", "--llama2c", "{tmp}"], ["--llama2c", "run.c", "llama2.c checkout"]),
    (["--decode", "--threads", "0"], ["--threads 0", "at least 1"]),
    (["--decode", "--checkpoint", "{tmp}/nope.pt"], ["--checkpoint", "nope.pt", "no such file"]),
    (["--tokenizer", "{tmp}/nope.model"], ["--tokenizer", "nope.model"]),
    (["--sst-epoch", "0"], ["--sst-epoch 0"]),
    (["--big", "--big-tokens", "0"], ["--big-tokens 0"]),
])
def test_bad_flags_end_in_one_line_before_any_measuring(tmp_path, monkeypatch, capsys, argv, words):
    """Every flag is checked first: --llama2c used to fail after several minutes of measuring, with a traceback."""
    line = one_line_error(bench.main, [arg.replace("{tmp}", str(tmp_path)) for arg in argv], monkeypatch, capsys)
    for word in words:
        assert word in line, line


@pytest.mark.parametrize("shape, parameters", [("1b", 1.1e9), ("7b", 6.74e9)])
def test_the_big_rows_count_the_weights_a_decoding_step_reads(shape, parameters):
    """bench_big's bytes per token: every matrix of the model but the embedding, as our model has them; and the
    shapes are TinyLlama-1.1B's and Llama-2-7B's."""
    from bench import big as bench_big
    from config import LlamaConfig
    from llama import Llama

    shape = bench_big.SHAPES[shape]
    config = LlamaConfig(dim=shape["hidden_size"], n_layers=shape["num_hidden_layers"],
                         n_heads=shape["num_attention_heads"], n_kv_heads=shape["num_key_value_heads"],
                         vocab_size=shape["vocab_size"], hidden_dim=shape["intermediate_size"])
    with torch.device("meta"):
        model = Llama(config, tied_embeddings=False)
    matrices = sum(p.numel() for name, p in model.named_parameters() if p.dim() == 2 and "tok_embeddings" not in name)
    assert bench_big.matrix_weights(shape) == matrices
    assert model.num_parameters() == pytest.approx(parameters, rel=0.01)


def test_the_int8_survey_covers_each_product_shape_once_and_its_blocked_product_is_the_product():
    assert int8_kernels.layer_shapes(SHAPES["7b"]) == [(4096, 4096), (11008, 4096), (4096, 11008), (32000, 4096)]
    assert int8_kernels.layer_shapes(SHAPES["1b"])[1] == (256, 2048)  # 4 key-value heads of 64
    torch.manual_seed(0)
    weight, x, scale = torch.randint(-127, 128, (48, 32), dtype=torch.int8), torch.randn(32), torch.rand(48)
    blocks = weight.view(3, 16, 32).transpose(1, 2).contiguous()
    assert torch.allclose(int8_kernels.blocked_product(x, blocks, scale), (weight.float() @ x) * scale, atol=1e-4)
