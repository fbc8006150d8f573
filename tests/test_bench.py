"""bench.py --quick runs end to end and prints every row (a smoke run: no speed is asserted); each child process
reports its own peak memory."""
import argparse
import os
import subprocess
import sys

import torch

import bench
from conftest import ROOT, asset


def test_quick_bench_prints_the_whole_table():
    asset("tokenizer.model")
    result = subprocess.run([sys.executable, "bench.py", "--quick", "--repeats", "1", "--threads", "1"], cwd=ROOT,
                            capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    names = " ".join(rows)
    for measure in ("greedy decode fp32", "greedy decode int8", "greedy decode fp16", "everything but the products",
                    "resident MB while decoding", "prefill",
                    "full fine-tuning 8 x 16", "LoRA r=4 q/k/v/o 8 x 16", "peak RSS", "one SST train epoch",
                    "zero-shot SST dev"):
        assert measure in names
    assert len(rows) == 1 + 9 + 4 + 2
    assert "16/16 greedy tokens identical" in result.stdout


def test_a_child_reports_its_own_peak_memory_not_its_parents():
    held = torch.ones(2**28)  # 1 GiB, touched: this process's peak is at least that
    with open("/proc/self/status") as f:
        parent_peak_mb = int(f.read().split("VmHWM:")[1].split()[0]) / 1024
    args = argparse.Namespace(threads=1, repeats=1, dtype="fp32", quick=True, checkpoint=None)
    child = bench.child_result({"impl": "ours", "mode": "lora", "batch": 2, "seqlen": 8}, args)
    del held
    assert child["peak_mb"] < parent_peak_mb - 512
