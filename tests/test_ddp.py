"""torchrun with 2 CPU processes (gloo) trains like one process with the same global batch, whether the processes
replicate the model (DistributedDataParallel) or shard it (--fsdp), and a sharded run resumes after SIGTERM."""
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import run_llama
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


def trained_tensors(folder):
    """The trained tensors of the checkpoint folder/model.pt, whole: a sharded run's are joined from its shards by
    torch.distributed.checkpoint's own converter, and its file holds only their names and shapes (on the meta
    device), never the tensors gathered."""
    saved = torch.load(folder / "model.pt")
    if "shards" not in saved:
        return saved["trainable"]
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    assert all(t.is_meta for t in saved["trainable"].values())
    dcp_to_torch_save(folder / saved["shards"], folder / "joined.pt")
    joined = torch.load(folder / "joined.pt")["model"]
    assert {name: (t.shape, t.dtype) for name, t in joined.items()} == {
        name: (t.shape, t.dtype) for name, t in saved["trainable"].items()}
    return joined


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
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    runs = {"single": [sys.executable, *common, "--batch_size", "16"], "ddp": [*torchrun, *common, "--batch_size", "8"]}
    if option == "finetune":
        runs["fsdp"] = [*torchrun, *common, "--batch_size", "8", "--fsdp"]
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
    single = torch.load(tmp_path / "single" / "model.pt")["trainable"]
    for name in runs.keys() - {"single"}:
        for split in ("dev", "test"):
            output = f"sst-{split}-{mode}-output.txt"
            assert (tmp_path / name / output).read_bytes() == (tmp_path / "single" / output).read_bytes(), name
        # After 2 epochs of AdamW the weights agree to float rounding; weighting each process's share by its own
        # size instead moves them by about the learning rate (2e-3).
        trained = trained_tensors(tmp_path / name)
        assert single.keys() == trained.keys()
        for key in single:
            torch.testing.assert_close(trained[key], single[key], atol=2e-5, rtol=0, msg=f"{name} {key}")
    if option == "finetune":  # one process reads the sharded run's checkpoint whole
        assert run_llama.main(["--option", "classify", "--filepath", str(tmp_path / "fsdp" / "model.pt"), "--input",
                               data[3], "--output", str(tmp_path / "classified.txt")]) == 0
        assert (tmp_path / "classified.txt").read_bytes() == (tmp_path / "fsdp" / "sst-dev-finetuning-output.txt").read_bytes()
        shards = next((tmp_path / "fsdp").glob("model.pt.shards-*"))
        shards.rename(tmp_path / "moved")
        result = subprocess.run([sys.executable, os.path.join(ROOT, "run_llama.py"), "--option", "classify", "--filepath",
                                 str(tmp_path / "fsdp" / "model.pt"), "--input", data[3]], capture_output=True, text=True)
        assert result.returncode == 2 and result.stderr.strip().splitlines() == [
            f"error: --filepath {tmp_path / 'fsdp' / 'model.pt'}: its shards {shards} are missing; keep that folder "
            f"beside it, or train again"], result.stderr
        # each process keeps half of what a replica keeps (a row of a shard may be padding)
        kept = {name: [float(x) for x in re.findall(r"= ([\d.]+) MB", logs[name])] for name in ("ddp", "fsdp")}
        assert len(kept["fsdp"]) == 2 and all(f <= 0.55 * d for f, d in zip(kept["fsdp"], kept["ddp"])), kept
    # each process saved its own random-number states, for its own dropout masks after --resume
    rngs = torch.load(tmp_path / "ddp" / "model.pt.state")["rng"]
    assert len(rngs) == 2 and not torch.equal(rngs[0]["torch"], rngs[1]["torch"])


# Runs run_llama.main under torchrun; every process sends itself SIGTERM at its n-th step of training, as torchrun
# passes a SIGTERM on to all of them: a moment in the middle of an epoch, chosen exactly.
# It ends as run_llama.py does; an interpreter teardown would say so (see run_llama.exit_with).
SIGTERM_AT_STEP = """
import atexit, os, signal, sys
sys.path.insert(0, {root!r})
import run_llama, train
nth, original, calls = int(sys.argv[1]), train.accumulate_gradients, []
def counted(*args, **kwargs):
    calls.append(1)
    if len(calls) == nth:
        os.kill(os.getpid(), signal.SIGTERM)
    return original(*args, **kwargs)
train.accumulate_gradients = counted
atexit.register(lambda: print("interpreter teardown", file=sys.stderr))
run_llama.exit_with(run_llama.main(sys.argv[2:]))
"""


def test_a_sharded_run_resumes_after_sigterm_mid_epoch_with_the_same_or_other_process_counts(tmp_path):
    """32 examples in global batches of 16: 2 steps an epoch, so step 6 is in the middle of epoch 2."""
    data = ["--train", subset(tmp_path, "train", 32), "--dev", subset(tmp_path, "dev", 24),
            "--test", subset(tmp_path, "test", 12), "--label-names", asset("data/sst-label-mapping.json")]
    flags = ["--option", "finetune", "--pretrained-model-path", asset(STORIES260K), "--tokenizer", asset(TOK512),
             *data, "--epochs", "3", "--lr", "2e-3", "--hidden_dropout_prob", "0", "--filepath", "model.pt", "--fsdp"]
    driver = tmp_path / "driver.py"
    driver.write_text(SIGTERM_AT_STEP.format(root=ROOT))
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1")

    def torchrun(folder, processes, *args):
        (tmp_path / folder).mkdir(exist_ok=True)
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                               str(processes), *args], cwd=tmp_path / folder, env=env, capture_output=True, text=True,
                              timeout=300)

    whole = torchrun("whole", 2, os.path.join(ROOT, "run_llama.py"), *flags, "--batch_size", "8")
    assert whole.returncode == 0, whole.stderr[-2000:]
    stopped = torchrun("resumed", 2, str(driver), "6", *flags, "--batch_size", "8")
    assert stopped.returncode != 0
    assert "stopped by SIGTERM; epochs up to 1 are saved in model.pt.state" in stopped.stderr, stopped.stderr[-2000:]
    # no process tore the interpreter down with the process group's threads alive (that aborted one now and then)
    assert "interpreter teardown" not in stopped.stderr and "exitcode: -6" not in stopped.stderr, stopped.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "resumed").glob("model.pt*")) == [  # epoch 0's shards went once
        "model.pt", "model.pt.shards-1", "model.pt.state", "model.pt.state.shards-1"]  # epoch 1's were whole
    shutil.copytree(tmp_path / "resumed", tmp_path / "four")

    resumed = torchrun("resumed", 2, os.path.join(ROOT, "run_llama.py"), *flags, "--batch_size", "8", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from model.pt.state after epoch 1" in resumed.stdout
    for split in ("dev", "test"):
        name = f"sst-{split}-finetuning-output.txt"
        assert (tmp_path / "resumed" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()

    # the same state resumed by 4 processes with the same global batch: the same steps, summed in another order
    four = torchrun("four", 4, os.path.join(ROOT, "run_llama.py"), *flags, "--batch_size", "4", "--resume")
    assert four.returncode == 0, four.stderr[-2000:]
    expected = trained_tensors(tmp_path / "whole")
    for key, tensor in trained_tensors(tmp_path / "four").items():
        torch.testing.assert_close(tensor, expected[key], atol=2e-5, rtol=0, msg=key)


def test_a_sharded_language_model_trains_as_one_process_and_scores_in_one(tmp_path):
    """--task lm under --fsdp: its base on the meta device until sharded (no head of its own), its checkpoint read
    whole by --option perplexity."""
    text = tmp_path / "text.txt"
    text.write_text("".join(line.split(" ||| ")[-1] for line in open(subset(tmp_path, "train", 60), encoding="utf-8")))
    common = [os.path.join(ROOT, "run_llama.py"), "--option", "finetune", "--task", "lm", "--pretrained-model-path",
              asset(STORIES260K), "--tokenizer", asset(TOK512), "--train", str(text), "--dev", str(text), "--epochs",
              "1", "--lr", "1e-3", "--filepath", "lm.pt"]
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    scores = {}
    for name, command in (("single", [sys.executable, *common, "--batch_size", "8"]),
                          ("fsdp", [*torchrun, *common, "--batch_size", "4", "--fsdp"])):
        (tmp_path / name).mkdir()
        result = subprocess.run(command, cwd=tmp_path / name, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        scored = subprocess.run([sys.executable, os.path.join(ROOT, "run_llama.py"), "--option", "perplexity",
                                 "--filepath", "lm.pt", "--input", str(text)], cwd=tmp_path / name, env=env,
                                capture_output=True, text=True, timeout=120)
        assert scored.returncode == 0, scored.stderr[-2000:]
        scores[name] = (re.findall(r"dev loss :: [\d.]+", result.stdout), re.findall(r"perplexity [\d.]+", scored.stdout))
    assert scores["fsdp"] == scores["single"] and scores["single"][1], scores
