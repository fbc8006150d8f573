"""The training loop on a tiny random model and a task it can learn in seconds."""
import json
import sys

import pytest
import torch

from checkpoint import CHECKPOINT_FORMAT, STATE_FORMAT, read_saved
from classifier import build_classifier
from conftest import tiny_config
from data import Split
from llama import Llama
from runtime import Runtime
from settings import DataSettings, LoRASettings, RunFiles, Settings, TrainingSettings
from train import accumulate_gradients, draw_curves, fit, plot_curves


def first_token_task(n: int, seed: int) -> Split:
    """Label 1 when a sequence starts with token 3, 0 when with token 4; the rest is noise."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n,), generator=generator).tolist()
    token_ids = [[1, 3 if label else 4] + torch.randint(5, 97, (int(torch.randint(1, 8, (1,), generator=generator)),),
                                                        generator=generator).tolist() for label in labels]
    return Split("dev", labels, ["-"] * n, token_ids)


def settings_for(folder, epochs: int, lora: LoRASettings = None, lr: float = 1e-2) -> Settings:
    data = DataSettings("train.txt", "dev.txt", "test.txt", "labels.json", "dev-out.txt", "test-out.txt", False,
                        batch_size=8, max_sentence_len=None)
    training = TrainingSettings("lora" if lora else "finetune", epochs, lr, 0.0, lora,
                                RunFiles.beside(str(folder / "model.pt")), resume=False, overwrite=False)
    return Settings(training.option, False, "fp32", 0, None, tuple(training.files.outputs()), data=data,
                    training=training)


def train_tiny(folder, epochs, lora=None, lr=1e-2):
    torch.manual_seed(0)
    model = build_classifier(Llama(tiny_config()), 2, hidden_dropout_prob=0.0, lora=lora)
    settings = settings_for(folder, epochs, lora, lr)
    file = {"path": "/x", "relpath": "x", "fingerprint": "0"}
    described = {"format": CHECKPOINT_FORMAT, "training": {"--epochs": epochs, "--batch_size": 8, "--dtype": "fp32"},
                 "base_model": {**file, "model_args": {}}, "tokenizer": file, "label_names": ["no", "yes"],
                 "hidden_dropout_prob": 0.0, "max_sentence_len": None, "lora": lora.as_record() if lora else None}
    fit(model, first_token_task(64, 0), first_token_task(32, 1), settings, 0, Runtime(torch.device("cpu")), described,
        None)
    return model, settings.training.files


def test_full_fine_tuning_learns_and_saves_every_epoch(tmp_path):
    model, files = train_tiny(tmp_path, epochs=4, lr=2e-3)
    history = [json.loads(line) for line in open(files.metrics)]
    assert [entry["epoch"] for entry in history] == [0, 1, 2, 3]
    best = max(e["dev_acc"] for e in history)  # chance is 0.5
    assert best >= 0.9 and history[-1]["train_loss"] < history[0]["train_loss"]
    checkpoint = read_saved(files.checkpoint, "--filepath", CHECKPOINT_FORMAT)
    assert checkpoint["best_epoch"] == next(e["epoch"] for e in history if e["dev_acc"] == best)
    assert set(checkpoint["trainable"]) == {name for name, p in model.named_parameters() if p.requires_grad}
    state = read_saved(files.state, "--resume", STATE_FORMAT)
    assert state["epoch"] == 3 and state["history"] == history


def test_lora_checkpoints_hold_the_adapters_and_the_head_only(tmp_path):
    lora = LoRASettings(rank=2, alpha=1.0, dropout=0.0, targets=("wq", "wv"))
    _, files = train_tiny(tmp_path, epochs=1, lora=lora)
    trainable = read_saved(files.checkpoint, "--filepath", CHECKPOINT_FORMAT)["trainable"]
    assert len(trainable) == 2 * 2 * tiny_config().n_layers + 1  # lora_A, lora_B of wq and wv; the head
    assert all(name.endswith(("lora_A", "lora_B")) or name.startswith("classifier_head.") for name in trainable)


def test_zero_epochs_save_the_untrained_classifier_and_no_curves(tmp_path, capsys):
    _, files = train_tiny(tmp_path, epochs=0)
    assert f"saved the untrained classifier (no epoch ran) to {files.checkpoint}" in capsys.readouterr().out
    checkpoint = read_saved(files.checkpoint, "--filepath", CHECKPOINT_FORMAT)
    assert checkpoint["best_epoch"] is None and checkpoint["history"] == []
    assert not (tmp_path / "model.pt.state").exists() and not (tmp_path / "model.png").exists()


def test_without_matplotlib_the_curves_are_one_line_of_advice(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    plot_curves([{"epoch": 0, "train_loss": 1.0, "dev_acc": 0.5, "dev_f1": 0.5}], str(tmp_path / "c.png"), "run")
    assert capsys.readouterr().out == f"note: pip install matplotlib (or ./setup.sh --test) to also get the curves in {tmp_path / 'c.png'}\n"
    assert not (tmp_path / "c.png").exists()


@pytest.mark.parametrize("epochs", [[0], [3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]])
def test_the_curves_have_whole_epochs_as_the_log_numbers_them(epochs):
    history = [{"epoch": e, "train_loss": 1.0 / (e + 1), "dev_acc": 0.5, "dev_f1": 0.4} for e in epochs]
    figure = draw_curves(history, "run")
    for axes in figure.axes:
        low, high = axes.get_xlim()
        assert (low, high) == (epochs[0] - 0.5, epochs[-1] + 0.5)
        ticks = [t for t in axes.get_xticks() if low <= t <= high]
        assert ticks and all(float(t).is_integer() for t in ticks)


def test_micro_batches_give_the_gradient_of_the_whole_padded_batch():
    """A step's gradient does not depend on how its batch is cut: each micro-batch is padded to its own longest,
    and the model ignores padding. Weights (0 for torchrun's filler copies) and the scale apply per example."""
    torch.manual_seed(0)
    model = build_classifier(Llama(tiny_config()), 2, hidden_dropout_prob=0.0, lora=None)
    task = first_token_task(11, seed=1)
    weights = [1.0] * 10 + [0.0]
    runtime = Runtime(torch.device("cpu"))
    grads, losses = [], []
    for micro_batch in (11, 3, 1, None):
        model.zero_grad(set_to_none=True)
        losses.append(accumulate_gradients(model, task, list(range(11)), weights, 0.1, 0, micro_batch, runtime))
        grads.append({name: p.grad.clone() for name, p in model.named_parameters()})
    for loss, grad in zip(losses[1:], grads[1:]):
        assert loss == pytest.approx(losses[0], rel=1e-6)
        for name in grad:
            torch.testing.assert_close(grad[name], grads[0][name], rtol=1e-5, atol=1e-7, msg=name)
    model.zero_grad(set_to_none=True)
    first_ten = accumulate_gradients(model, task, list(range(10)), weights[:10], 0.1, 0, 4, runtime)
    assert first_ten == pytest.approx(losses[0], rel=1e-6)  # the filler copy weighs nothing
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[0][name], rtol=1e-5, atol=1e-7, msg=name)


def test_a_bf16_lora_step_in_fp32_kernels_gives_the_bf16_kernels_gradients_with_or_without_checkpointing(monkeypatch):
    """On a CPU without bf16 instructions a bf16 run's products with the frozen weights take fp32 kernels
    (runtime.Bf16ProductsInFp32Kernels), in the backward pass too, and in gradient checkpointing's second forward."""
    import runtime as runtime_module

    torch.manual_seed(0)
    model = build_classifier(Llama(tiny_config()).to(torch.bfloat16), 2, hidden_dropout_prob=0.0,
                             lora=LoRASettings(4, 8.0, 0.0, ("wq", "wv", "w2")))
    for name, p in model.named_parameters():
        if name.endswith("lora_B"):
            torch.nn.init.normal_(p, std=0.1)  # else the adapters' A get no gradient
    task, runtime = first_token_task(6, seed=2), Runtime(torch.device("cpu"), torch.bfloat16)

    def step(native: bool, checkpointing: bool) -> tuple[float, dict]:
        monkeypatch.setattr(runtime_module, "cpu_has_bf16_matmul", lambda: native)
        model.llama.gradient_checkpointing = checkpointing
        model.train().zero_grad(set_to_none=True)
        loss = accumulate_gradients(model, task, list(range(6)), [1.0] * 6, 1 / 6, 0, 3, runtime)
        return loss, {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}

    native_loss, native_grads = step(native=True, checkpointing=False)
    loss, grads = step(native=False, checkpointing=False)
    assert loss == pytest.approx(native_loss, rel=1e-2)
    for name, grad in grads.items():  # bf16 activations through two layers: a few bf16 steps apart
        torch.testing.assert_close(grad, native_grads[name], rtol=0.05, atol=1e-3, msg=name)
    checkpointed_loss, checkpointed = step(native=False, checkpointing=True)
    assert checkpointed_loss == loss
    for name, grad in checkpointed.items():
        assert torch.equal(grad, grads[name]), name


def test_a_language_model_step_is_its_token_mean_whatever_the_micro_batches():
    """The loss of a step is the sum of its tokens' losses over the step's count of trained tokens: micro-batches of
    other sizes (a mean per micro-batch would weigh their tokens unequally) change neither it nor the gradient."""
    from causal_lm import build_language_model

    torch.manual_seed(0)
    model = build_language_model(Llama(tiny_config()), lora=None)
    generator = torch.Generator().manual_seed(3)
    token_ids = [[1] + torch.randint(3, 97, (int(n),), generator=generator).tolist()
                 for n in torch.randint(2, 20, (7,), generator=generator)]
    task = Split("train", [], [], token_ids, trained_from=[1 + len(ids) // 2 for ids in token_ids])
    count = sum(task.counts())
    runtime = Runtime(torch.device("cpu"))
    results = []
    for micro_batch in (7, 2, 1):
        model.zero_grad(set_to_none=True)
        loss = accumulate_gradients(model, task, list(range(7)), [1.0] * 7, 1 / count, 0, micro_batch, runtime)
        results.append((loss, {name: p.grad.clone() for name, p in model.named_parameters()}))
    for loss, grads in results[1:]:
        assert loss == pytest.approx(results[0][0], rel=1e-6)
        for name, grad in grads.items():
            torch.testing.assert_close(grad, results[0][1][name], rtol=1e-5, atol=1e-7, msg=name)
