import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT

SCRIPT = os.path.join(ROOT, "sanity_check.py")


def test_help_prints_what_it_checks():
    result = subprocess.run([sys.executable, SCRIPT, "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "sanity_check.data" in result.stdout and "non-causal" in result.stdout


def test_without_stories42M_it_says_how_to_get_it(tmp_path):
    result = subprocess.run([sys.executable, SCRIPT], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["sanity_check: stories42M.pt is missing; run ./setup.sh (it downloads "
                                                  "stories42M.pt, 167 MB, and copies sanity_check.data)"]


@pytest.mark.parametrize("reference", [b"not a checkpoint", "a dict without the outputs"])
def test_a_broken_reference_file_is_one_line_naming_it(tmp_path, reference):
    (tmp_path / "stories42M.pt").write_bytes(b"never read: the reference is read first")
    if isinstance(reference, bytes):
        (tmp_path / "sanity_check.data").write_bytes(reference)
    else:
        torch.save({"logits": torch.zeros(1)}, tmp_path / "sanity_check.data")
    result = subprocess.run([sys.executable, SCRIPT], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith("sanity_check: reference sanity_check.data: ") and "./setup.sh" in lines[0]
