"""torchrun with 2 CPU processes (gloo) trains like one process with the same global batch."""
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, STORIES260K, TOK512, asset


def subset(tmp_path, name, n):
    with open(asset(f"data/sst-{name}.txt"), encoding="utf-8") as f:
        lines = f.readlines()[:n]
    path = tmp_path / f"sst-{name}.txt"
    path.write_text("".join(lines), encoding="utf-8")
    return str(path)


def untied_checkpoint(tmp_path):
    """stories260K with an output matrix of its own, as llama2.c's larger exports have."""
    ckpt = torch.load(asset(STORIES260K))
    embeddings = ckpt["model"]["tok_embeddings.weight"]
    ckpt["model"]["output.weight"] = embeddings + 0.01 * torch.randn(embeddings.shape, generator=torch.Generator().manual_seed(0))
    path = tmp_path / "untied.pt"
    torch.save(ckpt, path)
    return str(path)


@pytest.mark.parametrize("option", ["finetune", "lora"])
def test_two_processes_match_one_with_the_same_global_batch(tmp_path, option):
    """37 training examples in global batches of 16 end with a short batch of 5, split 3 + 2: each example must
    weigh 1/5 in both runs. Full fine-tuning runs on an untied model, whose output matrix gets no gradient."""
    data = ["--train", subset(tmp_path, "train", 37), "--dev", subset(tmp_path, "dev", 61),
            "--test", subset(tmp_path, "test", 33), "--label-names", asset("data/sst-label-mapping.json")]
    base = untied_checkpoint(tmp_path) if option == "finetune" else asset(STORIES260K)
    common = [os.path.join(ROOT, "run_llama.py"), "--option", option, "--pretrained-model-path", base,
              "--tokenizer", asset(TOK512), *data, "--epochs", "2", "--lr", "2e-3", "--hidden_dropout_prob", "0",
              "--filepath", "model.pt"]
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
    assert "effective batch size 16" in logs["ddp"]
    assert logs["ddp"].count("dev acc ::") == logs["single"].count("dev acc ::")  # rank 0 alone prints
    mode = "lora" if option == "lora" else "finetuning"
    for split in ("dev", "test"):
        name = f"sst-{split}-{mode}-output.txt"
        assert (tmp_path / "ddp" / name).read_bytes() == (tmp_path / "single" / name).read_bytes()
    # After 2 epochs of AdamW the weights agree to float rounding; weighting each process's share by its own
    # size instead moves them by about the learning rate (2e-3).
    single = torch.load(tmp_path / "single" / "model.pt")["trainable"]
    ddp = torch.load(tmp_path / "ddp" / "model.pt")["trainable"]
    assert single.keys() == ddp.keys()
    for key in single:
        torch.testing.assert_close(ddp[key], single[key], atol=2e-5, rtol=0, msg=key)
    # each process saved its own random-number states, for its own dropout masks after --resume
    rngs = torch.load(tmp_path / "ddp" / "model.pt.state")["rng"]
    assert len(rngs) == 2 and not torch.equal(rngs[0]["torch"], rngs[1]["torch"])
