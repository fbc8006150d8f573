"""Where and how a run computes: its device, its autocast precision, its place among torchrun's processes,
its random seeds, and what Ctrl-C and SIGTERM do to it."""
import dataclasses
import os
import random
import signal
import sys
from contextlib import contextmanager, nullcontext
from typing import Any, ContextManager, Iterable, Iterator, Optional

import numpy as np
import torch
from tqdm import tqdm

from utils import UsageError


class Interrupted(BaseException):
    """Ctrl-C or SIGTERM. A BaseException, like KeyboardInterrupt, so that no `except Exception` swallows it;
    `progress` says what was saved, for main()'s one-line message, and `resumable` whether --resume can go
    on from it. The exit status is 128 + the signal."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.status = 128 + signum
        self.progress = "no output file was left half-written"
        self.resumable = False


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

    def progress(self, iterable: Iterable, desc: str, **kwargs: Any) -> tqdm:
        """A progress bar on rank 0's terminal only (in a captured log a bar would share lines with the results);
        TQDM_DISABLE=1 silences it there too."""
        if not self.is_main or not sys.stderr.isatty():
            kwargs["disable"] = True
        return tqdm(iterable, desc=desc, **kwargs)

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


