"""The one training loop, for full fine-tuning and LoRA alike (they differ only in which parameters require grad),
for classification and the language model alike (the task builds a micro-batch's inputs and its loss), and the
curves it draws.

Each epoch trains on batches drawn at random (a step computes its batch in micro-batches of similar lengths),
evaluates dev, and ends by saving: the best-dev checkpoint when dev improved (accuracy, or the language model's dev
loss; without dev data, every epoch's), then the whole training state (weights or adapters, optimizer, schedule,
progress, every process's random-number generators) for --resume, then the metrics. A step's loss is the sum of its
items' losses (an example's, or a trained token's) over the step's count of items, whatever its micro-batches.
Under torchrun every process draws the same global batches of batch_size * world_size examples (one shared
generator) and trains on its own share, each item weighing 1 / (the global batch's count), so that the gradient
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

from causal_lm import next_token_targets
from checkpoint import (STATE_FORMAT, load_trainable, read_base_shards, rng_state, save_checkpoint, set_rng_state,
                        trainable_state)
from data import Split, make_batches, micro_batches, pad_batch, shard
from evaluate import NonFiniteScores, lm_loss, metrics, predict
from optimizer import AdamW, decay_groups, lr_factor
from runtime import Interrupted, Runtime
from settings import Settings
from sharded import load_sharded_state, save_sharded_state
from utils import UsageError, atomic_write, return_free_memory, save_atomic, signals_deferred, write_text_atomic

if TYPE_CHECKING:  # matplotlib is optional
    from matplotlib.figure import Figure


SHOWN = ("train_loss", "dev_acc", "dev_loss", "dev_perplexity")  # what an epoch's line reports


@dataclasses.dataclass
class Progress:
    """Where a run stands; saved in the state file with the tensors."""
    last_epoch: int = -1  # the last finished epoch
    best_dev_score: float = -math.inf  # dev accuracy, or minus the dev loss: higher is better
    best_epoch: Optional[int] = None
    history: list[dict] = dataclasses.field(default_factory=list)  # one entry per finished epoch


class Training:
    """One run of the loop: the model, what steps it (optimizer, gradient scaler, the batch order's generator)
    and where it stands."""

    def __init__(self, model: torch.nn.Module, settings: Settings, described: dict, runtime: Runtime, n_train: int):
        self.model, self.settings, self.described, self.runtime = model, settings, described, runtime
        self.files = settings.training.files
        self.trainer = runtime.parallel(model, model.llama.layers)
        if runtime.shard:  # its base waited on the meta device (run_llama.train): each process reads its own rows
            read_base_shards(model.llama, settings.model.model)
        training = settings.training
        self.optimizer = AdamW(decay_groups(model.named_parameters(), training.weight_decay), lr=training.lr)
        steps_per_epoch = -(-n_train // (settings.data.batch_size * runtime.world_size))
        self.schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_factor(
            training.lr_scheduler, training.warmup_steps, training.epochs * steps_per_epoch))
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
            if "schedule" in state:  # states saved before schedules existed were constant
                self.schedule.load_state_dict(state["schedule"])
        except (KeyError, ValueError, RuntimeError, TypeError) as e:
            raise UsageError(f"--resume {self.files.state}: its optimizer state does not fit this model ({e}); "
                             f"delete it and train again") from e
        # another number of processes (the same global batch) draws the same batches; dropout draws other masks
        set_rng_state(state["rng"][self.runtime.rank % len(state["rng"])], self.generator, self.runtime.device,
                      self.files.state)
        self.progress = Progress(state["epoch"], state["best_dev_score"], state["best_epoch"], state["history"])
        print(f"resumed from {self.files.state} after epoch {state['epoch']}")

    def train_epoch(self, epoch: int, train: Split, pad_id: int) -> tuple[float, int, int]:
        """One pass over the training set: (summed loss, items counted, examples seen)."""
        runtime, global_batch = self.runtime, self.settings.data.batch_size * self.runtime.world_size
        self.trainer.train()
        batches = make_batches([len(t) for t in train.token_ids], global_batch, shuffle=True, generator=self.generator)
        bar = runtime.progress(batches, f"train-{epoch}")
        counts = train.counts()
        total_loss, n_counted, n_seen, start = 0.0, 0, 0, time.perf_counter()
        for step, indices in enumerate(bar):
            mine, weights = shard(indices, runtime.rank, runtime.world_size, equal=runtime.shard)
            step_count = sum(counts[i] for i in indices)  # the global batch's: every process draws the same
            self.optimizer.zero_grad(set_to_none=True)
            # DDP averages over processes, hence world_size / (global count) rather than 1 / (own share's)
            loss_sum = accumulate_gradients(self.trainer, train, mine, weights, runtime.world_size / step_count,
                                            pad_id, self.settings.training.micro_batch_size, runtime, self.scaler)
            batch_loss = runtime.sum(loss_sum)  # over all processes; NaN anywhere stops all, before the step
            self.check_finite("training loss", batch_loss, f"at epoch {epoch}, step {step}")
            self.clip_gradients(epoch, step)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.schedule.step()
            if not self.memory_reported:
                self.report_memory()
            total_loss += batch_loss
            n_counted += step_count
            n_seen += len(indices)
            bar.set_postfix(loss=f"{total_loss / n_counted:.3f}", ex_per_s=f"{n_seen / (time.perf_counter() - start):.1f}")
        return total_loss, n_counted, n_seen

    def check_finite(self, what: str, value: float, when: str) -> None:
        if not math.isfinite(value):
            saved = (f"; the best checkpoint so far is kept in {self.files.checkpoint}"
                     if self.progress.best_epoch is not None else "")
            raise UsageError(f"{what} became {value} {when}; lower --lr{saved}")

    def clip_gradients(self, epoch: int, step: int) -> None:
        """--max_grad_norm: scale the gradients (all processes' together) to that norm at most, as torch's
        clip_grad_norm_. Under fp16 an infinite norm is the gradient scaler's to skip; otherwise it stops the run."""
        max_norm = self.settings.training.max_grad_norm
        if not max_norm:
            return
        self.scaler.unscale_(self.optimizer)
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # a DTensor under --fsdp
        if not self.scaler.is_enabled():
            self.check_finite("the gradient norm", norm, f"at epoch {epoch}, step {step}")

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

    def end_epoch(self, epoch: int, dev: Optional[Split], pad_id: int, train_loss: float, n_counted: int,
                  n_seen: int, start: float, train_seconds: float) -> None:
        """Evaluate dev, then report and save: the checkpoint if dev improved, the state, the metrics. Reporting
        and saving are one unit that Ctrl-C or SIGTERM cannot split: a signal that arrives during it takes
        effect once the state covers this epoch."""
        entry = {"epoch": epoch, "train_loss": train_loss / max(n_counted, 1)}
        if dev is not None:
            try:
                entry.update(dev_metrics(self.model, dev, self.settings.data.batch_size, pad_id, self.runtime))
            except NonFiniteScores:  # the epoch's last steps broke the weights: the loss had no step left to show it
                self.check_finite("the dev scores", math.nan, f"after the last step of epoch {epoch}")
        with signals_deferred():
            self._save_epoch(entry, n_seen, start, train_seconds)

    def _save_epoch(self, entry: dict, n_seen: int, start: float, train_seconds: float) -> None:
        epoch, seconds = entry["epoch"], time.perf_counter() - start
        shown = [f"{key.replace('_', ' ')} :: {entry[key]:.3f}" for key in SHOWN if key in entry]
        print(f"epoch {epoch}: {', '.join(shown)}, {seconds:.0f} s, {self.runtime.peak_memory()}")
        progress = self.progress
        progress.history.append({**entry, "seconds": seconds, "examples_per_s": n_seen / train_seconds})
        score = entry["dev_acc"] if "dev_acc" in entry else -entry["dev_loss"] if "dev_loss" in entry else None
        if score is None or score > progress.best_dev_score:  # without dev data the last epoch is kept
            progress.best_dev_score, progress.best_epoch = -math.inf if score is None else score, epoch
            self.save_checkpoint(epoch)
        rngs = self.runtime.gather(rng_state(self.generator, self.runtime.device))
        # after the checkpoint: a state never refers to a checkpoint not yet on disk
        record = {"format": STATE_FORMAT, "training": self.described["training"], "epoch": epoch,
                  "best_dev_score": progress.best_dev_score, "best_epoch": progress.best_epoch,
                  "history": progress.history, "scaler": self.scaler.state_dict(),
                  "schedule": self.schedule.state_dict(), "rng": rngs}
        if self.runtime.shard:
            save_sharded_state(self.files.state, record, self.model, self.optimizer)
        elif self.runtime.is_main:
            save_atomic({**record, "trainable": trainable_state(self.model), "optimizer": self.optimizer.state_dict()},
                        self.files.state)
        if self.runtime.is_main:
            write_text_atomic(self.files.metrics, "".join(json.dumps(entry) + "\n" for entry in progress.history))
        progress.last_epoch = epoch

    def save_checkpoint(self, best_epoch: Optional[int]) -> None:
        """The checkpoint at --filepath: rank 0 writes it, or under --fsdp every process its shards of it."""
        if self.runtime.shard or self.runtime.is_main:
            save_checkpoint(self.model, self.described, self.progress.history, best_epoch, self.files.checkpoint)


def accumulate_gradients(model: torch.nn.Module, split: Split, indices: list[int], weights: list[float],
                         scale: float, pad_id: int, micro_batch: Optional[int], runtime: Runtime,
                         scaler: Optional[torch.amp.GradScaler] = None) -> float:
    """Add to the gradients those of scale * sum(weight * loss) over one step's examples (split's at indices; a
    language model's loss of an example is the sum over its trained tokens), computed in micro-batches of similar
    lengths of at most micro_batch examples (None: as few as keep the padding small, data.micro_batches; flag_settings.py
    decides the default); returns sum(weight * loss). Under DDP the processes average the gradients once, after the
    last one."""
    lengths = [len(split.token_ids[i]) for i in indices]
    parts = micro_batches(lengths, micro_batch)
    if runtime.shard:  # every process runs as many passes as the others: each gathers weights from all of them
        parts = micro_batches(lengths, n_parts=runtime.largest(len(parts)))
    loss_sum = 0.0
    for n, part in enumerate(parts):
        with runtime.gradient_sync(model, n == len(parts) - 1):
            with runtime.autocast():
                part_loss = summed_loss(model, split, [indices[i] for i in part], [weights[i] for i in part], pad_id,
                                        runtime.device)
            (scaler.scale(part_loss * scale) if scaler else part_loss * scale).backward()
        loss_sum += part_loss.item()
    return_free_memory()  # the step's activations: else each thread's heap keeps its own (see utils)
    return loss_sum


def summed_loss(model: torch.nn.Module, split: Split, indices: list[int], weights: list[float], pad_id: int,
                device: torch.device) -> torch.Tensor:
    """sum(weight * loss) of some examples: a classifier's cross-entropy of each label, or a language model's of
    each trained token (an example's weight on each of its tokens)."""
    tokens, lengths = pad_batch([split.token_ids[i] for i in indices], pad_id)
    if split.trained_from is None:
        log_probs = model(tokens.to(device), lengths.to(device))
        losses = F.nll_loss(log_probs, torch.tensor([split.labels[i] for i in indices], device=device),
                            reduction="none")  # (examples,)
        token_weights = torch.tensor(weights, device=device)
    else:
        targets = next_token_targets([split.token_ids[i] for i in indices], [split.trained_from[i] for i in indices],
                                     tokens.shape[1])
        losses = model(tokens.to(device), targets.to(device))  # (trained tokens,), row by row
        counts = [len(split.token_ids[i]) - split.trained_from[i] for i in indices]
        token_weights = torch.tensor(weights).repeat_interleave(torch.tensor(counts)).to(device)
    return (losses * token_weights).sum()


def dev_metrics(model: torch.nn.Module, dev: Split, batch_size: int, pad_id: int, runtime: Runtime) -> dict[str, float]:
    """dev_acc and dev_f1 of a classifier, dev_loss (per trained token) and dev_perplexity of a language model."""
    if dev.trained_from is None:
        predictions = predict(model, dev, batch_size, pad_id, runtime).argmax(-1).tolist()
        acc, f1 = metrics(dev.labels, predictions)
        return {"dev_acc": acc, "dev_f1": f1}
    loss_sum, count = lm_loss(model, dev, batch_size, pad_id, runtime)
    return {"dev_loss": loss_sum / count, "dev_perplexity": math.exp(min(loss_sum / count, 700.0))}


def fit(model: torch.nn.Module, train: Split, dev: Optional[Split], settings: Settings, pad_id: int,
        runtime: Runtime, described: dict, state: Optional[dict]) -> None:
    """Train for --epochs (from where `state` ended, with --resume); keep the best-dev checkpoint (without dev, the
    last epoch's) at --filepath and, after every epoch, the training state beside it. A signal after an epoch ended
    says what --resume continues from."""
    training = Training(model, settings, described, runtime, len(train.token_ids))
    if state is not None:
        training.resume(state)
    if runtime.world_size > 1:
        print(f"{runtime.world_size} processes x batch {settings.data.batch_size} = effective batch size "
              f"{settings.data.batch_size * runtime.world_size}")
    try:
        for epoch in range(training.progress.last_epoch + 1, settings.training.epochs):
            start = time.perf_counter()
            train_loss, n_counted, n_seen = training.train_epoch(epoch, train, pad_id)
            training.end_epoch(epoch, dev, pad_id, train_loss, n_counted, n_seen, start, time.perf_counter() - start)
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
    """Train loss (and a language model's dev loss) per epoch beside a classifier's dev accuracy and macro-F1, or a
    language model's dev perplexity."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = [entry["epoch"] for entry in history]
    fig, (loss_ax, dev_ax) = plt.subplots(1, 2, figsize=(9, 3.5))
    curves = {loss_ax: [("train_loss", "train"), ("dev_loss", "dev")],
              dev_ax: [("dev_acc", "accuracy"), ("dev_f1", "macro-F1"), ("dev_perplexity", "perplexity")]}
    for ax, keys in curves.items():
        for key, label in keys:
            if key in history[0]:
                ax.plot(epochs, [entry[key] for entry in history], marker="o", label=label)
        if ax.lines:
            ax.legend()
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))  # epochs as the log numbers them
        ax.set_xlim(epochs[0] - 0.5, epochs[-1] + 0.5)  # a unit of room on each side
    loss_ax.set(xlabel="epoch", ylabel="loss")
    dev_ax.set(xlabel="epoch", ylabel="dev")
    fig.suptitle(title)
    fig.tight_layout()
    return fig
