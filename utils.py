"""The bottom layer, importable from anywhere: the user-facing error type, and files handled safely (checks of
output paths before any work, atomic writes, loads that run no code, hashes)."""
import hashlib
import os
import tempfile
from typing import Any, BinaryIO, Callable

import torch


class UsageError(Exception):
    """A problem with the user's input (a file, a flag, a value). The message names the culprit and the fix;
    run_llama.main() prints it on one line and exits with status 2."""


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
