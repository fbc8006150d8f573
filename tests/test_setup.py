"""setup.sh and gpu_check.sh on machines that lack what they need: one line that says what to do, nothing left."""
import os
import shutil
import subprocess

import pytest
import torch

from conftest import ROOT, STORIES260K, TOK512, asset

OFFLINE = dict(os.environ, https_proxy="http://127.0.0.1:9", http_proxy="http://127.0.0.1:9",
               HTTPS_PROXY="http://127.0.0.1:9", HTTP_PROXY="http://127.0.0.1:9")  # no download can start


def mirror_of_the_assets(folder) -> str:
    """A mirror laid out like ../shared/assets, of the files setup.sh put here (links), without stories42M."""
    layout = {"data": [f"data/{name}" for name in os.listdir(asset("data"))],
              "models": [STORIES260K, "stories260K.bin", TOK512, "tok512.bin"], "": ["tokenizer.model"],
              "reference": ["sanity_check.data", "optimizer_test.npy", "rotary_embedding_actual.data"]}
    for place, names in layout.items():
        os.makedirs(folder / place, exist_ok=True)
        for name in names:
            os.symlink(asset(name), folder / place / os.path.basename(name))
    return str(folder)


def test_setup_offline_without_stories42m_in_the_mirror_suggests_going_on_without_it(tmp_path):
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    for name in ("setup.sh", "requirements.txt"):
        shutil.copy(os.path.join(ROOT, name), checkout / name)
    os.symlink(os.path.join(ROOT, ".venv"), checkout / ".venv")  # its packages are there: pip has nothing to fetch
    result = subprocess.run(["./setup.sh", "--mirror", mirror_of_the_assets(tmp_path / "mirror")], cwd=checkout,
                            env=OFFLINE, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("setup.sh: could not get stories42M.pt") and "add --no-stories42M" in last, result.stderr
    assert (checkout / "stories260K.pt").is_file() and not (checkout / "stories42M.pt.part").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_gpu_check_without_cuda_says_so_in_one_line_and_leaves_no_folder(tmp_path):
    out = tmp_path / "gpu-check"
    result = subprocess.run([os.path.join(ROOT, "gpu_check.sh"), str(out)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines() == ["gpu_check.sh: no CUDA device on this machine (torch.cuda.is_available() is "
                                          "False); run it where there is one"]
    assert not out.exists()
