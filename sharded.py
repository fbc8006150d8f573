"""--fsdp without the whole model in any process. Every process builds the model on the meta device, FSDP2 shards it
there, and each process then reads only its own rows of each weight from the file (memory-mapped). The checkpoint
and the training state are written by every process, each its own shards (torch.distributed.checkpoint: nothing is
gathered), into a folder beside the file that names it. Any number of processes read them back sharded (--resume,
the best checkpoint after training); one process reads them whole (classify, export, generate, perplexity).

PyTorch's distributed tensors, on which all of this stands, are imported where they are used: they add 40 MB to a
process.
"""
import glob
import os
import shutil
import sys
import warnings
from typing import Callable, Iterable, Optional

import torch
from torch import nn

from utils import UsageError, save_atomic


def shard_model(model: nn.Module, blocks: Iterable[nn.Module], compute_dtype: Optional[torch.dtype]) -> nn.Module:
    """model sharded in place by FSDP2: each of `blocks` (its layers) and then the rest on their own, so that a process
    gathers one block's weights only while it computes that block. Under bf16 or fp16 the shards stay fp32 (the
    masters, and the gradients' reduction) and the gathered weights are cast for the compute. What is already off
    the meta device (a classifier's head, drawn from each process's own seed) becomes rank 0's everywhere first, as
    DistributedDataParallel starts."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    with torch.no_grad():
        for tensor in model.state_dict().values():
            if not tensor.is_meta:
                torch.distributed.broadcast(tensor, src=0)
    policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    for block in blocks:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def own_rows(parameter: torch.Tensor) -> tuple[int, int]:
    """The rows start:stop of a sharded parameter that this process holds: FSDP2 splits dim 0 as torch.chunk does."""
    rows, mesh = parameter.shape[0], parameter.device_mesh
    per_process = -(-rows // mesh.size())
    start = min(mesh.get_local_rank() * per_process, rows)
    return start, min(start + per_process, rows)


def fill_shards(module: nn.Module, read_rows: Callable[[str, int, int], torch.Tensor]) -> None:
    """Give the sharded parameters of module that are still on the meta device their values: read_rows(name, start,
    stop) returns this process's rows of one, which become its shard. A parameter shared under two names (tied
    embeddings) stays one."""
    from torch.distributed.tensor import DTensor

    shards = {}
    for name, parameter in module.named_parameters():
        if parameter.is_meta:
            start, stop = own_rows(parameter)
            local = read_rows(name, start, stop).to(parameter.device_mesh.device_type, parameter.dtype)
            shards[name] = nn.Parameter(DTensor.from_local(local, parameter.device_mesh, parameter.placements,
                                                           shape=parameter.shape, stride=parameter.stride(),
                                                           run_check=False), requires_grad=parameter.requires_grad)
    seen, aliases = {}, []
    for name, parameter in module.named_parameters(remove_duplicate=False):
        first = seen.setdefault(id(parameter), name)
        if first != name:
            aliases.append((name, first))
    module.load_state_dict(shards, strict=False, assign=True)
    for name, first in aliases:
        owner, _, attribute = name.rpartition(".")
        setattr(module.get_submodule(owner), attribute, module.get_parameter(first))


def is_sharded(model: nn.Module) -> bool:
    """Whether FSDP sharded the model: its parameters are then DTensors."""
    if "torch.distributed.tensor" not in sys.modules:
        return False
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def save_shards(path: str, record: dict, tensors: dict, name: str) -> None:
    """Every process writes its shards of tensors (nested dicts of DTensors; in a single process, of whole tensors)
    into <path>.shards-<name>; then rank 0 writes record at path, naming that folder, and removes the folders of
    earlier saves. path is replaced last and atomically, so a crash at any moment leaves the previous file and its
    shards whole."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    shards, main = f"{path}.shards-{name}", _is_main()
    if main and os.path.exists(shards):
        shutil.rmtree(shards)  # an attempt that a crash cut short
    _barrier()
    try:
        dcp.save(tensors, checkpoint_id=shards)
    except CheckpointException as e:  # every process gets it, once every process has stopped writing
        if main:
            shutil.rmtree(shards, ignore_errors=True)
        raise UsageError(f"could not write {shards}: {_first_os_error(e)}; free some space or pick another "
                         f"--filepath (the previous {os.path.basename(path)}, if any, is unchanged)") from None
    _barrier()
    if main:
        save_atomic({**record, "shards": os.path.basename(shards)}, path)
        for old in glob.glob(glob.escape(path) + ".shards-*"):
            if old != shards:
                shutil.rmtree(old)


def load_shards(path: str, record: dict, tensors: dict, flag: str) -> None:
    """Read what save_shards wrote (record: the file at path) into tensors, in place: DTensors take this process's
    shards, whole tensors the whole of them."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    shards = check_shards(path, record, flag)
    try:
        with warnings.catch_warnings():  # one process reading the whole tensors is what is meant
            warnings.filterwarnings("ignore", "torch.distributed is disabled")
            dcp.load(tensors, checkpoint_id=shards)
    except CheckpointException as e:
        raise UsageError(f"{flag} {path}: its shards {shards} cannot be read ({_first_os_error(e)}); train "
                         f"again") from None


def check_shards(path: str, record: dict, flag: str) -> str:
    """The folder of shards that the file at path (its contents: record) names, which must be there."""
    shards = os.path.join(os.path.dirname(os.path.abspath(path)), record["shards"])
    if not os.path.isdir(shards):
        raise UsageError(f"{flag} {path}: its shards {shards} are missing; keep that folder beside it, or train again")
    return shards


def save_sharded_state(path: str, record: dict, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """A sharded model's training state: its shards of the weights and of AdamW's moments, in every process."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    weights, moments = get_state_dict(model, optimizer)
    save_shards(path, {**record, "trainable": {}, "optimizer": {}}, {"model": weights, "optimizer": moments},
                str(record["epoch"]))


def load_sharded_state(path: str, state: dict, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """What save_sharded_state wrote, into a model sharded across this run's processes (any number of them)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    weights, moments = get_state_dict(model, optimizer)
    loaded = {"model": weights, "optimizer": moments}
    load_shards(path, state, loaded, "--resume")
    set_state_dict(model, optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optimizer"])


def _first_os_error(failure: BaseException) -> str:
    """What went wrong in a failed distributed save or load, in a few words: the first OSError among the
    processes'."""
    for error, _ in failure.failures.values():
        while error is not None and not isinstance(error, OSError):
            error = error.__cause__ or error.__context__
        if error is not None:
            return error.strerror or str(error)
    return str(next(iter(failure.failures.values()))[0])


def _is_main() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
