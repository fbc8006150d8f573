"""Where and how a run computes: its device, its autocast precision, its place among torchrun's processes and
how they share a model (DistributedDataParallel replicates it, FSDP2 shards it), its random seeds, and what Ctrl-C
and SIGTERM do to it."""
import dataclasses
import os
import random
import signal
import sys
from contextlib import ExitStack, contextmanager, nullcontext
from typing import Any, ContextManager, Iterable, Iterator, Optional

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from kernels import Bf16ProductsInFp32Kernels, cpu_has_bf16_matmul
from sharded import shard_model
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


def peak_rss() -> int:
    """This process's peak resident memory in bytes (VmHWM: ru_maxrss would count a forking parent's too)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            return int(f.read().split("VmHWM:")[1].split()[0]) * 1024
    except (OSError, IndexError, ValueError):  # not Linux
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


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
    shard: bool = False  # FSDP2: each process keeps a shard of the weights, gradients and optimizer state

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def dtype(self) -> str:
        """The run's precision as --dtype names it."""
        return next(name for name, dtype in DTYPES.items() if dtype == self.amp_dtype)

    @property
    def weights_dtype(self) -> torch.dtype:
        """How the weights that do not train are held: in the run's precision, so that none is cast per step."""
        return self.amp_dtype or torch.float32

    def peak_memory(self) -> str:
        """The most memory each process has held so far: the GPU's allocations on CUDA, else resident memory.
        Under torchrun every process must ask (one gather); the answer lists them in rank order."""
        gpu = self.device.type == "cuda"
        peaks = self.gather((torch.cuda.max_memory_allocated(self.device) if gpu else peak_rss()) / 1e9)
        return (f"peak {'GPU ' * gpu}memory {', '.join(f'{peak:.2f}' for peak in peaks)} GB"
                + (f" (processes 0-{self.world_size - 1})" if self.world_size > 1 else ""))

    @property
    def bf16_in_fp32_kernels(self) -> bool:
        """Whether this run's bf16 products take fp32 kernels: on a CPU without bf16 instructions (kernels.py)."""
        return self.amp_dtype == torch.bfloat16 and self.device.type == "cpu" and not cpu_has_bf16_matmul()

    def autocast(self, linear_layers: bool = True) -> ContextManager:
        """Around a forward pass: products in the run's precision. linear_layers: the pass runs nn.Linear layers (a
        Llama's, not decoding.Decoder's), whose frozen bf16 weights then multiply in fp32 kernels where the CPU has no
        bf16 instructions (kernels.py; the backward pass keeps the kernels its products chose). Elsewhere that
        would only slow each operation down (a Python call for each, to see whether it is such a product)."""
        if not self.amp_dtype:
            return nullcontext()
        stack = ExitStack()
        stack.enter_context(torch.autocast(self.device.type, dtype=self.amp_dtype))
        if linear_layers and self.bf16_in_fp32_kernels:
            stack.enter_context(Bf16ProductsInFp32Kernels())
        return stack

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

    def parallel(self, model: nn.Module, blocks: Iterable[nn.Module]) -> nn.Module:
        """What trains the model across the processes: the model itself alone; DistributedDataParallel, which keeps
        all of it in every process and averages the gradients; or, with shard, the model sharded in place by FSDP2
        (sharded.shard_model), each of `blocks` (its layers) and the rest on their own."""
        if self.world_size == 1:
            return model
        if not self.shard:
            return DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        return shard_model(model, blocks, self.amp_dtype)

    def gradient_sync(self, model: nn.Module, last: bool) -> ContextManager:
        """Around one micro-batch's backward pass of what parallel() made: the processes combine the gradients after
        the last one only."""
        if isinstance(model, DistributedDataParallel) and not last:
            return model.no_sync()
        if self.shard and self.world_size > 1:
            model.set_requires_gradient_sync(last)
        return nullcontext()

    def my_batches(self, batches: list) -> list:
        """This process's share of the batches to evaluate: every world_size-th. Sharded, every process runs as
        many forward passes as the others, since each pass gathers weights from all of them (a short share ends
        with a batch again, whose predictions are the same)."""
        mine = batches[self.rank::self.world_size]
        if self.shard:
            mine += [batches[-1]] * (-(-len(batches) // self.world_size) - len(mine))
        return mine

    def largest(self, value: int) -> int:
        """The largest of the processes' values (one all-reduce)."""
        if self.world_size == 1:
            return value
        largest = torch.tensor([value], device=self.device)
        torch.distributed.all_reduce(largest, op=torch.distributed.ReduceOp.MAX)
        return int(largest.item())

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


def start_runtime(use_gpu: bool, dtype: str, stored: Optional[str] = None, source: str = "",
                  shard: bool = False) -> Runtime:
    """Plain `python run_llama.py` runs one process; under torchrun (WORLD_SIZE > 1) join the process group,
    gloo on CPU and NCCL on CUDA, one GPU per process, the model replicated or with shard sharded. dtype "auto"
    follows `stored`, the precision the weights of `source` are stored (or were trained) in (see resolve_dtype)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = get_device(use_gpu, local_rank)
    precision = amp_dtype(resolve_dtype(dtype, stored, source, device), device)
    if world_size == 1:
        return Runtime(device, precision)
    if device.type == "mps":
        raise UsageError("torchrun with --use_gpu needs CUDA; Apple MPS runs one process")
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Runtime(device, precision, torch.distributed.get_rank(), world_size, shard)


def resolve_dtype(dtype: str, stored: Optional[str], source: str, device: torch.device) -> str:
    """--dtype auto: the precision the weights are stored in where this device multiplies in it natively (bf16 on
    CUDA, AVX512-BF16 or AMX; fp16 on a GPU), else fp32 with a note. A llama2.c model (fp32) stays fp32."""
    if dtype != "auto":
        return dtype
    if stored not in ("bf16", "fp16"):
        return "fp32"
    if device.type == "cuda":
        native = stored == "fp16" or torch.cuda.is_bf16_supported()
    elif device.type == "mps":
        native = stored == "fp16"
    else:
        native = stored == "bf16" and cpu_has_bf16_matmul()
    if native:
        return stored
    if device.type != "cpu":
        why = f"is slow on this {device.type.upper()}"
    elif stored == "fp16":
        why = "needs a GPU"
    else:  # bf16 runs here too, its products in fp32 kernels (kernels.py), in half the memory
        why = "this CPU has no instructions for; --dtype bf16 holds the weights in half the memory"
    print(f"note: {source} {stored}, which {why}; running in fp32 (--dtype sets it)", file=sys.stderr)
    return "fp32"


def amp_dtype(dtype: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype that --dtype names (None for fp32)."""
    if dtype == "fp16" and device.type == "cpu":
        raise UsageError("--dtype fp16 needs --use_gpu; on a CPU use bf16 or fp32")
    if dtype == "bf16" and device.type == "cpu" and not cpu_has_bf16_matmul():
        print("note: this CPU has no bf16 matrix instructions (AVX512-BF16 or AMX); --dtype bf16 holds the weights "
              "in bf16 and multiplies them in fp32 kernels here, to the same results", file=sys.stderr)
    return DTYPES[dtype]


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


