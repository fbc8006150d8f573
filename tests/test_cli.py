"""End to end on stories260K, as a user runs run_llama.py (in-process through main(), plus one real process)."""
import csv
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch

import flag_settings
import flags
import run_llama
from conftest import ROOT, STORIES260K, TOK512, asset


def model_flags() -> list[str]:
    return ["--pretrained-model-path", asset(STORIES260K), "--tokenizer", asset(TOK512)]


@pytest.fixture
def sst_subset(tmp_path):
    """Small slices of SST, so that a training run takes seconds."""
    def head(name, n):
        with open(asset(f"data/sst-{name}.txt"), encoding="utf-8") as f:
            lines = f.readlines()[:n]
        path = tmp_path / f"sst-{name}.txt"
        path.write_text("".join(lines), encoding="utf-8")
        return str(path)
    return ["--train", head("train", 120), "--dev", head("dev", 40), "--test", head("test", 30),
            "--label-names", asset("data/sst-label-mapping.json")]


def status(args, cwd) -> int:
    """run_llama.main(args) run in folder cwd."""
    old = os.getcwd()
    os.chdir(cwd)
    try:
        return run_llama.main(args)
    finally:
        os.chdir(old)


def run(args, cwd) -> None:
    assert status(args, cwd) == 0


def read_lines(path):
    with open(path, encoding="utf-8") as f:
        return f.read().splitlines()


def test_generate_writes_both_files_as_a_real_process(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "run_llama.py"), "--option", "generate",
                             *model_flags()], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    greedy = (tmp_path / "generated-sentence-temp-0.txt").read_text()
    sampled = (tmp_path / "generated-sentence-temp-1.txt").read_text()
    assert greedy.startswith(flags.ASSIGNMENT_PREFIX) and sampled.startswith(flags.ASSIGNMENT_PREFIX)
    continuation = greedy[len(flags.ASSIGNMENT_PREFIX):]
    assert len(continuation.split()) > 25 and continuation != sampled[len(flags.ASSIGNMENT_PREFIX):]
    assert greedy in result.stdout
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(tmp_path / "generated-sentence-temp-0.txt").st_mode & 0o777 == 0o666 & ~umask


def test_free_prompt_with_temperature(tmp_path):
    run(["--option", "generate", *model_flags(), "--prompt", "Once upon a time", "--temperature", "0",
         "--max_new_tokens", "20"], tmp_path)
    text = (tmp_path / "generated-sentence-temp-0.txt").read_text()
    assert text.startswith("Once upon a time, there was a little girl")


def test_quantized_generation_writes_its_story_and_every_run_reports_its_decoding_speed(tmp_path, capsys):
    common = ["--option", "generate", *model_flags(), "--prompt", "Once upon a time", "--temperature", "0",
              "--max_new_tokens", "40"]
    run(common, tmp_path)
    for quantize in ("int8", "fp16"):
        run(common + ["--quantize", quantize, "--generated_sentence_low_temp_out", f"{quantize}.txt"], tmp_path)
    out = capsys.readouterr().out
    speeds = [line for line in out.splitlines() if line.startswith("decode: ")]
    assert len(speeds) == 3 and all(re.fullmatch(r"decode: 40 new tokens; after the prompt's forward pass, which makes the first, 39 decoding steps in [\d.]+ s, [\d.]+ tok/s", s) for s in speeds)
    assert "quantized the weights to int8" in out and "quantized the weights to fp16" in out
    assert out.count("layers in int8") == 1  # int8's loading quantizes each matrix as read (fp16's converts later)
    for quantize in ("int8", "fp16"):
        assert (tmp_path / f"{quantize}.txt").read_text()[:60] == (tmp_path / "generated-sentence-temp-0.txt").read_text()[:60]


def test_a_slow_decode_reports_its_speed_to_two_decimals(tmp_path, monkeypatch, capsys):
    def slow(llama, idx, max_new_tokens, *args, **kwargs):  # 16 steps in 8.8 s: a 7B model on a CPU
        return torch.cat([idx, idx[:, :1].repeat(1, 17)], dim=1), 16, 8.8, False
    monkeypatch.setattr(run_llama, "timed_generation", slow)
    run(["--option", "generate", *model_flags(), "--temperature", "0", "--max_new_tokens", "17"], tmp_path)
    assert "16 decoding steps in 8.80 s, 1.82 tok/s" in capsys.readouterr().out


def test_bf16_on_a_cpu_without_bf16_instructions_warns_and_still_generates(tmp_path, monkeypatch, capsys):
    import runtime

    monkeypatch.setattr(runtime, "cpu_has_bf16_matmul", lambda: False)
    run(["--option", "generate", *model_flags(), "--prompt", "Once upon a time", "--temperature", "0",
         "--max_new_tokens", "5", "--dtype", "bf16"], tmp_path)
    assert "no bf16 matrix instructions" in capsys.readouterr().err
    assert (tmp_path / "generated-sentence-temp-0.txt").read_text().startswith("Once upon a time")


def check_predictions(out_path, data_path, n_labels):
    predictions, inputs = read_lines(out_path), read_lines(data_path)
    assert len(predictions) == len(inputs)
    for prediction, line in zip(predictions, inputs):
        label, sentence = prediction.split(" ||| ")
        assert 0 <= int(label) < n_labels and sentence == line.split(" ||| ")[1].strip()


def test_prompt_writes_predictions_in_input_order(tmp_path, sst_subset, capsys):
    run(["--option", "prompt", *model_flags(), *sst_subset, "--batch_size", "16"], tmp_path)
    check_predictions(tmp_path / "sst-dev-prompting-output.txt", sst_subset[3], 5)
    check_predictions(tmp_path / "sst-test-prompting-output.txt", sst_subset[5], 5)
    assert "dev acc ::" in capsys.readouterr().out


def test_finetune_is_reproducible_byte_for_byte(tmp_path, sst_subset):
    outputs = []
    for attempt in ("a", "b"):
        folder = tmp_path / attempt
        folder.mkdir()
        run(["--option", "finetune", *model_flags(), *sst_subset, "--epochs", "2", "--batch_size", "16",
             "--lr", "1e-3"], folder)
        outputs.append([(folder / name).read_bytes() for name in
                        ("sst-dev-finetuning-output.txt", "sst-test-finetuning-output.txt")])
        check_predictions(folder / "sst-dev-finetuning-output.txt", sst_subset[3], 5)
    assert outputs[0] == outputs[1]


def test_lora_saves_a_small_adapter_and_trains_few_parameters(tmp_path, sst_subset, capsys):
    run(["--option", "lora", *model_flags(), *sst_subset, "--epochs", "1", "--batch_size", "16", "--lr", "2e-3",
         "--lora_rank", "4", "--lora_alpha", "1", "--filepath", "adapter.pt"], tmp_path)
    check_predictions(tmp_path / "sst-test-lora-output.txt", sst_subset[5], 5)
    saved = torch.load(tmp_path / "adapter.pt")["trainable"]
    assert all("lora_" in name or name.startswith("classifier_head.") for name in saved)
    assert os.path.getsize(tmp_path / "adapter.pt") < 0.05 * os.path.getsize(asset(STORIES260K))
    percent = float(capsys.readouterr().out.split("parameters (")[1].split("%")[0])
    assert percent < 5


DEVICES = [pytest.param("cpu"), pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                               reason="no CUDA device"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("option", [["finetune"], ["lora"], ["lora", "--quantize", "nf4"]])
def test_resume_ends_bit_for_bit_where_an_uninterrupted_run_ends(tmp_path, sst_subset, option, device):
    common = ["--option", *option, *model_flags(), *sst_subset, "--batch_size", "16", "--lr", "2e-3",
              "--hidden_dropout_prob", "0.3", "--filepath", "model.pt"] + (["--use_gpu"] if device == "cuda" else [])
    option = option[0]
    (tmp_path / "whole").mkdir()
    (tmp_path / "resumed").mkdir()
    run(common + ["--epochs", "3"], tmp_path / "whole")
    run(common + ["--epochs", "1"], tmp_path / "resumed")  # "interrupted" after epoch 1
    run(common + ["--epochs", "3", "--resume"], tmp_path / "resumed")
    for name in (f"sst-dev-{flags.MODE_NAMES[option]}-output.txt", f"sst-test-{flags.MODE_NAMES[option]}-output.txt"):
        assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "resumed" / name).read_bytes()
    for name in ("model.pt", "model.pt.state"):
        whole = torch.load(tmp_path / "whole" / name, weights_only=True)["trainable"]
        resumed = torch.load(tmp_path / "resumed" / name, weights_only=True)["trainable"]
        assert whole.keys() == resumed.keys()
        assert all(torch.equal(whole[k], resumed[k]) for k in whole)


def fails(args, cwd, capsys) -> str:
    """Run, expect exit status 2, and return the one error line."""
    assert status(args, cwd) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1
    return lines[0]


def test_resume_extends_a_run_and_refuses_another_runs_state(tmp_path, sst_subset, capsys):
    """The default --filepath holds dataset, option and lr, not the epochs: --resume --epochs 2 extends an
    --epochs 1 run. Any other changed training flag or file is named and refused."""
    common = ["--option", "lora", *model_flags(), *sst_subset, "--batch_size", "16", "--lr", "2e-3"]
    run(common + ["--epochs", "1"], tmp_path)
    assert (tmp_path / "sst-lora-0.002.pt.state").is_file()
    run(common + ["--epochs", "2", "--resume"], tmp_path)
    assert "resumed from sst-lora-0.002.pt.state after epoch 0" in capsys.readouterr().out
    cfimdb = ["--train", asset("data/cfimdb-dev.txt"), "--dev", asset("data/cfimdb-dev.txt"), "--test",
              asset("data/cfimdb-test.txt"), "--label-names", asset("data/cfimdb-label-mapping.json")]
    changes = {"--lr": ["--option", "lora", *model_flags(), *sst_subset, "--batch_size", "16", "--lr", "1e-3",
                        "--filepath", "sst-lora-0.002.pt"],
               "--train": ["--option", "lora", *model_flags(), *cfimdb, "--batch_size", "16", "--lr", "2e-3",
                           "--filepath", "sst-lora-0.002.pt"],
               "--option": [*common, "--option", "finetune", "--filepath", "sst-lora-0.002.pt"],
               "--lora_rank": [*common, "--lora_rank", "8"],
               "--dtype": [*common, "--dtype", "bf16"],
               "--batch_size": [*common, "--batch_size", "8"]}
    for flag, args in changes.items():
        line = fails(args + ["--epochs", "3", "--resume"], tmp_path, capsys)
        assert line.startswith("error: --resume sst-lora-0.002.pt.state") and f"{flag} " in line, line


def test_a_checkpoint_of_another_run_is_replaced_only_with_overwrite(tmp_path, sst_subset, capsys):
    common = ["--option", "finetune", *model_flags(), *sst_subset, "--batch_size", "16", "--lr", "1e-3",
              "--filepath", "trained.pt"]
    run(common + ["--epochs", "2"], tmp_path)
    trained = (tmp_path / "trained.pt").read_bytes()
    line = fails(common + ["--epochs", "0"], tmp_path, capsys)
    assert "--filepath trained.pt" in line and "--epochs 2 there, 0 here" in line and "--overwrite" in line
    assert (tmp_path / "trained.pt").read_bytes() == trained
    run(common + ["--epochs", "2"], tmp_path)  # the same command again, as graders do
    run(common + ["--epochs", "0", "--overwrite"], tmp_path)
    assert torch.load(tmp_path / "trained.pt")["training"]["--epochs"] == 0


# ---------------------------------------------------------------------------------------------------------
# --option classify

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A LoRA, a QLoRA (nf4 base) and a full fine-tuning run of 2 epochs on SST slices, each in its own folder, with
    a copy of the base model and tokenizer beside the checkpoint (so a test can take them away)."""
    folder = tmp_path_factory.mktemp("trained")
    data = {}
    for name, n in (("train", 120), ("dev", 40)):
        with open(asset(f"data/sst-{name}.txt"), encoding="utf-8") as f:
            (folder / f"sst-{name}.txt").write_text("".join(f.readlines()[:n]), encoding="utf-8")
    runs = {}
    for name, option in (("finetune", ["finetune"]), ("lora", ["lora"]), ("qlora", ["lora", "--quantize", "nf4"])):
        run_dir = folder / name
        run_dir.mkdir()
        for file in (STORIES260K, TOK512):
            (run_dir / file).write_bytes(open(asset(file), "rb").read())
        run(["--option", *option, "--pretrained-model-path", STORIES260K, "--tokenizer", TOK512,
             "--train", str(folder / "sst-train.txt"), "--dev", str(folder / "sst-dev.txt"),
             "--test", str(folder / "sst-dev.txt"), "--label-names", asset("data/sst-label-mapping.json"),
             "--epochs", "2", "--batch_size", "16", "--lr", "2e-3", "--filepath", "model.pt"], run_dir)
        runs[name] = run_dir
    data["runs"], data["dev"] = runs, folder / "sst-dev.txt"
    return data


@pytest.mark.parametrize("name", ["finetune", "lora", "qlora"])
def test_classify_reproduces_the_training_runs_dev_predictions_from_anywhere(trained, tmp_path, name, capsys):
    run_dir = trained["runs"][name]
    expected = (run_dir / f"sst-dev-{flags.MODE_NAMES[name.removeprefix('q')]}-output.txt").read_bytes()
    run(["--option", "classify", "--filepath", str(run_dir / "model.pt"), "--input", str(trained["dev"]),
         "--output", "predicted.txt"], tmp_path)
    assert (tmp_path / "predicted.txt").read_bytes() == expected
    out = capsys.readouterr().out
    assert "input acc ::" in out and "confusion matrix" in out
    # the same weights exported as llama2.c's .bin have the same fingerprint
    run(["--option", "classify", "--filepath", str(run_dir / "model.pt"), "--input", str(trained["dev"]),
         "--output", "from-bin.txt", "--pretrained-model-path", asset("stories260K.bin")], tmp_path)
    assert (tmp_path / "from-bin.txt").read_bytes() == expected


def test_classify_reads_bare_sentences_from_standard_input(trained, tmp_path):
    sentences = "A wonderful, moving film.\nDull and far too long.\n"
    result = subprocess.run([sys.executable, os.path.join(ROOT, "run_llama.py"), "--option", "classify",
                             "--filepath", str(trained["runs"]["lora"] / "model.pt"), "--input", "-"],
                            input=sentences, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    rows = [line.split("\t") for line in result.stdout.splitlines()]
    names = json.load(open(asset("data/sst-label-mapping.json")))
    assert [row[2] for row in rows] == sentences.splitlines()
    assert all(row[0] in names and 0 < float(row[1]) <= 1 for row in rows), rows
    assert os.listdir(tmp_path) == []


def test_training_writes_one_metrics_line_per_epoch_and_a_png(trained):
    import matplotlib.pyplot as plt
    run_dir = trained["runs"]["finetune"]
    lines = [json.loads(line) for line in (run_dir / "model.metrics.jsonl").read_text().splitlines()]
    assert [entry["epoch"] for entry in lines] == [0, 1]
    assert set(lines[0]) == {"epoch", "train_loss", "dev_acc", "dev_f1", "seconds", "examples_per_s"}
    image = plt.imread(run_dir / "model.png")
    assert image.shape[0] > 100 and image.shape[1] > 100
    saved = torch.load(run_dir / "model.pt", weights_only=True)
    assert saved["history"] == lines[:saved["best_epoch"] + 1] and saved["label_names"] == json.load(open(asset("data/sst-label-mapping.json")))
    assert saved["base_model"]["model_args"]["dim"] == 64 and saved["base_model"]["relpath"] == STORIES260K


def perturbed_copy(folder):
    ckpt = torch.load(asset(STORIES260K))
    ckpt["model"]["norm.weight"] = ckpt["model"]["norm.weight"] * 1.01
    torch.save(ckpt, folder / "other.pt")
    return str(folder / "other.pt")


def test_classify_refuses_another_base_model_a_missing_one_and_old_checkpoints(trained, tmp_path, capsys):
    checkpoint = str(trained["runs"]["lora"] / "model.pt")
    common = ["--option", "classify", "--input", str(trained["dev"]), "--output", "out.txt"]
    line = fails([*common, "--filepath", checkpoint, "--pretrained-model-path", perturbed_copy(tmp_path)], tmp_path, capsys)
    assert "other.pt" in line and "stories260K.pt" in line
    moved = tmp_path / "moved"
    moved.mkdir()
    (moved / "model.pt").write_bytes(open(checkpoint, "rb").read())
    base = trained["runs"]["lora"] / STORIES260K
    os.rename(base, tmp_path / "away.pt")
    try:
        line = fails([*common, "--filepath", str(moved / "model.pt")], tmp_path, capsys)
    finally:
        os.rename(tmp_path / "away.pt", base)
    assert str(base) in line and "--pretrained-model-path" in line
    torch.save({"option": "lora", "trainable": {}}, tmp_path / "old.pt")
    line = fails([*common, "--filepath", str(tmp_path / "old.pt")], tmp_path, capsys)
    assert "old.pt" in line and "earlier minLlama2" in line
    assert not (tmp_path / "out.txt").exists()


# ---------------------------------------------------------------------------------------------------------
# flags

def test_help_shows_every_default_and_an_example_per_option(capsys):
    with pytest.raises(SystemExit):
        flag_settings.get_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for words in ("(default: 10)", "(default: 8;", "(default: 1e-05)", "(default: 0.3)", "data/cfimdb-train.txt",
                  "<filepath>.state", "(default: 0.0)", "(default: whole sentences"):
        assert words in text, words
    for action in flags.build_parser()._actions:
        if action.option_strings and action.nargs != 0:  # every flag that takes a value says what it is without one
            assert "default" in flags.HelpFormatter("x")._get_help_string(action), action.option_strings
    examples = text[text.index("examples"):]
    for option in ("generate", "prompt", "finetune", "lora", "classify", "export"):
        assert f"--option {option}" in examples, option


def test_flags_take_hyphens_and_underscores_alike():
    settings = flag_settings.get_args(["--option", "prompt", "--batch-size", "3", "--label_names", "a.json", "--dev",
                                   "d.txt", "--test", "t.txt", "--max-sentence-len=5"])
    data = settings.data
    assert (data.batch_size, data.label_names, data.max_sentence_len) == (3, "a.json", 5)


def test_a_quantized_base_trains_each_step_whole_unless_told():
    """Each micro-batch dequantizes every matrix twice: above a quantized base a CPU step is not cut by length,
    whether --batch_size is given or left at its default."""
    common = ["--option", "lora", "--train", "a.txt", "--dev", "d.txt", "--test", "t.txt", "--label-names", "l.json",
              "--batch_size", "6"]
    assert flag_settings.get_args(common).training.micro_batch_size is None
    assert flag_settings.get_args(common + ["--quantize", "nf4"]).training.micro_batch_size == 6
    assert flag_settings.get_args(common + ["--quantize", "int8", "--micro_batch_size", "2"]).training.micro_batch_size == 2
    assert flag_settings.get_args(common[:-2] + ["--quantize", "nf4"]).training.micro_batch_size == 8  # the default batch


def test_a_gpu_trains_each_step_whole_unless_told():
    common = ["--option", "finetune", "--train", "a.txt", "--dev", "d.txt", "--test", "t.txt", "--label-names",
              "l.json", "--use_gpu"]
    assert flag_settings.get_args(common).training.micro_batch_size == 8
    assert flag_settings.get_args(common + ["--micro_batch_size", "2"]).training.micro_batch_size == 2


def test_a_single_temperature_honours_the_output_flags(tmp_path):
    common = ["--option", "generate", *model_flags(), "--max_new_tokens", "5", "--prompt", "Once upon a time"]
    run(common + ["--temperature", "0.5", "--generated_sentence_high_temp_out", "sampled.txt"], tmp_path)
    run(common + ["--temperature", "0", "--generated_sentence_low_temp_out", "greedy.txt"], tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["greedy.txt", "sampled.txt"]


def test_max_sentence_len_never_cuts_a_generation_prompt(tmp_path):
    run(["--option", "generate", *model_flags(), "--prompt", "Once upon a time there was a big dog", "--temperature",
         "0", "--max_new_tokens", "3", "--max_sentence_len", "2"], tmp_path)
    assert (tmp_path / "generated-sentence-temp-0.txt").read_text().startswith("Once upon a time there was a big dog")


# ---------------------------------------------------------------------------------------------------------
# outputs that follow the input line by line

def test_classify_writes_one_line_per_input_line(trained, tmp_path, capsys):
    # a blank line, a line with a lone \r inside, a very long line, and Windows line endings
    long_review = "a long film about nothing " * 150
    lines = ["A wonderful film.", "", "Dull\rand long.", long_review, "  ", "Fine."]
    (tmp_path / "bare.txt").write_bytes("\r\n".join(lines).encode() + b"\r\n")
    checkpoint = str(trained["runs"]["lora"] / "model.pt")
    run(["--option", "classify", "--filepath", checkpoint, "--input", "bare.txt", "--output", "out.txt"], tmp_path)
    out = (tmp_path / "out.txt").read_bytes().decode("utf-8").split("\n")
    assert len(out) == len(lines) + 1 and out[-1] == ""  # one line per input line, each ending with \n
    assert [line == "" for line in out[:-1]] == [line.strip() == "" for line in lines]
    assert out[2].endswith(" ||| Dull\rand long.")
    assert "load 4 data from bare.txt (1 cut to fit 512 tokens; 2 blank lines skipped, left blank in the output)" \
        in capsys.readouterr().out


def test_blank_lines_of_training_data_are_skipped_with_a_note(tmp_path, sst_subset, capsys):
    dev = sst_subset[sst_subset.index("--dev") + 1]
    with open(dev, encoding="utf-8") as f:
        dev_lines = f.read().splitlines()
    with open(dev, "w", encoding="utf-8") as f:
        f.write("\n".join(dev_lines[:3] + [""] + dev_lines[3:]) + "\n")
    run(["--option", "prompt", *model_flags(), *sst_subset, "--batch_size", "20"], tmp_path)
    assert f"load 40 data from {dev} (1 blank line skipped)" in capsys.readouterr().out
    predictions = read_lines(tmp_path / "sst-dev-prompting-output.txt")
    assert len(predictions) == 41 and predictions[3] == ""


def test_classify_from_a_closed_standard_input_is_one_line(trained, tmp_path):
    result = subprocess.run(f"{shlex.quote(sys.executable)} {shlex.quote(os.path.join(ROOT, 'run_llama.py'))} "
                            f"--option classify --filepath {shlex.quote(str(trained['runs']['lora'] / 'model.pt'))} "
                            f"--input - <&-", shell=True, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1] == ("error: --input -: standard input is closed; pipe the "
                                                      "sentences in, or pass a file")


def test_an_empty_prompt_generates_from_the_start_token_alone(tmp_path):
    run(["--option", "generate", *model_flags(), "--prompt", "", "--temperature", "0", "--max_new_tokens", "8"],
        tmp_path)
    from llama import load_pretrained
    from tokenizer import Tokenizer

    expected = load_pretrained(asset(STORIES260K)).generate(torch.tensor([[1]]), 8, temperature=0.0)
    assert (tmp_path / "generated-sentence-temp-0.txt").read_text() == Tokenizer(asset(TOK512)).decode(
        expected[0].tolist())


def test_a_checkpoint_trained_in_fp16_classifies_on_a_cpu_in_fp32(trained, tmp_path, capsys):
    saved = torch.load(trained["runs"]["lora"] / "model.pt", weights_only=True)
    saved["training"]["--dtype"] = "fp16"  # as a GPU run writes it
    for name in (STORIES260K, TOK512):
        (tmp_path / name).write_bytes((trained["runs"]["lora"] / name).read_bytes())
    torch.save(saved, tmp_path / "fp16.pt")
    run(["--option", "classify", "--filepath", "fp16.pt", "--input", str(trained["dev"]), "--output", "p.txt"],
        tmp_path)
    assert "fp16.pt was trained in fp16, which needs a GPU; running in fp32" in capsys.readouterr().err
    expected = trained["runs"]["lora"] / "sst-dev-lora-output.txt"
    assert (tmp_path / "p.txt").read_bytes() == expected.read_bytes()


# ---------------------------------------------------------------------------------------------------------
# two runs, one --filepath

def test_a_second_run_on_the_same_files_stops_at_once_and_a_killed_one_blocks_nothing(tmp_path, sst_subset, capsys):
    args = ["--option", "lora", *model_flags(), *sst_subset, "--epochs", "2", "--batch_size", "8",
            "--filepath", "model.pt"]
    first = subprocess.Popen([sys.executable, os.path.join(ROOT, "run_llama.py"), *args, "--lr", "2e-3"],
                             cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lock = tmp_path / ".model.pt.lock"
    deadline = time.time() + 60
    while not (lock.exists() and lock.read_text()) and time.time() < deadline:
        time.sleep(0.05)
    assert status(args + ["--lr", "1e-3"], tmp_path) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --filepath model.pt: in use by a run that is still going (process "
                          f"{first.pid} on "), err
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=60)
    assert status(args[:-6] + ["--epochs", "0", "--filepath", "model.pt", "--overwrite"], tmp_path) == 0
    assert not lock.exists()


# ---------------------------------------------------------------------------------------------------------
# a user's own data, a folder per run

def test_own_data_with_label_names_trains_into_its_run_folder_and_classifies_in_any_format(tmp_path, sst_subset):
    names = json.load(open(asset("data/sst-label-mapping.json")))
    (tmp_path / "mydata").mkdir()
    for split in ("train", "dev", "test"):  # named as the assignment's files are: <dataset>-<split>
        path = sst_subset[sst_subset.index(f"--{split}") + 1]
        rows = [line.split(" ||| ", 1) for line in open(path, encoding="utf-8").read().splitlines()]
        with open(tmp_path / "mydata" / f"mydata-{split}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"review": s, "stars": names[int(label)]}) + "\n" for label, s in rows)
    data = ["--train", "mydata/mydata-train.jsonl", "--dev", "mydata/mydata-dev.jsonl", "--test", "mydata/mydata-test.jsonl",
            "--label-names", asset("data/sst-label-mapping.json"), "--text_field", "review", "--label_field", "stars"]
    command = ["--option", "lora", *model_flags(), *data, "--epochs", "1", "--lr", "1e-2", "--output_dir", "runs/a"]
    run(command, tmp_path)
    run_dir = tmp_path / "runs" / "a"
    assert sorted(p.name for p in run_dir.iterdir()) == [
        "mydata-dev-lora-output.txt", "mydata-lora-0.01.metrics.jsonl", "mydata-lora-0.01.png", "mydata-lora-0.01.pt",
        "mydata-lora-0.01.pt.state", "mydata-test-lora-output.txt", "run.json"]
    record = json.loads((run_dir / "run.json").read_text())
    assert shlex.split(record["command"])[2:] == command and record["status"] == "finished"
    assert torch.load(run_dir / "mydata-lora-0.01.pt", weights_only=True)["command"] == record["command"]
    predictions = (run_dir / "mydata-dev-lora-output.txt").read_text().splitlines()
    assert len(predictions) == 40 and all(line.split(" ||| ")[0] in names for line in predictions)

    # the same checkpoint labels a CSV file with a header, into a folder that does not exist yet
    rows = [json.loads(line) for line in (tmp_path / "mydata" / "mydata-dev.jsonl").read_text().splitlines()]
    with open(tmp_path / "dev.csv", "w", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows([["text", "label"], *([r["review"], r["stars"]] for r in rows)])
    run(["--option", "classify", "--filepath", "runs/a/mydata-lora-0.01.pt", "--input", "dev.csv",
         "--output", "out/new/dev.csv"], tmp_path)
    written = list(csv.reader(open(tmp_path / "out" / "new" / "dev.csv", encoding="utf-8")))
    assert written[0] == ["text", "label"] and [row[0] for row in written[1:]] == [r["review"] for r in rows]
    assert [row[1] for row in written[1:]] == [line.split(" ||| ")[0] for line in predictions]


def test_a_story_ends_where_the_model_ends_it_unless_told_to_go_on(tmp_path, capsys):
    common = ["--option", "generate", *model_flags(), "--prompt", "Once upon a time", "--temperature", "1",
              "--seed", "2", "--max_new_tokens", "500"]
    run(common + ["--generated_sentence_high_temp_out", "ended.txt"], tmp_path)
    err = capsys.readouterr().err
    n_new = int(re.search(r"note: the model ended the story after (\d+) new tokens; --ignore_eos", err).group(1))
    run(common + ["--generated_sentence_high_temp_out", "on.txt", "--ignore_eos"], tmp_path)
    assert "ended the story" not in capsys.readouterr().err
    ended, went_on = (tmp_path / "ended.txt").read_text(), (tmp_path / "on.txt").read_text()
    assert went_on.startswith(ended) and len(went_on) > len(ended) + 100 and 0 < n_new < 500


@pytest.mark.parametrize("flag, value, words", [("--temperature", "abc", "'abc' is not a number"),
                                                ("--lr", "inf", "'inf' is not a finite number"),
                                                ("--epochs", "2.5", "'2.5' is not a whole number"),
                                                ("--max_new_tokens", "many", "'many' is not a whole number")])
def test_a_value_of_the_wrong_type_is_named_in_words(tmp_path, capsys, flag, value, words):
    line = fails([flag, value], tmp_path, capsys)
    assert f"argument {flag}: {words}" in line and "invalid" not in line


def test_help_opens_with_a_short_usage_and_groups_the_flags_by_what_they_serve(capsys):
    with pytest.raises(SystemExit):
        flag_settings.get_args(["--help"])
    text = capsys.readouterr().out
    usage = text[:text.index("\n\n")]
    assert usage.startswith("usage: ") and len(usage.splitlines()) <= 2
    groups = {group.title: [a.option_strings[0] for a in group._group_actions]
              for group in flags.build_parser()._action_groups if group._group_actions}
    assert list(groups)[-7:] == ["what to do", "model", "data", "training", "LoRA", "generation", "outputs"]
    assert "--lora_rank" in groups["LoRA"] and "--temperature" in groups["generation"] and "--dev_out" in groups["outputs"]
    for title in ("what to do", "model", "data", "training", "LoRA", "generation", "outputs"):
        assert f"\n{title}:" in text
