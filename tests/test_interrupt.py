"""Runs that stop part-way: Ctrl-C and SIGTERM end with one line and the command that resumes; SIGKILL at any
moment leaves files from which --resume ends byte for byte where an uninterrupted run ends."""
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch

import run_llama
from checkpoint import CHECKPOINT_FORMAT, STATE_FORMAT, read_saved
from conftest import ROOT, STORIES260K, TOK512, asset

# Runs run_llama.main in a child process that signals itself at the n-th call of one function (before it,
# after it, or during torch.save's k-th write to its file): a moment in the run chosen exactly, with no hook in
# the program itself.
DRIVER = """
import os, sys
sys.path.insert(0, {root!r})
import torch, run_llama, train
owner_name, name, nth, signum, when = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
owner = {{"train": train, "torch": torch, "os": os}}[owner_name]
original, calls = getattr(owner, name), []
signal_self = lambda: os.kill(os.getpid(), signum)

class SignalsAtWrite:
    def __init__(self, f, k):
        self.f, self.k, self.writes = f, k, 0
    def write(self, data):
        self.writes += 1
        if self.writes == self.k:
            signal_self()
        return self.f.write(data)
    def __getattr__(self, attr):
        return getattr(self.f, attr)

def hooked(*args, **kwargs):
    calls.append(1)
    if len(calls) == nth and when.startswith("during:"):
        args = (args[0], SignalsAtWrite(args[1], int(when.split(":")[1])), *args[2:])
    if len(calls) == nth and when == "before":
        signal_self()
    result = original(*args, **kwargs)
    if len(calls) == nth and when == "after":
        signal_self()
    return result
setattr(owner, name, hooked)
sys.exit(run_llama.main(sys.argv[6:]))
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("interrupt")
    data = []
    for name, n in (("train", 120), ("dev", 40), ("test", 20)):
        with open(asset(f"data/sst-{name}.txt"), encoding="utf-8") as f:
            (folder / f"{name}.txt").write_text("".join(f.readlines()[:n]), encoding="utf-8")
        data += [f"--{name}", str(folder / f"{name}.txt")]
    args = ["--option", "lora", "--pretrained-model-path", asset(STORIES260K), "--tokenizer", asset(TOK512), *data,
            "--label-names", asset("data/sst-label-mapping.json"), "--epochs", "3", "--batch_size", "16",
            "--lr", "2e-3", "--hidden_dropout_prob", "0.3", "--filepath", "model.pt"]
    whole = folder / "whole"
    whole.mkdir()
    in_folder(whole, lambda: run_llama.main(args))
    return args, whole


def in_folder(folder, fn):
    old = os.getcwd()
    os.chdir(folder)
    try:
        return fn()
    finally:
        os.chdir(old)


def interrupted_run(folder, args, owner, name, nth, signum, when="before"):
    # the same thread count as the runs in this process: sums split across threads differently round differently,
    # and resuming is bit-exact only at the same thread count
    env = dict(os.environ, TQDM_DISABLE="1", OMP_NUM_THREADS=str(torch.get_num_threads()))
    return subprocess.run([sys.executable, "-c", DRIVER.format(root=ROOT), owner, name, str(nth), str(signum), when,
                           *args], cwd=folder, env=env, capture_output=True, text=True, timeout=300)


def assert_same_predictions(folder, whole):
    for name in ("dev-dev-lora-output.txt", "dev-test-lora-output.txt"):
        assert (folder / name).read_bytes() == (whole / name).read_bytes(), name


@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_ends_with_one_line_naming_the_saved_epochs_and_the_resume_command(setup, tmp_path, signum, status):
    args, whole = setup
    # accumulate_gradients' 11th call is step 3 of epoch 1 (8 training steps an epoch)
    result = interrupted_run(tmp_path, args, "train", "accumulate_gradients", 11, signum)
    assert result.returncode == status, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: stopped by {signal.Signals(signum).name}; epochs up to 0 are saved in "
                           f"model.pt.state; to continue: {shlex.quote(sys.executable)} "), last  # the interpreter that ran it
    assert shlex.split(last.split("to continue: ")[1])[1] == os.path.relpath(os.path.join(ROOT, "run_llama.py"), tmp_path)
    assert not any(name.endswith(".tmp") for name in os.listdir(tmp_path))
    assert not (tmp_path / "dev-dev-lora-output.txt").exists()
    resume = shlex.split(last.split("to continue: ")[1])[2:]
    assert resume[-1] == "--resume"
    assert in_folder(tmp_path, lambda: run_llama.main(resume)) == 0
    assert_same_predictions(tmp_path, whole)


@pytest.mark.parametrize("owner, name, nth, when", [
    ("train", "accumulate_gradients", 11, "before"),  # mid-epoch: step 3 of epoch 1
    ("train", "predict", 2, "before"),  # evaluating dev after epoch 1
    ("torch", "save", 3, "after"),  # epoch 1's checkpoint or state written but not yet renamed into place
], ids=["mid-epoch", "evaluation", "checkpoint-write"])
def test_resume_after_sigkill_ends_byte_for_byte_as_an_uninterrupted_run(setup, tmp_path, owner, name, nth, when):
    args, whole = setup
    result = interrupted_run(tmp_path, args, owner, name, nth, signal.SIGKILL, when)
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    assert (tmp_path / "model.pt.state").exists() and not (tmp_path / "dev-dev-lora-output.txt").exists()
    assert in_folder(tmp_path, lambda: run_llama.main(args + ["--resume"])) == 0
    assert_same_predictions(tmp_path, whole)


# A lora run of 3 epochs writes, at the end of each: the checkpoint when dev improved (torch.save), the state
# (torch.save) and the metrics, each through a temporary file, os.fsync (file, then folder) and os.replace.
SAVE_MOMENTS = [("torch", "save", 2, "during:3"), ("os", "replace", 2, "after"), ("os", "fsync", 3, "before"),
                ("torch", "save", 1, "during:40")]


@pytest.mark.parametrize("moment", range(len(SAVE_MOMENTS)))
def test_a_signal_during_a_save_takes_effect_once_the_epoch_is_saved(setup, tmp_path, moment):
    args, whole = setup
    owner, name, nth, when = SAVE_MOMENTS[moment]
    signum, status = [(signal.SIGINT, 130), (signal.SIGTERM, 143)][moment % 2]
    result = interrupted_run(tmp_path, args, owner, name, nth, signum, when)
    assert result.returncode == status, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: stopped by {signal.Signals(signum).name}; epochs up to "), last
    assert not [name for name in os.listdir(tmp_path) if name.endswith((".tmp", ".lock"))]
    saved_epoch = int(last.split("epochs up to ")[1].split()[0])
    assert read_saved(str(tmp_path / "model.pt.state"), "--resume", STATE_FORMAT)["epoch"] == saved_epoch
    read_saved(str(tmp_path / "model.pt"), "--filepath", CHECKPOINT_FORMAT)
    assert in_folder(tmp_path, lambda: run_llama.main(shlex.split(last.split("to continue: ")[1])[2:])) == 0
    assert_same_predictions(tmp_path, whole)


def test_a_signal_before_the_first_epoch_ends_says_nothing_was_saved(setup, tmp_path):
    args, _ = setup
    result = interrupted_run(tmp_path, args, "train", "pad_batch", 2, signal.SIGINT)
    assert result.returncode == 130 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == ("error: stopped by SIGINT; no epoch had finished, so nothing "
                                                      "was saved; the same command starts again")
    assert os.listdir(tmp_path) == []


def test_resume_with_no_state_yet_starts_at_epoch_0(setup, tmp_path, capsys):
    """A job that a cluster scheduler requeues always passes --resume: the first start has nothing to resume."""
    args, whole = setup
    assert in_folder(tmp_path, lambda: run_llama.main(args + ["--resume"])) == 0
    assert "no training state model.pt.state yet, so training starts at epoch 0" in capsys.readouterr().out
    assert_same_predictions(tmp_path, whole)


@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_while_modules_import_is_one_line(tmp_path, signum, status):
    process = subprocess.Popen([sys.executable, os.path.join(ROOT, "run_llama.py"), "--option", "generate",
                                "--pretrained-model-path", asset(STORIES260K), "--tokenizer", asset(TOK512)],
                               cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    time.sleep(0.3)  # torch takes over a second to import
    process.send_signal(signum)
    _, err = process.communicate(timeout=60)
    assert process.returncode == status, err
    assert err.strip().splitlines() == [f"error: stopped by {signal.Signals(signum).name} before the run began; "
                                        f"nothing was written"]
    assert os.listdir(tmp_path) == []
