"""Small shared pieces: the user-facing error type, seeding, where and how to run (device, precision,
processes), atomic file writes, data files and batching."""
import codecs
import dataclasses
import hashlib
import json
import os
import random
import signal
import sys
import tempfile
from contextlib import contextmanager, nullcontext
from typing import Any, BinaryIO, Callable, ContextManager, Iterator, Optional

import numpy as np
import torch


class UsageError(Exception):
    """A problem with the user's input (a file, a flag, a value). The message names the culprit and the fix;
    run_llama.main() prints it on one line and exits with status 2."""


class Interrupted(BaseException):
    """Ctrl-C or SIGTERM. A BaseException, like KeyboardInterrupt, so that no `except Exception` swallows it;
    `progress` says what was saved, for main()'s one-line message. The exit status is 128 + the signal."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.status = 128 + signum
        self.progress = "no output file was left half-written"


@contextmanager
def signals_interrupt() -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM raise Interrupted (in the main thread, between two operations)."""
    def handler(signum: int, frame: object) -> None:
        raise Interrupted(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old)


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

    def sum(self, value: float) -> float:
        """value summed over the processes (one all-reduce; a NaN or inf anywhere reaches every process)."""
        if self.world_size == 1:
            return value
        total = torch.tensor([value], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(total)
        return total.item()

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
    precision = amp_dtype(dtype, device)
    if world_size == 1:
        return Runtime(device, precision)
    if device.type == "mps":
        raise UsageError("torchrun with --use_gpu needs CUDA; Apple MPS runs one process")
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Runtime(device, precision, torch.distributed.get_rank(), world_size)


def amp_dtype(dtype: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype that --dtype names (None for fp32)."""
    if dtype == "fp16" and device.type == "cpu":
        raise UsageError("--dtype fp16 needs --use_gpu; on a CPU use bf16 or fp32")
    if dtype == "bf16" and device.type == "cpu" and not cpu_has_bf16_matmul():
        print("warning: this CPU has no bf16 matrix instructions (AVX512-BF16 or AMX), so --dtype bf16 runs "
              "slower than fp32 here; it still computes the same thing", file=sys.stderr)
    return DTYPES[dtype]


def cpu_has_bf16_matmul() -> bool:
    """Whether bf16 matrix products run natively on this CPU. Without AVX512-BF16 or AMX, PyTorch falls back
    to a generic kernel (measured on an AVX2-only CPU: 1.7 GFLOP/s in bf16 against 90 in fp32)."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


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


def require_file(flag: str, path: str, fix: str) -> None:
    """A readable file at path, or a UsageError naming flag, path and fix (e.g. "run ./setup.sh")."""
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path}: is a folder, not a file; {fix}")
    if not os.path.isfile(path):
        raise UsageError(f"{flag} {path}: no such file; {fix}")
    if not os.access(path, os.R_OK):
        raise UsageError(f"{flag} {path}: not readable (permissions); fix its permissions or pass another file")


def check_outputs(outputs: list[tuple[str, str]], inputs: list[tuple[str, str]]) -> None:
    """Before any work: every output (flag, path) can be written, is not a folder, is no input of the run
    and is not another output of it; otherwise a UsageError naming the flags."""
    seen: dict[str, str] = {}  # resolved path -> the flag that names it
    for flag, path in inputs:
        if path and path != "-":
            seen.setdefault(os.path.realpath(path), flag)
    input_paths = set(seen)
    for flag, path in outputs:
        folder = os.path.dirname(os.path.abspath(path))
        if os.path.isdir(path):
            raise UsageError(f"{flag} {path}: is a folder; name a file, e.g. {os.path.join(path, 'out.txt')}")
        if not os.path.isdir(folder):
            raise UsageError(f"{flag} {path}: folder {folder} does not exist; create it or pick another path")
        if not os.access(folder, os.W_OK):
            raise UsageError(f"{flag} {path}: folder {folder} is not writable; pick another path")
        real = os.path.realpath(path)
        if real in seen:
            what = "an input" if real in input_paths else "another output"
            raise UsageError(f"{flag} {path}: is also {seen[real]}, {what} of this run, and would be overwritten; "
                             f"pick another path")
        seen[real] = flag


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write(path: str, write: Callable[[BinaryIO], None]) -> None:
    """Call write(f) on a temporary file beside `path`, flush it to disk, then rename it over `path`: an
    interrupted run, or a full disk, leaves the old file or none, never half of one. A failed write is a
    UsageError naming the file."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp_path = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with open(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp makes files private; give the usual permissions
        os.replace(tmp_path, path)
    except BaseException as e:
        os.unlink(tmp_path)
        # torch.save reports a failed write as a RuntimeError around the OSError
        cause = e if isinstance(e, OSError) else e.__cause__ or e.__context__ if isinstance(e, RuntimeError) else None
        if isinstance(cause, OSError):
            raise UsageError(f"could not write {path}: {cause.strerror}; free some space or pick another path "
                             f"(the previous file, if any, is unchanged)") from e
        raise


def write_text_atomic(path: str, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def save_atomic(obj: object, path: str) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


def load_tensors(path: str, flag: str, fix: str = "delete it or pass another file") -> Any:
    """torch.load with weights_only (tensors and plain values: no code runs from the file), memory-mapped so
    that what is not used is never read; a file that is not one is a UsageError naming flag and fix."""
    try:
        try:
            return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)  # torch's pre-1.6 format cannot be mapped
    except Exception as e:  # torch raises several types for a file it cannot read
        raise UsageError(f"{flag} {path}: truncated, corrupt or not a PyTorch checkpoint ({first_line(e)}); "
                         f"{fix}") from e


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# ---------------------------------------------------------------------------------------------------------
# Data files

def read_lines(path: str, flag: str) -> list[str]:
    """The lines of a UTF-8 text file (or of standard input for "-"), without a byte-order mark."""
    if path == "-":
        raw = sys.stdin.buffer.read()
    else:
        require_file(flag, path, "run ./setup.sh to fetch the data, or fix the path")
        with open(path, "rb") as f:
            raw = f.read()
    raw = raw.removeprefix(codecs.BOM_UTF8)  # Notepad writes one
    lines = []
    for line_no, line in enumerate(raw.splitlines(), start=1):
        try:
            lines.append(line.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise UsageError(f"{flag} {path}, line {line_no}: not UTF-8 ({e.reason} at byte {e.start}); "
                             f"re-save the file as UTF-8") from e
    return lines


def read_labeled_data(path: str, flag: str, labels_optional: bool = False) -> list[tuple[Optional[int], str]]:
    """Read `<label> ||| <sentence>` lines into (label, sentence) pairs; `flag` names the option for errors.
    With labels_optional, bare sentences are read too, with label None (all lines alike: labeled or not)."""
    examples = []
    for line_no, line in enumerate(read_lines(path, flag), start=1):
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
                           "no ' ||| ' separator; each line must be '<label> ||| <sentence>'")
                raise UsageError(f"{flag} {path}, line {line_no}: {problem}")
            sentence = line
        if examples and (label is None) != (examples[0][0] is None):
            raise UsageError(f"{flag} {path}, line {line_no}: some lines have a '<label> ||| ' and some do not; "
                             f"label every line or none")
        examples.append((label, sentence.strip()))
    if not examples:
        raise UsageError(f"{flag} {path}: the file has no examples; each line must be '<label> ||| <sentence>'")
    return examples


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
