"""End to end on stories260K, as a user runs run_llama.py (in-process through main(), plus one real process)."""
import os
import subprocess
import sys

import pytest
import torch

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


def run(args, cwd) -> None:
    old = os.getcwd()
    os.chdir(cwd)
    try:
        assert run_llama.main(args) == 0
    finally:
        os.chdir(old)


def read_lines(path):
    with open(path, encoding="utf-8") as f:
        return f.read().splitlines()


def test_generate_writes_both_files_as_a_real_process(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "run_llama.py"), "--option", "generate",
                             *model_flags()], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    greedy = (tmp_path / "generated-sentence-temp-0.txt").read_text()
    sampled = (tmp_path / "generated-sentence-temp-1.txt").read_text()
    assert greedy.startswith(run_llama.ASSIGNMENT_PREFIX) and sampled.startswith(run_llama.ASSIGNMENT_PREFIX)
    continuation = greedy[len(run_llama.ASSIGNMENT_PREFIX):]
    assert len(continuation.split()) > 25 and continuation != sampled[len(run_llama.ASSIGNMENT_PREFIX):]
    assert greedy in result.stdout
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(tmp_path / "generated-sentence-temp-0.txt").st_mode & 0o777 == 0o666 & ~umask


def test_free_prompt_with_temperature(tmp_path):
    run(["--option", "generate", *model_flags(), "--prompt", "Once upon a time", "--temperature", "0",
         "--max_new_tokens", "20"], tmp_path)
    text = (tmp_path / "generated-sentence-temp-0.txt").read_text()
    assert text.startswith("Once upon a time, there was a little girl")


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


@pytest.mark.parametrize("option", ["finetune", "lora"])
def test_resume_ends_bit_for_bit_where_an_uninterrupted_run_ends(tmp_path, sst_subset, option):
    common = ["--option", option, *model_flags(), *sst_subset, "--batch_size", "16", "--lr", "2e-3",
              "--hidden_dropout_prob", "0.3", "--filepath", "model.pt"]
    (tmp_path / "whole").mkdir()
    (tmp_path / "resumed").mkdir()
    run(common + ["--epochs", "3"], tmp_path / "whole")
    run(common + ["--epochs", "1"], tmp_path / "resumed")  # "interrupted" after epoch 1
    run(common + ["--epochs", "3", "--resume"], tmp_path / "resumed")
    for name in (f"sst-dev-{run_llama.MODE_NAMES[option]}-output.txt", f"sst-test-{run_llama.MODE_NAMES[option]}-output.txt"):
        assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "resumed" / name).read_bytes()
    for name in ("model.pt", "model.pt.state"):
        whole = torch.load(tmp_path / "whole" / name, weights_only=False)["trainable"]
        resumed = torch.load(tmp_path / "resumed" / name, weights_only=False)["trainable"]
        assert whole.keys() == resumed.keys()
        assert all(torch.equal(whole[k], resumed[k]) for k in whole)
