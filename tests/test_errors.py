"""Every bad input ends with exit status 2 and one line on stderr that names the culprit: no traceback, and
no output file created or changed."""
import io
import os

import pytest
import torch

import run_llama
from llama import Generation
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


def pt_with_huge_model_args(folder):
    import torch
    ckpt = torch.load(asset(STORIES260K))
    ckpt["model_args"].update(dim=1 << 40, vocab_size=1 << 40)
    path = os.path.join(folder, "huge.pt")
    torch.save(ckpt, path)
    return path


def pt_with_non_tensors(folder):
    import torch
    ckpt = torch.load(asset(STORIES260K))
    ckpt["model"]["norm.weight"] = "not a tensor"
    path = os.path.join(folder, "odd.pt")
    torch.save(ckpt, path)
    return path


def pt_with_nan(folder):
    ckpt = torch.load(asset(STORIES260K))
    ckpt["model"]["layers.2.feed_forward.w3.weight"][5, 7] = float("nan")
    path = os.path.join(folder, "nan.pt")
    torch.save(ckpt, path)
    return path


def pt_that_overflows(folder):
    """Finite weights whose scores are not: the last norm's gain is near float32's largest value."""
    ckpt = torch.load(asset(STORIES260K))
    ckpt["model"]["norm.weight"].fill_(1e38)
    path = os.path.join(folder, "loud.pt")
    torch.save(ckpt, path)
    return path


def classifier_checkpoint(folder):
    import torch
    path = os.path.join(folder, "trained.pt")
    torch.save({"format": "minllama2-classifier", "option": "lora", "trainable": {}}, path)
    return path


class RunsCode:
    """Unpickling this runs a shell command: what a tampered file would do without weights_only."""
    def __reduce__(self):
        return os.system, ("touch pwned",)


def state_file(folder, content) -> str:
    torch.save(content, os.path.join(folder, "model.pt.state"))
    return os.path.join(folder, "model.pt.state")


def classify_input(folder, command):
    """The command as --option classify of a trained checkpoint (model.pt, a stand-in) on the dev data."""
    command.set("--option", "classify")
    command.set("--input", command.flags["--dev"])


def folder_with(folder, name, *files):
    os.makedirs(os.path.join(folder, name))
    for file in files:
        write(os.path.join(folder, name), file, b"{}")
    return os.path.join(folder, name)


def copy_of(folder, source, name):
    with open(source, "rb") as f:
        return write(folder, name, f.read())


def lm_task(folder, command, name=None, content=None):
    """The command as --task lm on language-model data (given, or a good prompt/completion file)."""
    command.set("--task", "lm")
    for flag in ("--label-names", "--dev", "--test", "--dev_out"):
        command.flags.pop(flag, None)
    command.set("--train", write(folder, name or "qa.jsonl",
                                 content or b'{"prompt": "Q: sky?", "completion": " Blue."}\n'))


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
    ("data label out of range", lambda d, a: a.set("--test", write(d, "r.txt", b"0 ||| ok\n7 ||| no\n")), ["r.txt", "line 2", "label 7"]),
    ("data not utf-8", lambda d, a: a.set("--dev", write(d, "u.txt", b"1 ||| ok\n0 ||| caf\xe9\n")), ["u.txt", "line 2", "UTF-8"]),
    ("label mapping missing", lambda d, a: a.set("--label-names", "nope.json"), ["--label-names", "nope.json"]),
    ("label mapping not json", lambda d, a: a.set("--label-names", write(d, "l.json", b"[bad, good")), ["l.json", "JSON"]),
    ("label mapping not strings", lambda d, a: a.set("--label-names", write(d, "l.json", b'{"a": 1}')), ["l.json", "list"]),
    ("label mapping too short", lambda d, a: a.set("--label-names", write(d, "l.json", b'["bad"]')), ["label 1", "--label-names"]),
    ("lr not positive", lambda d, a: a.set("--lr", "0"), ["--lr"]),
    ("batch size not positive", lambda d, a: a.set("--batch_size", "0"), ["--batch_size"]),
    ("micro-batch size not positive", lambda d, a: a.set("--micro_batch_size", "0"), ["--micro_batch_size"]),
    ("micro-batches without training", lambda d, a: (a.set("--option", "prompt"), a.set("--micro_batch_size", "2")), ["--micro_batch_size", "finetune or lora"]),
    ("negative epochs", lambda d, a: a.set("--epochs", "-1"), ["--epochs"]),
    ("negative temperature", lambda d, a: a.set("--temperature", "-0.5"), ["--temperature"]),
    ("lora rank not positive", lambda d, a: a.set("--lora_rank", "0"), ["--lora_rank"]),
    ("unknown lora target", lambda d, a: a.set("--lora_targets", "wq,query"), ["--lora_targets", "'query'"]),
    ("no gpu", lambda d, a: a.add("--use_gpu"), ["--use_gpu"]),
    ("output under a file", lambda d, a: a.set("--dev_out", "dev.txt-out/out.txt"), ["--dev_out", "dev.txt-out is a file"]),
    # a missing output folder is made when the run starts, and removed again when the run fails
    ("output folder made, then bad data", lambda d, a: (a.set("--dev_out", "runs/new/out.txt"),
                                                        a.set("--dev", write(d, "n.txt", b"superb ||| ok\n"))), ["n.txt", "'superb'"]),
    ("output_dir with classify", lambda d, a: (classify_input(d, a), a.set("--output_dir", "runs")), ["--output_dir", "--output"]),
    # messages that point the right way
    ("state given as a model", lambda d, a: (a.set("--option", "generate"), a.unset("--filepath"),
                                             a.set("--pretrained-model-path", state_file(d, {"format": "minllama2-training-state"}))),
     ["--pretrained-model-path", "model.pt.state", "--resume", "its checkpoint, to use elsewhere, is"]),
    ("state given to classify", lambda d, a: (classify_input(d, a), a.set("--filepath", state_file(d, {"format": "minllama2-training-state"}))),
     ["--filepath", "model.pt.state", "--resume", "its checkpoint, to use elsewhere, is"]),
    ("classify checkpoint missing", lambda d, a: (classify_input(d, a), a.set("--filepath", "nothere.pt")), ["nothere.pt", "no such file"]),
    ("classify input is a folder", lambda d, a: (classify_input(d, a), a.set("--input", d)), ["--input", "is a folder", "pass a file"]),
    ("model folder without tokenizer", lambda d, a: (a.set("--pretrained-model-path", folder_with(d, "hf", "config.json")),
                                                     a.unset("--tokenizer")), ["hf", "no tokenizer", "--tokenizer"]),
    # hostile or damaged files
    ("checkpoint model_args huge", lambda d, a: a.set("--pretrained-model-path", pt_with_huge_model_args(d)), ["huge.pt", "plausible"]),
    ("checkpoint holds NaN", lambda d, a: a.set("--pretrained-model-path", pt_with_nan(d)), ["nan.pt", "layers.2.feed_forward.w3.weight", "NaN"]),
    ("greedy scores overflow", lambda d, a: (a.set("--option", "generate"), a.unset("--filepath"), a.set("--pretrained-model-path", pt_that_overflows(d))),
     ["next-token scores", "infinite", "--dtype fp32"]),
    ("sampled scores overflow", lambda d, a: (a.set("--option", "generate"), a.unset("--filepath"), a.set("--temperature", "1"),
                                              a.set("--pretrained-model-path", pt_that_overflows(d))), ["next-token scores", "infinite"]),
    ("zero-shot scores overflow", lambda d, a: (a.set("--option", "prompt"), a.set("--pretrained-model-path", pt_that_overflows(d))),
     ["scores of 2 dev examples", "line 1", "--dtype fp32"]),
    ("perplexity overflows", lambda d, a: (a.set("--option", "perplexity"), a.unset("--filepath"), a.set("--input", a.flags["--train"]),
                                           a.set("--pretrained-model-path", pt_that_overflows(d))), ["input loss is", "--dtype fp32"]),
    ("checkpoint holds non-tensors", lambda d, a: a.set("--pretrained-model-path", pt_with_non_tensors(d)), ["odd.pt", "tensors"]),
    ("checkpoint is a folder", lambda d, a: a.set("--pretrained-model-path", d), ["--pretrained-model-path", "config.json"]),
    ("own classifier as base model", lambda d, a: a.set("--pretrained-model-path", classifier_checkpoint(d)), ["trained.pt", "--option classify"]),
    ("data is a folder", lambda d, a: a.set("--train", d), ["--train", "folder"]),
    ("state runs code", lambda d, a: (state_file(d, RunsCode()), a.add("--resume")), ["--resume", "model.pt.state"]),
    ("state is text", lambda d, a: (write(d, "model.pt.state", b"junk" * 100), a.add("--resume")), ["--resume", "model.pt.state", "corrupt"]),
    ("state of another program", lambda d, a: (state_file(d, {"epoch": 3}), a.add("--resume")), ["model.pt.state", "training state"]),
    ("state damaged", lambda d, a: (state_file(d, {"format": "minllama2-training-state", "training": []}), a.add("--resume")), ["model.pt.state", "damaged"]),
    ("label names duplicated", lambda d, a: a.set("--label-names", write(d, "l.json", b'["bad", "bad "]')), ["l.json", "'bad'", "twice"]),
    # flag values
    ("lr infinite", lambda d, a: a.set("--lr", "inf"), ["--lr", "finite"]),
    ("temperature nan", lambda d, a: a.set("--temperature", "nan"), ["--temperature", "finite"]),
    ("top_p nan", lambda d, a: a.set("--top_p", "nan"), ["--top_p", "finite"]),
    ("dropout nan", lambda d, a: a.set("--hidden_dropout_prob", "nan"), ["--hidden_dropout_prob", "finite"]),
    ("lora alpha infinite", lambda d, a: a.set("--lora_alpha", "inf"), ["--lora_alpha", "finite"]),
    ("epochs not a number", lambda d, a: a.set("--epochs", "three"), ["--epochs", "'three'"]),
    ("unknown flag", lambda d, a: a.add("--learning_rate"), ["--learning_rate"]),
    ("unknown option", lambda d, a: a.set("--option", "train"), ["--option", "'train'"]),
    ("resume without training", lambda d, a: (a.set("--option", "prompt"), a.add("--resume")), ["--resume", "finetune"]),
    ("classify without input", lambda d, a: a.set("--option", "classify"), ["--input", "--filepath"]),
    # outputs: never a folder, an input or another output
    ("dev_out is a folder", lambda d, a: a.set("--dev_out", d), ["--dev_out", "folder"]),
    ("filepath is a folder", lambda d, a: a.set("--filepath", d), ["--filepath", "folder"]),
    ("dev_out is the dev data", lambda d, a: a.set("--dev_out", a.flags["--dev"]), ["--dev_out", "--dev"]),
    ("test_out is the label mapping", lambda d, a: a.set("--test_out", a.flags["--label-names"]), ["--test_out", "--label-names"]),
    ("test_out is dev_out", lambda d, a: a.set("--test_out", "dev.txt-out"), ["--test_out", "--dev_out"]),
    ("filepath is the base model", lambda d, a: (a.set("--pretrained-model-path", copy_of(d, asset(STORIES260K), "base.pt")),
                                                a.set("--filepath", "base.pt")), ["--filepath", "--pretrained-model-path"]),
    ("generation out is the tokenizer", lambda d, a: (a.set("--option", "generate"), a.unset("--filepath"), a.set("--tokenizer", copy_of(d, asset(TOK512), "t.model")),
                                                      a.set("--generated_sentence_low_temp_out", "t.model")), ["--generated_sentence_low_temp_out", "--tokenizer"]),
    ("another run's checkpoint", lambda d, a: None, ["--filepath", "model.pt", "--overwrite"]),
    ("data flags mixed", lambda d, a: a.unset("--train"), ["--train", "data/cfimdb-train.txt"]),
    ("default model missing", lambda d, a: a.unset("--pretrained-model-path"), ["stories42M.pt", "./setup.sh", "stories260K.pt"]),
    ("quantize int4", lambda d, a: (a.set("--option", "generate"), a.set("--quantize", "int4")), ["--quantize", "'int4'", "int8"]),
    ("fsdp with lora", lambda d, a: a.add("--fsdp"), ["--fsdp", "--option finetune", "LoRA"]),
    ("fsdp without torchrun", lambda d, a: (a.set("--option", "finetune"), a.add("--fsdp")), ["--fsdp", "torchrun --nproc_per_node"]),
    ("quantize fp16 with lora", lambda d, a: a.set("--quantize", "fp16"), ["--quantize", "nf4 or int8", "--option generate"]),
    ("quantize with finetune", lambda d, a: (a.set("--option", "finetune"), a.set("--quantize", "int8")), ["--quantize", "--option generate", "lora"]),
    ("quantize nf4 with generate", lambda d, a: (a.set("--option", "generate"), a.unset("--filepath"), a.set("--quantize", "nf4")), ["--quantize", "nf4", "--option lora"]),
    ("quantize a prompts file", lambda d, a: (a.set("--option", "generate"), a.unset("--filepath"), a.set("--quantize", "int8"),
                                             a.set("--input", write(d, "p.jsonl", b'{"prompt": "a"}\n')), a.set("--output", "o.jsonl")), ["--quantize", "one --prompt"]),
    # the language model's data and flags
    ("lm row without its fields", lambda d, a: lm_task(d, a, "x.jsonl", b'{"prompt": "a", "answer": "b"}\n'), ["x.jsonl:1", '"prompt"']),
    ("lm prompt not a string", lambda d, a: lm_task(d, a, "x.jsonl", b'{"prompt": 3, "completion": "b"}\n'), ["x.jsonl:1", "'prompt'", "string"]),
    ("lm completion empty", lambda d, a: lm_task(d, a, "x.jsonl", b'{"prompt": "a", "completion": "b"}\n\n{"prompt": "a", "completion": " "}\n'), ["x.jsonl:3", "empty"]),
    ("lm json list of numbers", lambda d, a: lm_task(d, a, "x.json", b"[1, 2]"), ["x.json:1", "language-model example"]),
    ("lm json list not json", lambda d, a: lm_task(d, a, "x.json", b'[{"text": "a"'), ["x.json", "JSON"]),
    ("lm forms mixed", lambda d, a: lm_task(d, a, "x.jsonl", b'{"prompt": "a", "completion": "b"}\n{"text": "c"}\n'), ["x.jsonl:2", "one form"]),
    ("lm text not utf-8", lambda d, a: lm_task(d, a, "x.txt", b"fine\ncaf\xe9\n"), ["x.txt:2", "UTF-8"]),
    ("lm with label names", lambda d, a: (lm_task(d, a), a.set("--label-names", write(d, "l.json", b'["a"]'))), ["--label-names", "--task classify"]),
    ("classify on prompt/completion data", lambda d, a: a.set("--train", write(d, "qa.jsonl", b'{"prompt": "a", "completion": "b"}\n')), ["qa.jsonl", "line 1", "--task lm"]),
    ("lm block beyond the window", lambda d, a: (lm_task(d, a), a.set("--block_size", "4096")), ["--block_size", "max_seq_len 512"]),
    ("block size without lm", lambda d, a: a.set("--block_size", "64"), ["--block_size", "--task lm"]),
    ("task with prompt", lambda d, a: (a.set("--option", "prompt"), a.set("--task", "lm")), ["--task", "finetune or lora"]),
    ("warmup negative", lambda d, a: a.set("--warmup_steps", "-1"), ["--warmup_steps"]),
    ("unknown schedule", lambda d, a: a.set("--lr_scheduler", "step"), ["--lr_scheduler", "'step'"]),
    ("schedule with generate", lambda d, a: (a.set("--option", "generate"), a.set("--lr_scheduler", "cosine")), ["--lr_scheduler", "finetune or lora"]),
    ("stride without perplexity", lambda d, a: a.set("--stride", "4"), ["--stride", "perplexity"]),
    ("perplexity without input", lambda d, a: a.set("--option", "perplexity"), ["--option perplexity", "--input"]),
    ("perplexity stride of the window", lambda d, a: (a.set("--option", "perplexity"), a.unset("--filepath"), a.set("--input", a.flags["--train"]),
                                                      a.set("--stride", "512")), ["--stride 512", "511"]),
    ("generate input without output", lambda d, a: (a.set("--option", "generate"), a.set("--input", a.flags["--train"])), ["--input", "--output"]),
    ("generate prompts without a prompt", lambda d, a: (a.set("--option", "generate"), a.unset("--filepath"), a.set("--input", write(d, "p.jsonl", b'{"question": "a"}\n')),
                                                        a.set("--output", "out.jsonl")), ["p.jsonl:1", '"prompt"']),
    ("generate from a classifier", lambda d, a: (a.set("--option", "generate"), a.set("--filepath", a.flags["--train"])), ["--filepath", "train.txt"]),
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

    def unset(self, flag):
        del self.flags[flag]

    def argv(self):
        return [x for pair in self.flags.items() for x in pair] + self.extra


@pytest.mark.parametrize("case, breaks, words", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_status_2(tmp_path, monkeypatch, capsys, case, breaks, words):
    if case == "no gpu" and torch.cuda.is_available():
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
    assert not (tmp_path / "pwned").exists()


def test_windows_line_endings_are_accepted(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    command = Command(str(tmp_path))
    command.set("--option", "prompt")
    command.set("--dev", write(str(tmp_path), "crlf.txt", b"1 ||| fine film\r\n0 ||| dull film\r\n"))
    assert run_llama.main(command.argv()) == 0
    assert (tmp_path / "crlf-dev-prompting-output.txt").read_text().splitlines()[1].endswith("||| dull film")


def test_a_prompt_longer_than_the_window_is_cut_from_the_left_keeping_the_start_token(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    prompts = []
    new_tokens = Generation.new_tokens  # the loop that Llama and decoding.Decoder share
    monkeypatch.setattr(Generation, "new_tokens", lambda self, idx, *a, **k: prompts.append(idx) or new_tokens(self, idx, *a, **k))
    argv = ["--pretrained-model-path", asset(STORIES260K), "--tokenizer", asset(TOK512), "--temperature", "0",
            "--prompt", "word " * 600, "--max_new_tokens", "5"]
    assert run_llama.main(argv) == 0
    assert "keeping its last 510 after the start token" in capsys.readouterr().err
    assert prompts[0].shape == (1, 511) and prompts[0][0, 0].item() == 1  # <s>
    assert (tmp_path / "generated-sentence-temp-0.txt").exists()


def test_byte_order_marks_are_accepted(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    command = Command(str(tmp_path))
    command.set("--option", "prompt")
    command.set("--dev", write(str(tmp_path), "bom.txt", b"\xef\xbb\xbf3 ||| fine film\n0 ||| dull film\n"))
    command.set("--label-names", write(str(tmp_path), "bom.json", b'\xef\xbb\xbf["bad", "good", "x", "y"]'))
    command.set("--test", write(str(tmp_path), "t.txt", b"1 ||| ok\n2 ||| so so\n"))
    assert run_llama.main(command.argv()) == 0
    assert (tmp_path / "bom-dev-prompting-output.txt").read_text().splitlines()[0].endswith("||| fine film")


def test_labels_that_the_data_never_uses_are_warned_about(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    command = Command(str(tmp_path))
    command.set("--option", "prompt")
    command.set("--label-names", asset("data/sst-label-mapping.json"))
    assert run_llama.main(command.argv()) == 0
    assert "uses labels [0, 1] only" in capsys.readouterr().err


def test_a_split_with_one_label_value_says_its_accuracy_may_mean_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    command = Command(str(tmp_path))
    command.set("--option", "prompt")
    assert run_llama.main(command.argv()) == 0
    test_line = [l for l in capsys.readouterr().out.splitlines() if l.startswith("test acc")][0]
    assert "every test label is 0" in test_line and "means nothing" in test_line


def test_a_full_disk_keeps_the_previous_file_and_ends_with_one_line(tmp_path, monkeypatch, capsys):
    """ENOSPC in the middle of each kind of write: checkpoint and state (torch.save), predictions (text)."""
    import errno
    import utils

    class FullDisk(io.FileIO):
        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.chdir(tmp_path)
    for name in ("model.pt", "model.pt.state", "preds.txt"):
        path = tmp_path / name
        path.write_text(SENTINEL)
        monkeypatch.setattr(utils, "open", lambda fd, mode: FullDisk(fd, mode.replace("b", "")), raising=False)
        writer = utils.write_text_atomic if name.endswith(".txt") else lambda p, t: utils.save_atomic({"t": t}, p)
        with pytest.raises(utils.UsageError, match=f"could not write {path}: No space left on device"):
            writer(str(path), "new contents")
        monkeypatch.undo()
        assert path.read_text() == SENTINEL
    assert sorted(os.listdir(tmp_path)) == ["model.pt", "model.pt.state", "preds.txt"]  # no temporary file left


def test_a_full_disk_during_training_is_one_line(tmp_path, monkeypatch, capsys):
    import errno
    import utils

    monkeypatch.chdir(tmp_path)
    real_save = utils.torch.save

    def save(obj, f):
        real_save(obj, f)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(utils.torch, "save", save)
    assert run_llama.main(Command(str(tmp_path)).argv()) == 2
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert last_line.startswith("error: could not write model.pt: No space left on device")
    assert not os.path.exists(tmp_path / "model.pt")


def test_a_non_finite_loss_in_the_first_epoch_names_no_checkpoint(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    command = Command(str(tmp_path))
    command.set("--train", write(str(tmp_path), "long.txt", b"0 ||| a bad film\n1 ||| a good film\n" * 8))
    command.set("--batch_size", "1")  # the first steps' updates already break a later step of epoch 0
    command.set("--lr", "1e30")
    assert run_llama.main(command.argv()) == 2
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert last_line.startswith("error: training loss became") and "at epoch 0" in last_line
    assert "checkpoint" not in last_line and not os.path.exists(tmp_path / "model.pt")


def test_non_finite_loss_stops_training_and_keeps_the_best_checkpoint(tmp_path, monkeypatch, capsys):
    import train

    monkeypatch.chdir(tmp_path)
    command = Command(str(tmp_path))
    command.set("--epochs", "3")
    real = train.accumulate_gradients
    steps = []  # one a epoch: the loss of epoch 1's turns NaN

    def diverging(*args, **kwargs):
        steps.append(real(*args, **kwargs))
        return steps[-1] if len(steps) == 1 else float("nan")

    monkeypatch.setattr(train, "accumulate_gradients", diverging)
    assert run_llama.main(command.argv()) == 2
    last_line = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bars
    assert last_line.startswith("error: training loss became nan at epoch 1, step 0; lower --lr")
    assert "the best checkpoint so far is kept in model.pt" in last_line
    assert torch.load(tmp_path / "model.pt")["trainable"]  # epoch 0's


def test_weights_that_the_last_step_of_an_epoch_broke_are_never_kept(tmp_path, monkeypatch, capsys):
    """One step an epoch at lr 1e30: its loss is finite, the weights after it are not. The dev scores show it."""
    monkeypatch.chdir(tmp_path)
    command = Command(str(tmp_path))
    command.set("--option", "finetune")
    command.set("--lr", "1e30")
    assert run_llama.main(command.argv()) == 2
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert last_line.startswith("error: the dev scores became nan after the last step of epoch 0; lower --lr")
    assert not os.path.exists(tmp_path / "model.pt")
