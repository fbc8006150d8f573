"""Every bad input ends with exit status 2 and one line on stderr that names the culprit: no traceback, and
no output file created or changed."""
import os

import pytest

import run_llama
from conftest import STORIES260K, TOK512, asset

SENTINEL = "previous results\n"


def write(folder, name, content: bytes) -> str:
    path = os.path.join(folder, name)
    with open(path, "wb") as f:
        f.write(content)
    return path


def good_data(folder) -> dict:
    return {"train": write(folder, "train.txt", b"0 ||| a bad film\n1 ||| a good film\n"),
            "dev": write(folder, "dev.txt", b"1 ||| fine\n0 ||| dull\n"),
            "test": write(folder, "test.txt", b"0 ||| meh\n"),
            "labels": write(folder, "labels.json", b'["bad", "good"]')}


def truncated_checkpoint(folder):
    with open(asset(STORIES260K), "rb") as f:
        return write(folder, "cut.pt", f.read()[:300_000])


def pt_without_model_args(folder):
    import torch
    path = os.path.join(folder, "bare.pt")
    torch.save({"model": {}}, path)
    return path


def pt_with_wrong_shapes(folder):
    import torch
    ckpt = torch.load(asset(STORIES260K))
    ckpt["model_args"]["dim"] = 128
    path = os.path.join(folder, "wrong.pt")
    torch.save(ckpt, path)
    return path


# (case id, how to break the command, words the message must contain)
CASES = [
    ("checkpoint missing", lambda d, a: a.set("--pretrained-model-path", "nope.pt"), ["nope.pt", "no such file"]),
    ("checkpoint empty", lambda d, a: a.set("--pretrained-model-path", write(d, "empty.pt", b"")), ["empty.pt", "empty"]),
    ("checkpoint truncated", lambda d, a: a.set("--pretrained-model-path", truncated_checkpoint(d)), ["cut.pt", "truncated"]),
    ("checkpoint is text", lambda d, a: a.set("--pretrained-model-path", write(d, "notes.pt", b"hello\n" * 50)), ["notes.pt", "neither"]),
    ("checkpoint random bin", lambda d, a: a.set("--pretrained-model-path", write(d, "noise.bin", os.urandom(5000))), ["noise.bin"]),
    ("checkpoint without model_args", lambda d, a: a.set("--pretrained-model-path", pt_without_model_args(d)), ["bare.pt", "model_args"]),
    ("checkpoint shapes disagree", lambda d, a: a.set("--pretrained-model-path", pt_with_wrong_shapes(d)), ["wrong.pt", "shape"]),
    ("tokenizer missing", lambda d, a: a.set("--tokenizer", "nope.model"), ["nope.model", "--tokenizer"]),
    ("tokenizer not sentencepiece", lambda d, a: a.set("--tokenizer", write(d, "t.model", b"junk" * 10)), ["t.model", "sentencepiece"]),
    ("tokenizer vocab mismatch", lambda d, a: a.set("--tokenizer", asset("tokenizer.model")), ["32000", "512", "--tokenizer"]),
    ("data missing", lambda d, a: a.set("--dev", "nope.txt"), ["--dev", "nope.txt"]),
    ("data empty", lambda d, a: a.set("--test", write(d, "e.txt", b"")), ["--test", "e.txt", "no examples"]),
    ("data without separator", lambda d, a: a.set("--dev", write(d, "s.txt", b"1 ||| ok\n0 - oops\n")), ["s.txt", "line 2", "|||"]),
    ("data label not integer", lambda d, a: a.set("--dev", write(d, "n.txt", b"pos ||| ok\n")), ["n.txt", "line 1", "'pos'"]),
    ("data label out of range", lambda d, a: a.set("--test", write(d, "r.txt", b"0 ||| ok\n7 ||| no\n")), ["r.txt", "label 7"]),
    ("data not utf-8", lambda d, a: a.set("--dev", write(d, "u.txt", b"1 ||| ok\n0 ||| caf\xe9\n")), ["u.txt", "line 2", "UTF-8"]),
    ("label mapping missing", lambda d, a: a.set("--label-names", "nope.json"), ["--label-names", "nope.json"]),
    ("label mapping not json", lambda d, a: a.set("--label-names", write(d, "l.json", b"[bad, good")), ["l.json", "JSON"]),
    ("label mapping not strings", lambda d, a: a.set("--label-names", write(d, "l.json", b'{"a": 1}')), ["l.json", "list"]),
    ("label mapping too short", lambda d, a: a.set("--label-names", write(d, "l.json", b'["bad"]')), ["label 1", "--label-names"]),
    ("lr not positive", lambda d, a: a.set("--lr", "0"), ["--lr"]),
    ("batch size not positive", lambda d, a: a.set("--batch_size", "0"), ["--batch_size"]),
    ("negative epochs", lambda d, a: a.set("--epochs", "-1"), ["--epochs"]),
    ("negative temperature", lambda d, a: a.set("--temperature", "-0.5"), ["--temperature"]),
    ("lora rank not positive", lambda d, a: a.set("--lora_rank", "0"), ["--lora_rank"]),
    ("unknown lora target", lambda d, a: a.set("--lora_targets", "wq,query"), ["--lora_targets", "'query'"]),
    ("no gpu", lambda d, a: a.add("--use_gpu"), ["--use_gpu"]),
    ("output folder missing", lambda d, a: a.set("--dev_out", "no/such/dir/out.txt"), ["--dev_out", "does not exist"]),
    ("resume without state", lambda d, a: a.add("--resume"), ["--resume", "model.pt.state"]),
]


class Command:
    def __init__(self, folder):
        data = good_data(folder)
        self.flags = {"--option": "lora", "--pretrained-model-path": asset(STORIES260K), "--tokenizer": asset(TOK512),
                      "--train": data["train"], "--dev": data["dev"], "--test": data["test"],
                      "--label-names": data["labels"], "--epochs": "1", "--filepath": "model.pt"}
        self.extra = []

    def set(self, flag, value):
        self.flags[flag] = value

    def add(self, flag):
        self.extra.append(flag)

    def argv(self):
        return [x for pair in self.flags.items() for x in pair] + self.extra


@pytest.mark.parametrize("case, breaks, words", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_status_2(tmp_path, monkeypatch, capsys, case, breaks, words):
    if case == "no gpu" and run_llama.torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    monkeypatch.chdir(tmp_path)
    command = Command(str(tmp_path))
    for name in ("dev.txt-out", "model.pt"):  # results of an earlier run must survive
        write(str(tmp_path), name, SENTINEL.encode())
    command.set("--dev_out", "dev.txt-out")  # a case may point it elsewhere
    breaks(str(tmp_path), command)
    before = {name: os.path.getmtime(tmp_path / name) for name in os.listdir(tmp_path)}

    assert run_llama.main(command.argv()) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for word in words:
        assert word in lines[0], f"{word!r} not in {lines[0]!r}"
    after = {name: os.path.getmtime(tmp_path / name) for name in os.listdir(tmp_path)}
    assert after == before, "an output file was created or changed"
    assert (tmp_path / "model.pt").read_text() == SENTINEL


def test_windows_line_endings_are_accepted(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    command = Command(str(tmp_path))
    command.set("--option", "prompt")
    command.set("--dev", write(str(tmp_path), "crlf.txt", b"1 ||| fine film\r\n0 ||| dull film\r\n"))
    assert run_llama.main(command.argv()) == 0
    assert (tmp_path / "crlf-dev-prompting-output.txt").read_text().splitlines()[1].endswith("||| dull film")


def test_a_prompt_longer_than_the_window_is_cut_from_the_left_with_a_warning(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = ["--pretrained-model-path", asset(STORIES260K), "--tokenizer", asset(TOK512), "--temperature", "0",
            "--prompt", "word " * 600, "--max_new_tokens", "5"]
    assert run_llama.main(argv) == 0
    assert "keeping its last 511" in capsys.readouterr().err
    assert (tmp_path / "generated-sentence-temp-0.txt").exists()


def test_non_finite_loss_stops_training_and_keeps_the_best_checkpoint(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    command = Command(str(tmp_path))
    command.set("--epochs", "3")
    command.set("--lr", "1e30")
    assert run_llama.main(command.argv()) == 2
    last_line = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bars
    assert last_line.startswith("error: training loss became") and "--lr" in last_line
    assert os.path.isfile(tmp_path / "model.pt")
