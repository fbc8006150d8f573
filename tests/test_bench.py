"""bench.py --quick runs end to end and prints every row (a smoke run: no speed is asserted)."""
import os
import subprocess
import sys

from conftest import ROOT, asset


def test_quick_bench_prints_the_whole_table():
    asset("tokenizer.model")
    result = subprocess.run([sys.executable, "bench.py", "--quick", "--repeats", "1", "--threads", "1"], cwd=ROOT,
                            capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    names = " ".join(rows)
    for measure in ("greedy decode fp32", "greedy decode int8", "resident MB while decoding", "prefill", "full fine-tuning 8 x 16", "LoRA r=4 q/k/v/o 2 x 64", "peak RSS",
                    "one SST train epoch", "zero-shot SST dev"):
        assert measure in names
    assert len(rows) == 1 + 5 + 8 + 2
    assert "16/16 greedy tokens identical" in result.stdout
