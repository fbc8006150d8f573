"""Data as the model reads it: a labeled data file's examples (datafiles.py reads them) or a language-model data
file's rows (lmdata.py) tokenized to fit the model, grouped into batches, micro-batches of similar lengths, and each
process's share of a batch under torchrun."""
import dataclasses
import sys
from typing import Optional

import torch

from datafiles import Example, file_format, read_labeled_data
from lmdata import read_lm_rows, tokenize_lm
from settings import Fields
from tokenizer import Tokenizer
from utils import UsageError


# ---------------------------------------------------------------------------------------------------------
# What the model reads

@dataclasses.dataclass
class Split:
    name: str  # train, dev, test or input
    labels: list[Optional[int]]
    sentences: list[str]
    token_ids: list[list[int]]  # what the model reads, already cut to its window
    lines: Optional[list[int]] = None  # each example's line in an assignment-format file (predictions follow them)
    n_lines: Optional[int] = None  # that file's lines, blank ones included
    named: bool = False  # its labels were given as names: so are its predictions
    fields: Fields = Fields()  # the text and label fields of its file, and of its predictions
    trained_from: Optional[list[int]] = None  # language-model data: each example's first target position

    def counts(self) -> list[int]:
        """What each example adds to a loss's denominator: 1 (its label), or its trained tokens."""
        if self.trained_from is None:
            return [1] * len(self.token_ids)
        return [len(ids) - start for ids, start in zip(self.token_ids, self.trained_from)]


def tokenize(examples: list[Example], tokenizer: Tokenizer, max_seq_len: int,
             max_sentence_len: Optional[int] = None, prompt_suffix: Optional[list[int]] = None,
             label_room: int = 0) -> tuple[list[list[int]], int]:
    """Token ids of each sentence: the tokenizer's prefix (<s>) + sentence + suffix (zero-shot; the label is
    appended later) or prefix + sentence + eos. Only the sentence is ever cut: to max_sentence_len, and to what the
    model's window leaves beside the suffix and the label. Returns the ids and how many sentences the window cut."""
    tail = prompt_suffix if prompt_suffix is not None else [tokenizer.eos_id]
    room = max_seq_len - len(tokenizer.prefix) - len(tail) - label_room
    if room <= 0:
        raise UsageError(f"the prompt and labels need {max_seq_len - room} tokens, more than the model's "
                         f"max_seq_len {max_seq_len}; use shorter --label-names")
    token_ids, n_cut = [], 0
    for example in examples:
        body = tokenizer.encode(example.sentence, bos=False, eos=False)[:max_sentence_len]
        n_cut += len(body) > room
        token_ids.append(tokenizer.prefix + body[:room] + tail)
    return token_ids, n_cut


def load_split(name: str, path: str, label_names: list[str], tokenizer: Tokenizer, max_seq_len: int,
               max_sentence_len: Optional[int] = None, prompt_suffix: Optional[list[int]] = None,
               label_room: int = 0, labels_optional: bool = False, fields: Fields = Fields()) -> Split:
    """Read, check and tokenize one data file (see tokenize); `name` is also its flag (--name)."""
    examples, n_lines, named = read_labeled_data(path, f"--{name}", label_names, labels_optional, fields)
    token_ids, n_cut = tokenize(examples, tokenizer, max_seq_len, max_sentence_len, prompt_suffix, label_room)
    notes = [f"{n_cut} cut to fit {max_seq_len} tokens"] if n_cut else []
    line_aligned = file_format(path) == "txt"
    if n_lines > len(examples) and line_aligned:
        blank = n_lines - len(examples)
        notes.append(f"{blank} blank line{'s' * (blank > 1)} skipped" + (", left blank in the output" if labels_optional
                                                                          else ""))
    print(f"load {len(examples)} data from {path}" + (f" ({'; '.join(notes)})" if notes else ""))
    return Split(name, [e.label for e in examples], [e.sentence for e in examples], token_ids,
                 [e.line for e in examples] if line_aligned else None, n_lines if line_aligned else None, named, fields)


def load_lm_split(name: str, path: str, tokenizer: Tokenizer, window: int, train_on_prompt: bool) -> Split:
    """Read and tokenize one language-model data file (lmdata.py) into examples of at most `window` tokens."""
    kind, rows = read_lm_rows(path, f"--{name}")
    data = tokenize_lm(kind, rows, tokenizer, window, train_on_prompt)
    if data.n_cut:
        print(f"note: {data.n_cut} of {len(rows)} rows of {path} are longer than {window} tokens: their prompts were "
              f"cut from the left (a completion too long alone, at its end)", file=sys.stderr)
    tokens = sum(len(ids) - start for ids, start in zip(data.token_ids, data.trained_from))
    print(f"load {len(data.token_ids)} {kind} examples from {path} ({tokens} trained tokens)")
    return Split(name, [], [], data.token_ids, trained_from=data.trained_from)


def warn_if_labels_unused(splits: list[Split], label_names: list[str], path: str) -> None:
    used = {label for split in splits for label in split.labels}
    if used < set(range(len(label_names))):
        print(f"warning: the data uses labels {sorted(used)} only, but --label-names {path} names "
              f"{len(label_names)}; is it this dataset's mapping?", file=sys.stderr)


# ---------------------------------------------------------------------------------------------------------
# Batching

def make_batches(lengths: list[int], batch_size: int, shuffle: bool,
                 generator: Optional[torch.Generator] = None) -> list[list[int]]:
    """Group example indices into batches. For evaluation (shuffle=False) they are sorted by length, so that little
    padding is computed. For training they are drawn at random, as transformers' Trainer draws them: batches of
    similar lengths (length buckets) cost about .01 of dev accuracy (docs/accuracy.md), so a training step
    saves its padding by micro_batches instead, which leave the step's gradient as it is."""
    if not shuffle:
        by_length = sorted(range(len(lengths)), key=lambda i: lengths[i])
        return [by_length[i:i + batch_size] for i in range(0, len(by_length), batch_size)]
    return [batch.tolist() for batch in torch.randperm(len(lengths), generator=generator).split(batch_size)]


# Length buckets padded about a quarter of a token per real token; micro-batches keep to that.
MAX_PADDING = 0.25


def micro_batches(lengths: list[int], size: Optional[int] = None, n_parts: Optional[int] = None) -> list[list[int]]:
    """One step's examples (given by their lengths) as positions sorted by length and cut into micro-batches of
    even sizes, each padded only to its own longest; the step sums their gradients. With `size`: as few as there
    can be of at most `size` examples; with `n_parts`, that many. Otherwise: as few as keep the padding within
    MAX_PADDING per real token, since
    each micro-batch is a forward and backward pass with a fixed cost of its own (on stories260K, as much as 270
    tokens). A random batch of 32 SST sentences pads 1.1 tokens per real token; cut in 4, 0.23."""
    by_length = sorted(range(len(lengths)), key=lambda i: lengths[i])

    def cut(n_parts: int) -> list[list[int]]:
        bounds = [len(by_length) * part // n_parts for part in range(n_parts + 1)]
        return [by_length[start:end] for start, end in zip(bounds, bounds[1:])]

    if n_parts is not None:
        return cut(n_parts)
    if size is not None:
        return cut(-(-len(by_length) // size))
    real = sum(lengths)
    for n_parts in range(1, len(by_length) + 1):  # n_parts = len(lengths) pads nothing
        parts = cut(n_parts)
        if sum(len(part) * lengths[part[-1]] for part in parts) <= (1 + MAX_PADDING) * real:
            return parts


def shard(indices: list[int], rank: int, world_size: int, equal: bool = False) -> tuple[list[int], list[float]]:
    """One process's share of a global batch and the weight of each example in it: 1, or 0 for the copies that
    fill a batch shorter than world_size, so that every process has work and none is counted twice; with equal,
    copies fill every share to the same size (a sharded model runs each pass in every process at once)."""
    weights = [1.0] * len(indices)
    size = -(-len(indices) // world_size) * world_size if equal else world_size
    if len(indices) < size:
        indices = (indices * size)[:size]
        weights = (weights + [0.0] * size)[:size]
    return indices[rank::world_size], weights[rank::world_size]


def pad_batch(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists into (tokens (batch, max_len), lengths (batch,))."""
    lengths = torch.tensor([len(s) for s in sequences])
    tokens = torch.full((len(sequences), int(lengths.max())), pad_id, dtype=torch.long)
    for row, seq in enumerate(sequences):
        tokens[row, :len(seq)] = torch.tensor(seq, dtype=torch.long)
    return tokens, lengths
