"""Predict labels in input order, measure them (accuracy, macro-F1, confusion matrix), write prediction files."""
import math
from typing import Optional

import torch

from causal_lm import next_token_targets
from data import Split, make_batches, pad_batch
from datafiles import write_examples
from runtime import Runtime
from utils import UsageError


class NonFiniteScores(UsageError):
    """The model's scores overflowed (its precision) or were NaN (its weights)."""


@torch.inference_mode()
def predict(model: torch.nn.Module, split: Split, batch_size: int, pad_id: int, runtime: Runtime) -> torch.Tensor:
    """Log-probabilities of the labels (n_examples, n_labels), in input order; batches are formed by length so
    little padding is computed, and under torchrun each process predicts every world_size-th batch."""
    model.eval()
    lengths = [len(t) for t in split.token_ids]
    batches = runtime.my_batches(make_batches(lengths, batch_size, shuffle=False))
    scored = {}
    for indices in runtime.progress(batches, f"eval {split.name}", leave=False):
        tokens, batch_lengths = pad_batch([split.token_ids[i] for i in indices], pad_id)
        with runtime.autocast():
            log_probs = model(tokens.to(runtime.device), batch_lengths.to(runtime.device))
        scored.update(zip(indices, log_probs.float().cpu()))
    merged = {i: row for part in runtime.gather(scored) for i, row in part.items()}
    log_probs = torch.stack([merged[i] for i in range(len(lengths))])
    broken = (~log_probs.isfinite().all(dim=-1)).nonzero()
    if len(broken):
        first = int(broken[0])
        where = f"line {split.lines[first]}" if split.lines else f"example {first + 1}"
        raise NonFiniteScores(f"the model's scores of {len(broken)} {split.name} examples are NaN or infinite (the first "
                         f"at {where}): {runtime.dtype} overflows in this model or its weights hold NaN; "
                         f"try --dtype fp32")
    return log_probs


@torch.inference_mode()
def lm_loss(model: torch.nn.Module, split: Split, batch_size: int, pad_id: int, runtime: Runtime) -> tuple[float, int]:
    """A language model's summed cross-entropy over a split's trained tokens, and their count; batches are formed
    as predict forms them, and under torchrun each process scores every world_size-th."""
    model.eval()
    counts = split.counts()
    batches = runtime.my_batches(make_batches([len(t) for t in split.token_ids], batch_size, shuffle=False))
    scored = {}
    for indices in runtime.progress(batches, f"eval {split.name}", leave=False):
        tokens, _ = pad_batch([split.token_ids[i] for i in indices], pad_id)
        targets = next_token_targets([split.token_ids[i] for i in indices], [split.trained_from[i] for i in indices],
                                     tokens.shape[1])
        with runtime.autocast():
            losses = model(tokens.to(runtime.device), targets.to(runtime.device)).double().cpu()
        scored.update(zip(indices, (part.sum().item() for part in losses.split([counts[i] for i in indices]))))
    merged = {i: loss for part in runtime.gather(scored) for i, loss in part.items()}  # a repeated batch counts once
    total = sum(merged.values())
    if not math.isfinite(total):
        raise NonFiniteScores(f"the model's {split.name} loss is {total}: {runtime.dtype} overflows in this model or its "
                         f"weights hold NaN; try --dtype fp32")
    return total, sum(counts)


def metrics(labels: list[int], predictions: list[int]) -> tuple[float, float]:
    """Accuracy and macro-F1."""
    # imported here: scikit-learn adds about 80 MB to a process, which generate would carry to its peak
    from sklearn.metrics import accuracy_score, f1_score
    return accuracy_score(labels, predictions), f1_score(labels, predictions, average="macro")


def print_metrics(split: Split, predictions: list[int], label_names: list[str], confusion: bool) -> None:
    acc, f1 = metrics(split.labels, predictions)
    note = ""
    if len(set(split.labels)) == 1:
        note = (f"  (every {split.name} label is {split.labels[0]}: if they are placeholders, as in CFIMDB's test "
                f"file, this accuracy means nothing)")
    print(f"{split.name} acc :: {acc:.3f}  macro-F1 :: {f1:.3f}{note}")
    if confusion:
        from sklearn.metrics import confusion_matrix
        matrix = confusion_matrix(split.labels, predictions, labels=range(len(label_names)))
        width = max(8, *(len(name) + 1 for name in label_names))
        print(f"{split.name} confusion matrix (rows: true label, columns: predicted)")
        print(" " * width + "".join(f"{name:>{width}}" for name in label_names))
        for name, row in zip(label_names, matrix):
            print(f"{name:<{width}}" + "".join(f"{count:>{width}}" for count in row))


def write_predictions(path: str, predictions: list[int], split: Split, label_names: list[str]) -> None:
    """One labeled line or record per example, in input order, in the format that path's extension names (the
    assignment's `<label> ||| <sentence>` otherwise); labels as names where the data gave names."""
    labels = [label_names[p] for p in predictions] if split.named else predictions
    write_examples(path, labels, split.sentences, split.fields, split.lines, split.n_lines)
    print(f"wrote {len(predictions)} predictions to {path}")


def report(model: torch.nn.Module, split: Split, label_names: list[str], batch_size: int, pad_id: int,
           runtime: Runtime, outfile: Optional[str]) -> None:
    """Predict a labeled split, print its metrics (and the dev confusion matrix), write its predictions."""
    predictions = predict(model, split, batch_size, pad_id, runtime).argmax(dim=-1).tolist()
    print_metrics(split, predictions, label_names, confusion=split.name == "dev")
    if outfile and runtime.is_main:
        write_predictions(outfile, predictions, split, label_names)
