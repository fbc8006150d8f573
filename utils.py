"""The bottom layer, importable from anywhere: the user-facing error type and the command-line plumbing that turns
bad input into one line, and files handled safely (checks of output paths before any work, locks that keep two
runs off one file, atomic writes that a signal cannot cut, loads that run no code, hashes)."""
import argparse
import ctypes
import fcntl
import hashlib
import importlib.util
import os
import signal
import socket
import stat
import sys
import tempfile
import threading
from contextlib import ExitStack, contextmanager
from typing import Any, BinaryIO, Callable, Iterator, Optional

import torch


class UsageError(Exception):
    """A problem with the user's input (a file, a flag, a value). The message names the culprit and the fix;
    run_llama.main(), and exit_status for the other scripts, print it on one line and exit with status 2."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are UsageErrors (one line, exit status 2) and that takes --a-b and --a_b alike."""

    def error(self, message: str) -> None:
        raise UsageError(message)

    def parse_known_args(self, args: Optional[list[str]] = None, namespace: Any = None) -> Any:
        args = sys.argv[1:] if args is None else list(args)
        spellings = {flag.replace("-", "_"): flag for flag in self._option_string_actions if flag.startswith("--")}
        normalised = []
        for i, arg in enumerate(args):
            if arg == "--":
                normalised += args[i:]
                break
            flag, eq, value = arg.partition("=")
            normalised.append(spellings.get(flag.replace("-", "_"), flag) + eq + value if arg.startswith("--") else arg)
        return super().parse_known_args(normalised, namespace)


def exit_status(main: Callable[[], None]) -> int:
    """A script's exit status: 0, or 2 with the message of a UsageError on one line of stderr."""
    try:
        main()
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def require_positive(flags: dict[str, Optional[int]]) -> None:
    """Each flag's count at least 1 (None: not given), or a UsageError naming the first that is not."""
    for flag, value in flags.items():
        if value is not None and value < 1:
            raise UsageError(f"{flag} {value}: give at least 1")


def require_extra(module: str, needed_for: str) -> None:
    """An optional package (a test extra) that a script needs, or a UsageError saying how to install it."""
    if importlib.util.find_spec(module) is None:
        raise UsageError(f"{module} is not installed and is needed for {needed_for}; run ./setup.sh --test "
                         f"(or pip install -r requirements-test.txt)")


def require_file(flag: str, path: str, fix: str) -> None:
    """A readable file at path, or a UsageError naming flag, path and fix (e.g. "run ./setup.sh")."""
    if os.path.isdir(path):
        files = sorted(name for name in os.listdir(path) if os.path.isfile(os.path.join(path, name)))[:3]
        inside = f" (it holds {', '.join(files)}{', ...' if len(files) == 3 else ''})" if files else " (an empty one)"
        raise UsageError(f"{flag} {path}: is a folder{inside}; pass a file")
    if not os.path.isfile(path):
        where = "" if os.path.isabs(path) else f" (looked in {os.getcwd()})"
        raise UsageError(f"{flag} {path}: no such file{where}; {fix}")
    if not os.access(path, os.R_OK):
        raise UsageError(f"{flag} {path}: not readable (permissions); fix its permissions or pass another file")


def state_file_message(flag: str, path: str) -> str:
    """What to say of a training state given where a model or checkpoint belongs."""
    checkpoint = path.removesuffix(".state")
    beside = f"; its checkpoint, to use elsewhere, is {checkpoint}" if os.path.isfile(checkpoint) else ""
    return (f"{flag} {path}: the state of a training run, which only --resume reads (same command, same "
            f"--filepath){beside}")


def nearest_existing(path: str) -> str:
    """path, or the nearest folder above it that exists: where the missing folders of an output will be made."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def check_outputs(outputs: list[tuple[str, str]], inputs: list[tuple[str, str]]) -> None:
    """Before any work: every output (flag, path) can be written (its folder, or the nearest one that exists, to
    be made by held_outputs), is not a folder, is no input of the run and is not another output of it; otherwise a
    UsageError naming the flags. A link is judged by its target, which is what gets written."""
    seen: dict[str, str] = {}  # resolved path -> the flag that names it
    for flag, path in inputs:
        if path and path != "-":
            seen.setdefault(os.path.realpath(path), flag)
    input_paths = set(seen)
    for flag, path in outputs:
        real = os.path.realpath(path)
        folder = os.path.dirname(real)
        if os.path.isdir(real):
            raise UsageError(f"{flag} {path}: is a folder; name a file, e.g. {os.path.join(path, 'out.txt')}")
        existing = nearest_existing(folder)
        if not os.path.isdir(existing):
            raise UsageError(f"{flag} {path}: {existing} is a file, so no folder can be made there; pick another path")
        if not os.access(existing, os.W_OK):
            raise UsageError(f"{flag} {path}: folder {existing} is not writable; pick another path")
        # os.access says yes to root for any file: the mode bits say what its owner meant
        if os.path.exists(real) and not (os.access(real, os.W_OK) and os.stat(real).st_mode & stat.S_IWUSR):
            raise UsageError(f"{flag} {path}: the file is read-only; make it writable (chmod u+w) or pick another "
                             f"path")
        if real in seen:
            what = "an input" if real in input_paths else "another output"
            raise UsageError(f"{flag} {path}: is also {seen[real]}, {what} of this run, and would be overwritten; "
                             f"pick another path")
        seen[real] = flag


@contextmanager
def held_outputs(outputs: list[tuple[str, str]]) -> Iterator[None]:
    """Within the block, this process holds its outputs (flag, path): another process that asks for any of them
    stops with a UsageError naming the file and the process that holds it. The locks are advisory (flock on a
    hidden .lock file beside each output), so the OS releases them when a process dies, even by SIGKILL. Missing
    folders are made, and those left empty at the end (a run that stopped early) are removed again."""
    with ExitStack() as stack:
        for flag, path in outputs:
            stack.callback(_make_folders(os.path.dirname(os.path.realpath(path))))
        for flag, path in outputs:  # none waits for a lock, so no order can deadlock
            real = os.path.realpath(path)
            lock = os.path.join(os.path.dirname(real), f".{os.path.basename(real)}.lock")
            stack.enter_context(_locked(lock, f"{flag} {path}"))
        yield


def _make_folders(folder: str) -> Callable[[], None]:
    """Make folder and its missing parents; returns what removes those of them that are still empty."""
    made = []
    while not os.path.isdir(folder):
        made.append(folder)
        folder = os.path.dirname(folder)
    for new in reversed(made):
        os.makedirs(new, exist_ok=True)

    def remove_if_empty() -> None:
        for new in made:  # the innermost first
            try:
                os.rmdir(new)
            except OSError:  # it holds files: the run's outputs
                return
    return remove_if_empty


@contextmanager
def _locked(lock: str, what: str) -> Iterator[None]:
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise UsageError(f"{what}: in use by a run that is still going ({holder}); wait for it to end, or "
                             f"pick another path") from None
        try:
            if os.path.exists(lock) and os.path.samestat(os.fstat(fd), os.stat(lock)):
                break  # not a file that its last holder removed while we waited for it
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"process {os.getpid()} on {socket.gethostname()}".encode(), 0)
        yield
    finally:
        os.unlink(lock)  # while still held: the next run makes a new file
        os.close(fd)


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextmanager
def signals_deferred() -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM are held, and delivered again, to whatever handles them, when the
    block ends: a write (or a set of writes) that a signal must not cut in half. Main thread only, like every
    signal handler; elsewhere the block changes nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: held.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if held:
            signal.raise_signal(held[0])


def atomic_write(path: str, write: Callable[[BinaryIO], None]) -> None:
    """Call write(f) on a temporary file beside `path`, flush it to disk, then rename it over `path` and flush the
    folder: an interrupted run, a full disk or a power loss leaves the old file or the new one, never half of
    one. Ctrl-C or SIGTERM during it take effect when it is done. A link is written through: its target gets the
    new content, the link stays; an existing file keeps its permissions. A failed write is a UsageError naming
    the file."""
    target = os.path.realpath(path)
    folder = os.path.dirname(target)
    with signals_deferred():
        tmp_path = None
        try:
            fd, tmp_path = tempfile.mkstemp(prefix=f".{os.path.basename(target)}.", suffix=".tmp", dir=folder)
            with open(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp_path, _mode_for(target))  # mkstemp makes files private
            os.replace(tmp_path, target)
            tmp_path = None
            fsync_folder(folder)
        except BaseException as e:
            if tmp_path is not None:
                os.unlink(tmp_path)
            # torch.save reports a failed write as a RuntimeError around the OSError
            cause = e if isinstance(e, OSError) else e.__cause__ or e.__context__ if isinstance(e, RuntimeError) else None
            if isinstance(cause, OSError):
                raise UsageError(f"could not write {path}: {cause.strerror}; free some space or pick another path "
                                 f"(the previous file, if any, is unchanged)") from e
            raise


def fsync_folder(folder: str) -> None:
    """Put a rename in folder on disk (the folder's entry, not only the file's bytes)."""
    folder_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(folder_fd)
    finally:
        os.close(folder_fd)


def _mode_for(path: str) -> int:
    """The permissions of the file at path, or the usual ones for a new file (0666 less the umask)."""
    if os.path.exists(path):
        return stat.S_IMODE(os.stat(path).st_mode)
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


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


def return_free_memory() -> None:
    """Hand the memory that the allocator keeps after frees back to the system. glibc keeps freed pages within its
    heap for reuse, so a model converted piece by piece (each piece's temporaries freed) would otherwise peak at its
    weights plus every temporary it ever made (measured at 1.1B parameters: 2.5 GB against 1.7 for int8 weights).
    Elsewhere than glibc, nothing to do."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


try:
    _LIBC = ctypes.CDLL("libc.so.6") if sys.platform.startswith("linux") else None
except OSError:  # a Linux without glibc (musl)
    _LIBC = None


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
