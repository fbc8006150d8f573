"""The one training loop, for full fine-tuning and LoRA alike (they differ only in which parameters require grad),
and the curves it draws.

Each epoch trains on batches drawn at random (a step computes its batch in micro-batches of similar lengths),
evaluates dev, and ends by saving: the best-dev checkpoint when dev accuracy improved, then the whole training
state (weights or adapters, optimizer, progress, every process's random-number generators) for --resume, then the
metrics. Under torchrun every process draws the same global batches of batch_size * world_size examples (one
shared generator) and trains on its own share; each example weighs 1 / (global batch size), so that the gradient
the processes average is the one a single process would compute, whether they replicate the model
(DistributedDataParallel) or shard it (--fsdp: runtime.Runtime.parallel chooses).
"""
import dataclasses
import json
import math
import os
import time
from typing import TYPE_CHECKING, Iterable, Optional

import torch
import torch.nn.functional as F

from checkpoint import (STATE_FORMAT, load_sharded_state, load_trainable, rng_state, save_checkpoint,
                        save_sharded_state, set_rng_state, trainable_state)
from data import Split, make_batches, micro_batches, pad_batch, shard
from evaluate import metrics, predict
from optimizer import AdamW
from runtime import Interrupted, Runtime
from settings import Settings
from utils import UsageError, atomic_write, save_atomic, signals_deferred, write_text_atomic

if TYPE_CHECKING:  # matplotlib is optional
    from matplotlib.figure import Figure


@dataclasses.dataclass
class Progress:
    """Where a run stands; saved in the state file with the tensors."""
    last_epoch: int = -1  # the last finished epoch
    best_dev_acc: float = -1.0
    best_epoch: Optional[int] = None
    history: list[dict] = dataclasses.field(default_factory=list)  # one entry per finished epoch


class Training:
    """One run of the loop: the model, what steps it (optimizer, gradient scaler, the batch order's generator)
    and where it stands."""

    def __init__(self, model: torch.nn.Module, settings: Settings, described: dict, runtime: Runtime):
        self.model, self.settings, self.described, self.runtime = model, settings, described, runtime
        self.files = settings.training.files
        self.trainer = runtime.parallel(model, model.llama.layers)
        self.optimizer = AdamW([p for p in model.parameters() if p.requires_grad], lr=settings.training.lr)
        self.scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.amp_dtype == torch.float16)
        self.generator = torch.Generator().manual_seed(settings.seed)  # the batches: the same in every process
        self.progress = Progress()
        self.memory_reported = False

    def resume(self, state: dict) -> None:
        """Go on from a training state (checked by checkpoint.check_run_files to come from this run)."""
        try:
            if state.get("shards"):
                load_sharded_state(self.files.state, state, self.model, self.optimizer)
            else:
                load_trainable(self.model, state["trainable"], self.files.state)
                self.optimizer.load_state_dict(state["optimizer"])
            self.scaler.load_state_dict(state["scaler"])
        except (KeyError, ValueError, RuntimeError, TypeError) as e:
            raise UsageError(f"--resume {self.files.state}: its optimizer state does not fit this model ({e}); "
                             f"delete it and train again") from e
        # another number of processes (the same global batch) draws the same batches; dropout draws other masks
        set_rng_state(state["rng"][self.runtime.rank % len(state["rng"])], self.generator, self.runtime.device,
                      self.files.state)
        self.progress = Progress(state["epoch"], state["best_dev_acc"], state["best_epoch"], state["history"])
        print(f"resumed from {self.files.state} after epoch {state['epoch']}")

    def train_epoch(self, epoch: int, train: Split, pad_id: int) -> tuple[float, int]:
        """One pass over the training set: (summed loss, examples seen)."""
        runtime, global_batch = self.runtime, self.settings.data.batch_size * self.runtime.world_size
        self.trainer.train()
        batches = make_batches([len(t) for t in train.token_ids], global_batch, shuffle=True, generator=self.generator)
        bar = runtime.progress(batches, f"train-{epoch}")
        total_loss, n_seen, start = 0.0, 0, time.perf_counter()
        for step, indices in enumerate(bar):
            mine, weights = shard(indices, runtime.rank, runtime.world_size, equal=runtime.shard)
            self.optimizer.zero_grad(set_to_none=True)
            # DDP averages over processes, hence world_size / (global batch) rather than 1 / (own share)
            loss_sum = accumulate_gradients(self.trainer, [train.token_ids[i] for i in mine],
                                            [train.labels[i] for i in mine], weights, runtime.world_size / len(indices),
                                            pad_id, self.settings.training.micro_batch_size, runtime, self.scaler)
            batch_loss = runtime.sum(loss_sum)  # over all processes; NaN anywhere stops all, before the step
            if not math.isfinite(batch_loss):
                saved = (f"; the best checkpoint so far is kept in {self.files.checkpoint}"
                         if self.progress.best_epoch is not None else "")
                raise UsageError(f"training loss became {batch_loss} at epoch {epoch}, step {step}; lower --lr{saved}")
            self.scaler.step(self.optimizer)
            self.scaler.update()
            if not self.memory_reported:
                self.report_memory()
            total_loss += batch_loss
            n_seen += len(indices)
            bar.set_postfix(loss=f"{total_loss / n_seen:.3f}", ex_per_s=f"{n_seen / (time.perf_counter() - start):.1f}")
        return total_loss, n_seen

    def report_memory(self) -> None:
        """What each process keeps for the weights, their gradients and AdamW's moments (its shards under --fsdp)."""
        def megabytes(tensors: Iterable[torch.Tensor]) -> float:
            local = [t.to_local() for t in tensors] if self.runtime.shard else list(tensors)  # DTensors: the shard
            return sum(t.numel() * t.element_size() for t in local) / 1e6

        params = list(self.model.parameters())
        held = [megabytes(params), megabytes(p.grad for p in params if p.grad is not None),
                megabytes(t for s in self.optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor))]
        per_process = self.runtime.gather(held)
        self.memory_reported = True
        print("kept for training (weights + gradients + AdamW moments): " + "; ".join(
            f"process {rank} {w:.1f} + {g:.1f} + {m:.1f} = {w + g + m:.1f} MB" for rank, (w, g, m) in enumerate(per_process)))

    def end_epoch(self, epoch: int, dev: Split, pad_id: int, train_loss: float, n_seen: int, start: float,
                  train_seconds: float) -> None:
        """Evaluate dev, then report and save: the checkpoint if dev improved, the state, the metrics. Reporting
        and saving are one unit that Ctrl-C or SIGTERM cannot split: a signal that arrives during it takes
        effect once the state covers this epoch."""
        predictions = predict(self.model, dev, self.settings.data.batch_size, pad_id, self.runtime).argmax(-1).tolist()
        with signals_deferred():
            self._save_epoch(epoch, metrics(dev.labels, predictions), train_loss, n_seen, start, train_seconds)

    def _save_epoch(self, epoch: int, dev_metrics: tuple[float, float], train_loss: float, n_seen: int, start: float,
                    train_seconds: float) -> None:
        dev_acc, dev_f1 = dev_metrics
        mean_loss = train_loss / max(n_seen, 1)
        print(f"epoch {epoch}: train loss :: {mean_loss:.3f}, dev acc :: {dev_acc:.3f}, "
              f"{time.perf_counter() - start:.0f} s, {self.runtime.peak_memory()}")
        progress = self.progress
        progress.history.append({"epoch": epoch, "train_loss": mean_loss, "dev_acc": dev_acc, "dev_f1": dev_f1,
                                 "seconds": time.perf_counter() - start, "examples_per_s": n_seen / train_seconds})
        if dev_acc > progress.best_dev_acc:
            progress.best_dev_acc, progress.best_epoch = dev_acc, epoch
            self.save_checkpoint(epoch)
        rngs = self.runtime.gather(rng_state(self.generator, self.runtime.device))
        # after the checkpoint: a state never refers to a checkpoint not yet on disk
        record = {"format": STATE_FORMAT, "training": self.described["training"], "epoch": epoch,
                  "best_dev_acc": progress.best_dev_acc, "best_epoch": progress.best_epoch,
                  "history": progress.history, "scaler": self.scaler.state_dict(), "rng": rngs}
        if self.runtime.shard:
            save_sharded_state(self.files.state, record, self.model, self.optimizer, self.runtime)
        elif self.runtime.is_main:
            save_atomic({**record, "trainable": trainable_state(self.model), "optimizer": self.optimizer.state_dict()},
                        self.files.state)
        if self.runtime.is_main:
            write_text_atomic(self.files.metrics, "".join(json.dumps(entry) + "\n" for entry in progress.history))
        progress.last_epoch = epoch

    def save_checkpoint(self, best_epoch: Optional[int]) -> None:
        """The checkpoint at --filepath, whole: rank 0 writes it (gathered from every process's shards under
        --fsdp, which every process takes part in)."""
        if self.runtime.shard or self.runtime.is_main:
            tensors = trainable_state(self.model)
            if self.runtime.is_main:
                save_checkpoint(tensors, self.described, self.progress.history, best_epoch, self.files.checkpoint)


def accumulate_gradients(model: torch.nn.Module, token_ids: list[list[int]], labels: list[int], weights: list[float],
                         scale: float, pad_id: int, micro_batch: Optional[int], runtime: Runtime,
                         scaler: Optional[torch.amp.GradScaler] = None) -> float:
    """Add to the gradients those of scale * sum(weight * loss) over one step's examples, computed in micro-batches
    of similar lengths of at most micro_batch examples; returns sum(weight * loss). By default (None) a CPU cuts the
    step by its padding (data.micro_batches), since its compute grows with the padded tokens, and a GPU, fastest on
    the whole batch, does not cut it. Under DDP the processes average the gradients once, after the last one."""
    if micro_batch is None and runtime.device.type != "cpu":
        micro_batch = len(token_ids)
    parts = micro_batches([len(t) for t in token_ids], micro_batch)
    if runtime.shard:  # every process runs as many passes as the others: each gathers weights from all of them
        parts = micro_batches([len(t) for t in token_ids], n_parts=runtime.largest(len(parts)))
    loss_sum = 0.0
    for n, part in enumerate(parts):
        last = n == len(parts) - 1
        with runtime.gradient_sync(model, last):
            tokens, lengths = pad_batch([token_ids[i] for i in part], pad_id)
            with runtime.autocast():
                log_probs = model(tokens.to(runtime.device), lengths.to(runtime.device))
            nll = F.nll_loss(log_probs, torch.tensor([labels[i] for i in part], device=runtime.device),
                             reduction="none")  # (micro-batch,)
            part_loss = (nll * torch.tensor([weights[i] for i in part], device=runtime.device)).sum()
            (scaler.scale(part_loss * scale) if scaler else part_loss * scale).backward()
        loss_sum += part_loss.item()
    return loss_sum


def fit(model: torch.nn.Module, train: Split, dev: Split, settings: Settings, pad_id: int, runtime: Runtime,
        described: dict, state: Optional[dict]) -> None:
    """Train for --epochs (from where `state` ended, with --resume); keep the best-dev checkpoint at --filepath
    and, after every epoch, the training state beside it. A signal after an epoch ended says what --resume
    continues from."""
    training = Training(model, settings, described, runtime)
    if state is not None:
        training.resume(state)
    if runtime.world_size > 1:
        print(f"{runtime.world_size} processes x batch {settings.data.batch_size} = effective batch size "
              f"{settings.data.batch_size * runtime.world_size}")
    try:
        for epoch in range(training.progress.last_epoch + 1, settings.training.epochs):
            start = time.perf_counter()
            train_loss, n_seen = training.train_epoch(epoch, train, pad_id)
            training.end_epoch(epoch, dev, pad_id, train_loss, n_seen, start, time.perf_counter() - start)
    except Interrupted as stop:
        if training.progress.last_epoch >= 0:
            stop.progress = f"epochs up to {training.progress.last_epoch} are saved in {training.files.state}"
            stop.resumable = True
        else:
            stop.progress = "no epoch had finished, so nothing was saved; the same command starts again"
        raise
    history = training.progress.history
    if training.progress.best_epoch is None:  # zero epochs: the untrained model is the best
        training.save_checkpoint(None)
    if runtime.is_main and history:
        plot_curves(history, training.files.curves, os.path.basename(training.files.checkpoint))
    runtime.barrier()  # the checkpoint is on disk before any process reads it back


def plot_curves(history: list[dict], path: str, title: str) -> None:
    """Train loss and dev accuracy per epoch, as a PNG, where matplotlib is installed."""
    try:
        import matplotlib
    except ImportError:
        print(f"note: pip install matplotlib (or ./setup.sh --test) to also get the curves in {path}")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = draw_curves(history, title)
    atomic_write(path, lambda f: fig.savefig(f, format="png"))
    plt.close(fig)


def draw_curves(history: list[dict], title: str) -> "Figure":
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = [entry["epoch"] for entry in history]
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(9, 3.5))
    loss_ax.plot(epochs, [entry["train_loss"] for entry in history], marker="o")
    loss_ax.set(xlabel="epoch", ylabel="train loss")
    acc_ax.plot(epochs, [entry["dev_acc"] for entry in history], marker="o", label="accuracy")
    acc_ax.plot(epochs, [entry["dev_f1"] for entry in history], marker="o", label="macro-F1")
    acc_ax.set(xlabel="epoch", ylabel="dev")
    acc_ax.legend()
    for ax in (loss_ax, acc_ax):  # epochs as the log numbers them, a unit of room on each side
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        ax.set_xlim(epochs[0] - 0.5, epochs[-1] + 0.5)
    fig.suptitle(title)
    fig.tight_layout()
    return fig
