import os
import subprocess
import sys

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
