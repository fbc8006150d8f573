"""torchrun with 2 CPU processes (gloo) trains like one process with the same global batch."""
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT, STORIES260K, TOK512, asset


def subset(tmp_path, name, n):
    with open(asset(f"data/sst-{name}.txt"), encoding="utf-8") as f:
        lines = f.readlines()[:n]
    path = tmp_path / f"sst-{name}.txt"
    path.write_text("".join(lines), encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("option", ["finetune", "lora"])
def test_two_processes_match_one_with_the_same_global_batch(tmp_path, option):
    data = ["--train", subset(tmp_path, "train", 160), "--dev", subset(tmp_path, "dev", 61),
            "--test", subset(tmp_path, "test", 33), "--label-names", asset("data/sst-label-mapping.json")]
    common = [os.path.join(ROOT, "run_llama.py"), "--option", option, "--pretrained-model-path", asset(STORIES260K),
              "--tokenizer", asset(TOK512), *data, "--epochs", "2", "--lr", "2e-3", "--hidden_dropout_prob", "0"]
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    runs = {"single": [sys.executable, *common, "--batch_size", "16"],
            "ddp": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    *common, "--batch_size", "8"]}
    logs = {}
    for name, command in runs.items():
        folder = tmp_path / name
        folder.mkdir()
        result = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        logs[name] = result.stdout
        for split, n in (("dev", 61), ("test", 33)):
            lines = (folder / f"sst-{split}-{'lora' if option == 'lora' else 'finetuning'}-output.txt").read_text().splitlines()
            with open(data[3 if split == "dev" else 5], encoding="utf-8") as f:
                inputs = f.read().splitlines()
            assert len(lines) == n
            assert [l.split(" ||| ")[1] for l in lines] == [l.split(" ||| ")[1].strip() for l in inputs]
    assert "effective batch size 16" in logs["ddp"]
    assert logs["ddp"].count("dev acc ::") == logs["single"].count("dev acc ::")  # rank 0 alone prints
    dev_acc = {name: float(re.findall(r"^dev acc :: ([0-9.]+)", log, re.M)[-1]) for name, log in logs.items()}
    assert abs(dev_acc["ddp"] - dev_acc["single"]) <= 0.05, dev_acc
