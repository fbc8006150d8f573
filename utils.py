"""Small shared pieces: the user-facing error type, seeding, where and how to run (device, precision,
processes), atomic file writes, data files and batching."""
import dataclasses
import json
import math
import os
import random
import tempfile
from contextlib import nullcontext
from typing import Any, Callable, ContextManager, Optional

import numpy as np
import torch


class UsageError(Exception):
    """A problem with the user's input (a file, a flag, a value). The message names the culprit and the fix;
    run_llama.main() prints it on one line and exits with status 2."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds CUDA too


DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclasses.dataclass
class Runtime:
    """Where and how this process runs: its device, its autocast precision, and its place among the processes
    that torchrun started (rank 0 of 1 without torchrun)."""
    device: torch.device
    amp_dtype: Optional[torch.dtype] = None  # None: plain fp32
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self) -> ContextManager:
        return torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype else nullcontext()

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()

    def all_finite(self, value: float) -> bool:
        """Whether value is finite in every process, so that all of them stop together when one cannot go on."""
        if self.world_size == 1:
            return math.isfinite(value)
        flag = torch.tensor([float(math.isfinite(value))], device=self.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        return bool(flag.item())

    def gather(self, obj: Any) -> list[Any]:
        """Every process's obj, in rank order."""
        if self.world_size == 1:
            return [obj]
        gathered = [None] * self.world_size
        torch.distributed.all_gather_object(gathered, obj)
        return gathered


def start_runtime(use_gpu: bool, dtype: str) -> Runtime:
    """Plain `python run_llama.py` runs one process; under torchrun (WORLD_SIZE > 1) join the process group,
    gloo on CPU and NCCL on CUDA, one GPU per process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = get_device(use_gpu, local_rank)
    if dtype == "fp16" and device.type == "cpu":
        raise UsageError("--dtype fp16 needs --use_gpu; on a CPU use bf16 or fp32")
    if world_size == 1:
        return Runtime(device, DTYPES[dtype])
    if device.type == "mps":
        raise UsageError("torchrun with --use_gpu needs CUDA; Apple MPS runs one process")
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Runtime(device, DTYPES[dtype], torch.distributed.get_rank(), world_size)


def get_device(use_gpu: bool, local_rank: int = 0) -> torch.device:
    if not use_gpu:
        return torch.device("cpu")
    if torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise UsageError(f"--use_gpu: process {local_rank} has no GPU of its own ({torch.cuda.device_count()} "
                             f"visible); start at most that many processes per machine")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    if torch.backends.mps.is_available():
        return torch.device("mps")
    raise UsageError("--use_gpu: no CUDA or Apple MPS device is available; run without --use_gpu to use the CPU")


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """Call write(tmp_path) on a temporary file beside `path`, then rename it over `path`: an interrupted
    run leaves the old file or none, never half of one."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp_path = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        write(tmp_path)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp makes files private; give the usual permissions
        os.replace(tmp_path, path)
    except BaseException:
        os.unlink(tmp_path)
        raise


def write_text_atomic(path: str, text: str) -> None:
    def write(tmp_path: str) -> None:
        with open(tmp_path, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, write)


def save_atomic(obj: object, path: str) -> None:
    atomic_write(path, lambda tmp_path: torch.save(obj, tmp_path))


# ---------------------------------------------------------------------------------------------------------
# Data files

def read_labeled_data(path: str, flag: str) -> list[tuple[int, str]]:
    """Read `<label> ||| <sentence>` lines into (label, sentence) pairs; `flag` names the option for errors."""
    if not os.path.isfile(path):
        raise UsageError(f"{flag} {path}: no such file; run ./setup.sh to fetch the data, or fix the path")
    with open(path, "rb") as f:
        raw_lines = f.read().splitlines()
    examples = []
    for line_no, raw in enumerate(raw_lines, start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise UsageError(f"{flag} {path}, line {line_no}: not UTF-8 ({e.reason} at byte {e.start}); "
                             f"re-save the file as UTF-8") from e
        if not line.strip():
            continue
        label, sep, sentence = line.partition(" ||| ")
        if not sep:
            raise UsageError(f"{flag} {path}, line {line_no}: no ' ||| ' separator; each line must be "
                             f"'<label> ||| <sentence>'")
        try:
            examples.append((int(label.strip()), sentence.strip()))
        except ValueError as e:
            raise UsageError(f"{flag} {path}, line {line_no}: label {label.strip()!r} is not an integer") from e
    if not examples:
        raise UsageError(f"{flag} {path}: the file has no examples; each line must be '<label> ||| <sentence>'")
    return examples


def read_label_names(path: str) -> list[str]:
    """The label-mapping JSON: a list of names, the i-th naming label i."""
    if not os.path.isfile(path):
        raise UsageError(f"--label-names {path}: no such file; run ./setup.sh, or fix the path")
    try:
        with open(path, encoding="utf-8") as f:
            names = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise UsageError(f"--label-names {path}: not valid JSON ({e}); it must be a list like [\"bad\", \"good\"]") from e
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n.strip() for n in names):
        raise UsageError(f"--label-names {path}: must be a JSON list of non-empty strings, like [\"bad\", \"good\"]")
    return names


def check_labels(examples: list[tuple[int, str]], n_labels: int, flag: str, path: str) -> None:
    for label, _ in examples:
        if not 0 <= label < n_labels:
            raise UsageError(f"{flag} {path}: label {label} is outside 0..{n_labels - 1}, the labels that "
                             f"--label-names names; pass the label mapping of this dataset")


# ---------------------------------------------------------------------------------------------------------
# Batching

def make_batches(lengths: list[int], batch_size: int, shuffle: bool,
                 generator: Optional[torch.Generator] = None, chunk_batches: int = 50) -> list[list[int]]:
    """Group example indices into batches of similar length, so that little padding is computed.

    For evaluation (shuffle=False) all examples are sorted by length. For training, the examples are
    shuffled, then sorted within chunks of chunk_batches batches, and the batches shuffled: batches stay
    random in content and order while each holds similar lengths.
    """
    if shuffle:
        order = torch.randperm(len(lengths), generator=generator).tolist()
    else:
        order = list(range(len(lengths)))
    chunk = batch_size * chunk_batches if shuffle else len(order)
    batches = []
    for start in range(0, len(order), chunk):
        by_length = sorted(order[start:start + chunk], key=lambda i: lengths[i])
        batches += [by_length[i:i + batch_size] for i in range(0, len(by_length), batch_size)]
    if shuffle:
        batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
    return batches


def shard(indices: list[int], rank: int, world_size: int) -> list[int]:
    """One process's share of a global batch; a batch shorter than world_size is cycled so none gets nothing."""
    if len(indices) < world_size:
        indices = (indices * world_size)[:world_size]
    return indices[rank::world_size]


def pad_batch(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists into (tokens (batch, max_len), lengths (batch,))."""
    lengths = torch.tensor([len(s) for s in sequences])
    tokens = torch.full((len(sequences), int(lengths.max())), pad_id, dtype=torch.long)
    for row, seq in enumerate(sequences):
        tokens[row, :len(seq)] = torch.tensor(seq, dtype=torch.long)
    return tokens, lengths
