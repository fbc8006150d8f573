"""Dev accuracy of our fine-tuning against transformers' on the same recipe, over several seeds
(docs/accuracy.md). Minutes per task on a CPU, so a script rather than a test:

  .venv/bin/python -m bench.parity --task sst2 --seeds 5            # binary SST: 800 train sentences, all of dev
  .venv/bin/python -m bench.parity --task sst5 --seeds 5 --variants ours,transformers
  .venv/bin/python -m bench.parity --task cfimdb --seeds 5 --variants ours,transformers

Every variant starts from the same pretrained weights (stories260K by default) and trains with one loop: the
step of train.Training for one process (train.accumulate_gradients: mean cross-entropy per batch, one optimizer
step per batch), so that a variant differs from "ours" in exactly the one thing its name says (transformers'
model computes the same gradients as ours to 1e-7 on the same batch: tests/test_classifier.py):

  ours               our classifier (its head is transformers': no bias, N(0, 0.02)), our AdamW, our batches
                     (drawn at random, each step in micro-batches of similar lengths)
  ours-random        ... but each batch computed whole, padded to its longest (no micro-batches)
  ours-buckets       ... but length buckets (issue 22's first answer): the examples shuffled, sorted by length
                     within chunks of --chunk-batches batches (default: 8, at most a quarter of the epoch)
  ours-buckets50     ... but the length buckets before issue 22 (chunks of 50 batches)
  ours-noisy         ... but length buckets of each length times 1 + U(0, --length-noise)
  ours-bias-head     ... but the head before issue 22: with a bias, nn.Linear's initialisation
  ours-torch-adamw   ... but torch.optim.AdamW with its defaults (eps 1e-8, weight decay 0.01)
  transformers       LlamaForSequenceClassification, torch.optim.AdamW, our batches computed whole

Rounds before the micro-batches (results/parity-*.txt from before 2026-11-29) ran with length buckets as
ours' batches: their "ours" rows are ours-buckets here, their ours-bias-head and ours-torch-adamw rows had buckets.

Reported per variant: dev accuracy after the last epoch for each seed, their mean and standard error, padded
tokens per real token of the training batches, and training seconds per epoch. transformers is a test extra
(./setup.sh --test).
"""
import argparse
import dataclasses
import os
import statistics
import sys
import time
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from classifier import build_classifier
from data import Split, make_batches, micro_batches, tokenize
from datafiles import Example, read_labeled_data
from evaluate import predict
from llama import Llama, load_pretrained
from optimizer import AdamW
from runtime import Runtime, seed_everything
from tokenizer import Tokenizer
from train import accumulate_gradients
from bench.oracle import transformers_config, transformers_weights
from utils import ArgumentParser, UsageError, exit_status, require_extra, require_file, require_positive


@dataclasses.dataclass(frozen=True)
class Task:
    train: str
    dev: str
    n_labels: int
    epochs: int
    lr: float
    batch_size: int
    binary: bool = False  # SST's five labels folded into negative / positive, neutral dropped
    n_train: int = 0  # 0: every example; else a fixed random sample with as many of each label (dev: all)


TASKS = {
    "sst2": Task("data/sst-train.txt", "data/sst-dev.txt", 2, epochs=3, lr=1e-3, batch_size=32, binary=True,
                 n_train=800),
    "sst5": Task("data/sst-train.txt", "data/sst-dev.txt", 5, epochs=5, lr=1e-3, batch_size=80),
    "cfimdb": Task("data/cfimdb-train.txt", "data/cfimdb-dev.txt", 2, epochs=5, lr=2e-5, batch_size=10),
}
VARIANTS = ["ours", "ours-random", "ours-buckets", "ours-buckets50", "ours-noisy", "ours-bias-head", "ours-torch-adamw",
            "transformers"]
WHOLE_BATCHES = ("ours-random", "ours-buckets", "ours-buckets50", "ours-noisy", "transformers")


def load(path: str, task: Task, n: int, tokenizer: Tokenizer, max_seq_len: int) -> Split:
    examples = read_labeled_data(path, path).examples
    if task.binary:
        examples = [Example(e.line, int(e.label > 2), e.sentence) for e in examples if e.label != 2]
    if n:  # the files are grouped by label: their first lines would be one class
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(0)).tolist()
        per_label = n // task.n_labels
        examples = [e for label in range(task.n_labels) for e in [examples[i] for i in order
                                                                   if examples[i].label == label][:per_label]]
    token_ids, _ = tokenize(examples, tokenizer, max_seq_len)
    return Split(path, [e.label for e in examples], [e.sentence for e in examples], token_ids)


def bucket_batches(lengths: list[float], batch_size: int, generator: torch.Generator,
                   chunk_batches: Optional[int]) -> list[list[int]]:
    """Length buckets: the examples shuffled, cut into chunks of chunk_batches batches, each chunk sorted by length
    and cut into batches, the batches shuffled."""
    if chunk_batches is None:
        chunk_batches = max(1, min(8, len(lengths) // (4 * batch_size)))
    order = torch.randperm(len(lengths), generator=generator).tolist()
    chunk = batch_size * chunk_batches
    batches = []
    for start in range(0, len(order), chunk):
        by_length = sorted(order[start:start + chunk], key=lambda i: lengths[i])
        batches += [by_length[i:i + batch_size] for i in range(0, len(by_length), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


class TransformersClassifier(torch.nn.Module):
    """transformers' LlamaForSequenceClassification on our weights, returning log-probabilities like ours."""

    def __init__(self, llama: Llama, n_labels: int, pad_id: int):
        super().__init__()
        from transformers import LlamaForSequenceClassification

        self.hf = LlamaForSequenceClassification(transformers_config(llama.config, num_labels=n_labels,
                                                                     pad_token_id=pad_id, attn_implementation="sdpa"))
        self.hf.model.load_state_dict(transformers_weights(llama))

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        mask = (torch.arange(tokens.shape[1])[None] < lengths[:, None]).long()
        return F.log_softmax(self.hf(input_ids=tokens, attention_mask=mask).logits.float(), dim=-1)


def build(variant: str, llama: Llama, task: Task, pad_id: int, seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The variant's classifier and optimizer. Every bias-free head starts from the same draw for a seed, ours and
    transformers' alike: which head a seed draws moves dev accuracy by several points, far more than any other
    difference here, so unmatched draws would hide what is compared."""
    if variant == "transformers":
        model = TransformersClassifier(llama, task.n_labels, pad_id)
        head = model.hf.score
    else:
        model = build_classifier(llama, task.n_labels, hidden_dropout_prob=0.0, lora=None)
        head = model.classifier_head
        if variant == "ours-bias-head":
            model.classifier_head = torch.nn.Linear(llama.config.dim, task.n_labels)
    if head.bias is None:
        with torch.no_grad():
            head.weight.normal_(0.0, 0.02, generator=torch.Generator().manual_seed(seed))
    params = [p for p in model.parameters() if p.requires_grad]
    if variant in ("transformers", "ours-torch-adamw"):
        return model, torch.optim.AdamW(params, lr=task.lr)
    return model, AdamW(params, lr=task.lr)


def batcher(variant: str, task: Task, args: argparse.Namespace) -> Callable[[list[int], torch.Generator],
                                                                          list[list[int]]]:
    if variant == "ours-noisy":
        def noisy_batches(lengths: list[int], g: torch.Generator) -> list[list[int]]:
            noise = torch.rand(len(lengths), generator=g).tolist()
            keys = [length * (1 + args.length_noise * u) for length, u in zip(lengths, noise)]
            return bucket_batches(keys, task.batch_size, g, args.chunk_batches)
        return noisy_batches
    if variant in ("ours-buckets", "ours-buckets50"):
        chunk_batches = 50 if variant == "ours-buckets50" else args.chunk_batches
        return lambda lengths, g: bucket_batches(lengths, task.batch_size, g, chunk_batches)
    return lambda lengths, g: make_batches(lengths, task.batch_size, shuffle=True, generator=g)


def run(variant: str, task: Task, seed: int, args: argparse.Namespace, train: Split, dev: Split,
        pad_id: int) -> tuple[float, float, float]:
    """One training run: (dev accuracy after the last epoch, padded tokens per real token, seconds per epoch)."""
    seed_everything(seed)
    model, optimizer = build(variant, load_pretrained(args.checkpoint), task, pad_id, seed)
    generator = torch.Generator().manual_seed(seed)
    make = batcher(variant, task, args)
    lengths = [len(t) for t in train.token_ids]
    cpu = Runtime(torch.device("cpu"), None)
    padded, seconds = 0, 0.0
    for _ in range(task.epochs):
        model.train()
        start = time.perf_counter()
        for indices in make(lengths, generator):
            micro_batch = len(indices) if variant in WHOLE_BATCHES else args.micro_batch_size
            optimizer.zero_grad(set_to_none=True)
            accumulate_gradients(model, train, indices, [1.0] * len(indices), 1 / len(indices), pad_id, micro_batch,
                                 cpu)
            optimizer.step()
            padded += sum(len(part) * max(lengths[indices[i]] for i in part)
                          for part in micro_batches([lengths[i] for i in indices], micro_batch))
        seconds += time.perf_counter() - start
    with torch.no_grad():
        predictions = predict(model, dev, 64, pad_id, cpu).argmax(-1)
    accuracy = (predictions == torch.tensor(dev.labels)).float().mean().item()
    return accuracy, padded / (sum(lengths) * task.epochs) - 1, seconds / task.epochs


def main() -> None:
    parser = ArgumentParser(prog="python -m bench.parity", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=TASKS, default="sst2")
    parser.add_argument("--seeds", type=int, default=5, help="how many seeds: first-seed, first-seed + 1, ...")
    parser.add_argument("--first-seed", type=int, default=1,
                        help="the first seed (to add seeds to an earlier run: its seeds are deterministic)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--checkpoint", default="stories260K.pt")
    parser.add_argument("--tokenizer", default="tok512.model")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--chunk-batches", type=int, default=None,
                        help="ours-buckets, ours-noisy: batches per sorted chunk (default: 8, at most a quarter of the epoch)")
    parser.add_argument("--micro-batch-size", type=int, default=None,
                        help="ours and its head and optimizer variants: examples per micro-batch (default: as "
                             "run_llama.py's, cut by padding)")
    parser.add_argument("--length-noise", type=float, default=0.5, help="ours-noisy: the noise's width")
    args = parser.parse_args()
    require_positive({"--seeds": args.seeds, "--threads": args.threads, "--chunk-batches": args.chunk_batches,
                      "--micro-batch-size": args.micro_batch_size})
    if args.length_noise < 0:
        raise UsageError(f"--length-noise {args.length_noise}: give a width of at least 0")
    variants = args.variants.split(",")
    for v in variants:
        if v not in VARIANTS:
            raise UsageError(f"--variants: unknown {v!r}; choose from {', '.join(VARIANTS)}")
    if "transformers" in variants:
        require_extra("transformers", "bench/parity.py's transformers variant")
    task = TASKS[args.task]
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    if not os.path.isdir(args.checkpoint):  # a folder is a Hugging Face model
        require_file("--checkpoint", args.checkpoint, "run ./setup.sh, or pass a llama2.c .pt or .bin file")
    tokenizer = Tokenizer(args.tokenizer)
    config = load_pretrained(args.checkpoint).config
    tokenizer.check_vocab(config.vocab_size, args.checkpoint)
    train = load(task.train, task, task.n_train, tokenizer, config.max_seq_len)
    dev = load(task.dev, task, 0, tokenizer, config.max_seq_len)
    torch.set_num_threads(args.threads)
    print(f"{args.task}: {len(train.labels)} train / {len(dev.labels)} dev, {task.epochs} epochs, lr {task.lr}, "
          f"batch {task.batch_size}, seeds {seeds[0]}-{seeds[-1]}, {args.checkpoint}", flush=True)
    print("| variant | dev accuracy per seed | mean | std. error | padding per real token | s per epoch |")
    print("| --- | --- | ---: | ---: | ---: | ---: |", flush=True)
    for variant in variants:
        runs = []
        for seed in seeds:
            runs.append(run(variant, task, seed, args, train, dev, tokenizer.pad_id))
            print(f"{variant}, seed {seed}: dev accuracy {runs[-1][0]:.3f}", file=sys.stderr, flush=True)
        accs = [r[0] for r in runs]
        stderr = statistics.stdev(accs) / len(accs) ** 0.5 if len(accs) > 1 else float("nan")
        print(f"| {variant} | {' '.join(f'{a:.3f}' for a in accs)} | {statistics.mean(accs):.3f} | {stderr:.3f} "
              f"| {statistics.mean(r[1] for r in runs):.2f} | {statistics.median(r[2] for r in runs):.1f} |",
              flush=True)


if __name__ == "__main__":
    sys.exit(exit_status(main))
