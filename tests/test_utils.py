import hashlib
import os
import re
import signal
import stat
import subprocess
import sys

import pytest
import torch

from utils import (UsageError, atomic_write, check_outputs, file_sha256, held_outputs, load_tensors, require_extra,
                   require_file, write_text_atomic)


def test_an_atomic_write_replaces_the_file_whole_or_not_at_all(tmp_path):
    path = tmp_path / "out.txt"
    write_text_atomic(str(path), "first\n")
    assert path.read_text() == "first\n"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~umask  # not mkstemp's private 0600

    def fails_half_way(f):
        f.write(b"half of a ")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        atomic_write(str(path), fails_half_way)
    assert path.read_text() == "first\n"
    assert os.listdir(tmp_path) == ["out.txt"]  # no temporary file left behind


def test_a_temporary_file_that_cannot_be_made_is_one_line_too(tmp_path, monkeypatch):
    import errno
    import tempfile

    def no_inodes_left(**kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(tempfile, "mkstemp", no_inodes_left)
    with pytest.raises(UsageError, match="could not write .*out.txt: No space left on device"):
        write_text_atomic(str(tmp_path / "out.txt"), "x")
    assert os.listdir(tmp_path) == []


def test_missing_output_folders_are_made_and_removed_again_if_left_empty(tmp_path):
    kept, dropped = tmp_path / "runs" / "a" / "out.txt", tmp_path / "runs" / "b" / "c" / "out.txt"
    with held_outputs([("--dev_out", str(kept)), ("--test_out", str(dropped))]):
        assert kept.parent.is_dir() and dropped.parent.is_dir()
        write_text_atomic(str(kept), "x")
    assert kept.read_text() == "x" and not (tmp_path / "runs" / "b").exists()
    with pytest.raises(RuntimeError), held_outputs([("--dev_out", str(tmp_path / "gone" / "out.txt"))]):
        raise RuntimeError("the run failed before writing")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]


def test_outputs_are_checked_before_any_work(tmp_path):
    data = tmp_path / "dev.txt"
    data.write_text("1 ||| x\n")
    check_outputs([("--dev_out", str(tmp_path / "a.txt")), ("--test_out", str(tmp_path / "b.txt"))],
                  [("--dev", str(data))])
    check_outputs([("--dev_out", str(tmp_path / "new" / "folders" / "a.txt"))], [])  # made when the run starts
    cases = [([("--dev_out", str(data / "under" / "a.txt"))], "dev.txt is a file, so no folder can be made there"),
             ([("--dev_out", str(tmp_path))], "is a folder"),
             ([("--dev_out", str(data))], "--dev_out .*is also --dev, an input"),
             ([("--dev_out", "x.txt"), ("--test_out", "./x.txt")], "--test_out ./x.txt: is also --dev_out, another output")]
    for outputs, message in cases:
        with pytest.raises(UsageError, match=message):
            check_outputs(outputs, [("--dev", str(data))])


def test_require_file_names_the_flag_the_folder_searched_and_the_fix(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError, match=f"--dev nope.txt: no such file \\(looked in {tmp_path}\\); run it"):
        require_file("--dev", "nope.txt", "run it")
    with pytest.raises(UsageError, match=f"--dev {tmp_path}/nope.txt: no such file; run it"):
        require_file("--dev", str(tmp_path / "nope.txt"), "run it")
    with pytest.raises(UsageError, match="is a folder"):
        require_file("--dev", str(tmp_path), "run it")


class RunsCode:
    def __reduce__(self):
        return (os.system, ("true",))


def test_loads_tensors_and_plain_values_but_never_code(tmp_path):
    good, bad = tmp_path / "good.pt", tmp_path / "bad.pt"
    torch.save({"w": torch.ones(2), "n": 3, "names": ["a"]}, good)
    loaded = load_tensors(str(good), "--filepath")
    assert torch.equal(loaded["w"], torch.ones(2)) and loaded["n"] == 3 and loaded["names"] == ["a"]
    torch.save({"x": RunsCode()}, bad)
    with pytest.raises(UsageError, match="--filepath .*bad.pt: truncated, corrupt or not a PyTorch checkpoint"):
        load_tensors(str(bad), "--filepath")


def test_file_hash_is_sha256_of_the_bytes(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(os.urandom(3 << 20))  # more than one read block
    assert file_sha256(str(path)) == hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_link_is_written_through_to_its_target_and_stays_a_link(tmp_path):
    target, link = tmp_path / "real.txt", tmp_path / "link.txt"
    target.write_text("old\n")
    link.symlink_to(target)
    write_text_atomic(str(link), "new\n")
    assert link.is_symlink() and target.read_text() == "new\n"
    assert sorted(os.listdir(tmp_path)) == ["link.txt", "real.txt"]


def test_a_replaced_file_keeps_its_mode_and_a_read_only_one_is_refused_first(tmp_path):
    path = tmp_path / "private.txt"
    path.write_text("old\n")
    path.chmod(0o600)
    write_text_atomic(str(path), "new\n")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600 and path.read_text() == "new\n"
    path.chmod(0o444)
    with pytest.raises(UsageError, match="--dev_out .*private.txt: the file is read-only"):
        check_outputs([("--dev_out", str(path))], [])


def test_the_rename_itself_is_flushed_to_disk(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(stat.S_ISDIR(os.fstat(fd).st_mode)) or real_fsync(fd))
    write_text_atomic(str(tmp_path / "out.txt"), "x\n")
    assert synced == [False, True]  # the file's bytes, then the folder that holds its new name


def test_a_signal_during_a_write_takes_effect_after_it(tmp_path):
    path = tmp_path / "out.txt"
    path.write_text("old\n")
    interrupted = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: interrupted.append(path.read_text()))
    try:
        atomic_write(str(path), lambda f: (os.kill(os.getpid(), signal.SIGINT), f.write(b"new\n")))
    finally:
        signal.signal(signal.SIGINT, previous)
    assert interrupted == ["new\n"]  # delivered once the new file was in place, and only then


HOLDER = """
import sys, time
sys.path.insert(0, {root!r})
from utils import held_outputs
with held_outputs([("--filepath", sys.argv[1])]):
    print("held", flush=True)
    time.sleep(60)
"""


def test_an_output_is_held_by_one_process_until_it_ends(tmp_path):
    from conftest import ROOT

    path = str(tmp_path / "model.pt")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER.format(root=ROOT), path], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(UsageError, match=re.escape(f"--filepath {path}: in use by a run that is still going "
                                                       f"(process {holder.pid} on ")):
            with held_outputs([("--filepath", path)]):
                pass
    finally:
        holder.kill()
        holder.wait()
    with held_outputs([("--filepath", path)]):  # a killed holder blocks nothing
        assert os.path.exists(tmp_path / ".model.pt.lock")
    assert os.listdir(tmp_path) == []


def test_a_missing_extra_says_how_to_install_it():
    require_extra("torch", "anything")
    with pytest.raises(UsageError, match=r"no_such_package_xyz is not installed .*setup.sh --test"):
        require_extra("no_such_package_xyz", "a comparison")
