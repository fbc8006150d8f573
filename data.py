"""Labeled data: read and check `<label> ||| <sentence>` files and label names, tokenize them to fit the model,
and group them into batches, micro-batches of similar lengths, and each process's share of a batch under torchrun."""
import codecs
import dataclasses
import json
import sys
from typing import NamedTuple, Optional

import torch

from tokenizer import Tokenizer
from utils import UsageError, require_file


class Example(NamedTuple):
    line: int  # its line in the file, from 1
    label: Optional[int]  # None for a bare sentence
    sentence: str


def read_lines(path: str, flag: str) -> list[str]:
    """The lines of a UTF-8 text file (or of standard input for "-"), without a byte-order mark. Lines end at
    \n or \r\n only: a lone \r inside a line is part of it, as a text editor that shows one line sees it."""
    if path == "-":
        if sys.stdin is None:
            raise UsageError(f"{flag} -: standard input is closed; pipe the sentences in, or pass a file")
        raw = sys.stdin.buffer.read()
    else:
        require_file(flag, path, "run ./setup.sh to fetch the data, or fix the path")
        with open(path, "rb") as f:
            raw = f.read()
    raw = raw.removeprefix(codecs.BOM_UTF8)  # Notepad writes one
    chunks = raw.split(b"\n")
    if chunks[-1] == b"":
        chunks.pop()  # the newline at the end of the file ends the last line; it starts no new one
    lines = []
    for line_no, line in enumerate(chunks, start=1):
        try:
            lines.append(line.removesuffix(b"\r").decode("utf-8"))
        except UnicodeDecodeError as e:
            raise UsageError(f"{flag} {path}, line {line_no}: not UTF-8 ({e.reason} at byte {e.start}); "
                             f"re-save the file as UTF-8") from e
    return lines


def read_labeled_data(path: str, flag: str, labels_optional: bool = False) -> tuple[list[Example], int]:
    """The examples of `<label> ||| <sentence>` lines, and how many lines the file has; blank lines hold none.
    With labels_optional, bare sentences are read too, with label None (all lines alike: labeled or not)."""
    examples = []
    form = "a sentence or '<label> ||| <sentence>'" if labels_optional else "'<label> ||| <sentence>'"
    lines = read_lines(path, flag)
    for line_no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        label_text, sep, sentence = line.partition(" ||| ")
        try:
            label = int(label_text) if sep else None
        except ValueError:
            label = None
        if label is None:
            if not labels_optional:
                problem = (f"label {label_text.strip()!r} is not an integer" if sep else
                           f"no ' ||| ' separator; each line must be {form}")
                raise UsageError(f"{flag} {path}, line {line_no}: {problem}")
            sentence = line
        if examples and (label is None) != (examples[0].label is None):
            raise UsageError(f"{flag} {path}, line {line_no}: some lines have a '<label> ||| ' and some do not; "
                             f"label every line or none")
        examples.append(Example(line_no, label, sentence.strip()))
    if not examples:
        raise UsageError(f"{flag} {path}: the file has no examples; each line must be {form}")
    return examples, len(lines)


def read_label_names(path: str) -> list[str]:
    """The label-mapping JSON: a list of distinct names, the i-th naming label i."""
    require_file("--label-names", path, "run ./setup.sh, or fix the path")
    try:
        with open(path, encoding="utf-8-sig") as f:
            names = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise UsageError(f"--label-names {path}: not valid JSON ({e}); it must be a list like [\"bad\", \"good\"]") from e
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n.strip() for n in names):
        raise UsageError(f"--label-names {path}: must be a JSON list of non-empty strings, like [\"bad\", \"good\"]")
    stripped = [n.strip() for n in names]
    duplicates = sorted({n for n in stripped if stripped.count(n) > 1})
    if duplicates:
        raise UsageError(f"--label-names {path}: {duplicates[0]!r} is listed twice; each label needs its own name")
    return names


def check_labels(examples: list[Example], n_labels: int, flag: str, path: str) -> None:
    for example in examples:
        if not 0 <= example.label < n_labels:
            raise UsageError(f"{flag} {path}, line {example.line}: label {example.label} is outside "
                             f"0..{n_labels - 1}, the labels that --label-names names; pass the label mapping of "
                             f"this dataset")


# ---------------------------------------------------------------------------------------------------------
# What the model reads

@dataclasses.dataclass
class Split:
    name: str  # train, dev, test or input
    labels: list[Optional[int]]
    sentences: list[str]
    token_ids: list[list[int]]  # what the model reads, already cut to its window
    lines: Optional[list[int]] = None  # each example's line in its file (prediction files follow them)
    n_lines: Optional[int] = None  # the file's lines, blank ones included


def tokenize(examples: list[Example], tokenizer: Tokenizer, max_seq_len: int,
             max_sentence_len: Optional[int] = None, prompt_suffix: Optional[list[int]] = None,
             label_room: int = 0) -> tuple[list[list[int]], int]:
    """Token ids of each sentence: bos + sentence + suffix (zero-shot; the label is appended later) or
    bos + sentence + eos. Only the sentence is ever cut: to max_sentence_len, and to what the model's window
    leaves beside the suffix and the label. Returns the ids and how many sentences the window cut."""
    tail = prompt_suffix if prompt_suffix is not None else [tokenizer.eos_id]
    room = max_seq_len - 1 - len(tail) - label_room
    if room <= 0:
        raise UsageError(f"the prompt and labels need {max_seq_len - room} tokens, more than the model's "
                         f"max_seq_len {max_seq_len}; use shorter --label-names")
    token_ids, n_cut = [], 0
    for example in examples:
        body = tokenizer.encode(example.sentence, bos=False, eos=False)[:max_sentence_len]
        n_cut += len(body) > room
        token_ids.append([tokenizer.bos_id] + body[:room] + tail)
    return token_ids, n_cut


def load_split(name: str, path: str, n_labels: int, tokenizer: Tokenizer, max_seq_len: int,
               max_sentence_len: Optional[int] = None, prompt_suffix: Optional[list[int]] = None,
               label_room: int = 0, labels_optional: bool = False) -> Split:
    """Read, check and tokenize one data file (see tokenize); `name` is also its flag (--name)."""
    flag = f"--{name}"
    examples, n_lines = read_labeled_data(path, flag, labels_optional)
    if examples[0].label is not None:
        check_labels(examples, n_labels, flag, path)
    token_ids, n_cut = tokenize(examples, tokenizer, max_seq_len, max_sentence_len, prompt_suffix, label_room)
    notes = [f"{n_cut} cut to fit {max_seq_len} tokens"] if n_cut else []
    if n_lines > len(examples):
        blank = n_lines - len(examples)
        notes.append(f"{blank} blank line{'s' * (blank > 1)} skipped" + (", left blank in the output" if labels_optional
                                                                          else ""))
    print(f"load {len(examples)} data from {path}" + (f" ({'; '.join(notes)})" if notes else ""))
    return Split(name, [e.label for e in examples], [e.sentence for e in examples], token_ids,
                 [e.line for e in examples], n_lines)


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
    similar lengths (length buckets) cost about .01 of dev accuracy (README "Accuracy parity"), so a training step
    saves its padding by micro_batches instead, which leave the step's gradient as it is."""
    if not shuffle:
        by_length = sorted(range(len(lengths)), key=lambda i: lengths[i])
        return [by_length[i:i + batch_size] for i in range(0, len(by_length), batch_size)]
    return [batch.tolist() for batch in torch.randperm(len(lengths), generator=generator).split(batch_size)]


# Length buckets padded about a quarter of a token per real token; micro-batches keep to that.
MAX_PADDING = 0.25


def micro_batches(lengths: list[int], size: Optional[int] = None) -> list[list[int]]:
    """One step's examples (given by their lengths) as positions sorted by length and cut into micro-batches of
    even sizes, each padded only to its own longest; the step sums their gradients. With `size`: as few as there
    can be of at most `size` examples. Without: as few as keep the padding within MAX_PADDING per real token, since
    each micro-batch is a forward and backward pass with a fixed cost of its own (on stories260K, as much as 270
    tokens). A random batch of 32 SST sentences pads 1.1 tokens per real token; cut in 4, 0.23."""
    by_length = sorted(range(len(lengths)), key=lambda i: lengths[i])

    def cut(n_parts: int) -> list[list[int]]:
        bounds = [len(by_length) * part // n_parts for part in range(n_parts + 1)]
        return [by_length[start:end] for start, end in zip(bounds, bounds[1:])]

    if size is not None:
        return cut(-(-len(by_length) // size))
    real = sum(lengths)
    for n_parts in range(1, len(by_length) + 1):  # n_parts = len(lengths) pads nothing
        parts = cut(n_parts)
        if sum(len(part) * lengths[part[-1]] for part in parts) <= (1 + MAX_PADDING) * real:
            return parts


def shard(indices: list[int], rank: int, world_size: int) -> tuple[list[int], list[float]]:
    """One process's share of a global batch and the weight of each example in it: 1, or 0 for the copies that
    fill a batch shorter than world_size, so that every process has work and none is counted twice."""
    weights = [1.0] * len(indices)
    if len(indices) < world_size:
        indices = (indices * world_size)[:world_size]
        weights = (weights + [0.0] * world_size)[:world_size]
    return indices[rank::world_size], weights[rank::world_size]


def pad_batch(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists into (tokens (batch, max_len), lengths (batch,))."""
    lengths = torch.tensor([len(s) for s in sequences])
    tokens = torch.full((len(sequences), int(lengths.max())), pad_id, dtype=torch.long)
    for row, seq in enumerate(sequences):
        tokens[row, :len(seq)] = torch.tensor(seq, dtype=torch.long)
    return tokens, lengths
