"""Shared fixtures: where setup.sh put the assets, tiny configs, and a script's one-line error."""
import contextlib
import json
import os
import resource
import shutil
import sys
from typing import Optional

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from config import LlamaConfig  # noqa: E402
from llama import Llama  # noqa: E402


def asset(name: str) -> str:
    """A file that setup.sh puts at the repo root (from ../shared/assets or the public sources)."""
    path = os.path.join(ROOT, name)
    if not os.path.exists(path):
        pytest.fail(f"{name} is missing: run ./setup.sh --mirror ../shared/assets --test first")
    return path


STORIES260K = "stories260K.pt"
TOK512 = "tok512.model"


def tiny_config(**overrides) -> LlamaConfig:
    """Small enough to run in milliseconds, with grouped-query attention and an odd hidden size."""
    settings = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, multiple_of=8, max_seq_len=64)
    settings.update(overrides)
    return LlamaConfig(**settings)


@pytest.fixture
def tiny_model() -> Llama:
    torch.manual_seed(0)
    return Llama(tiny_config()).eval()


@contextlib.contextmanager
def file_size_limit(n_bytes: int):
    """Files this process writes stop growing at n_bytes (EFBIG, as `ulimit -f` gives; Python ignores SIGXFSZ)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (n_bytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def save_tokenizer_json(model: str, folder, single: Optional[str]) -> str:
    """The tokenizer.json (and tokenizer_config.json) that transformers 5 saves of a sentencepiece model, its
    post-processor's template put to `single` (Llama 2's is "<s> $A"; other models' add no <s>, or </s> too;
    None: no post-processor). Returns the tokenizer.json's path."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import processors

    source = os.path.join(folder, ".spm")
    os.makedirs(source)
    shutil.copyfile(model, os.path.join(source, "tokenizer.model"))
    with open(os.path.join(source, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "LlamaTokenizer"}, f)
    transformers.AutoTokenizer.from_pretrained(source).save_pretrained(folder)
    shutil.rmtree(source)
    path = os.path.join(folder, "tokenizer.json")
    with open(path) as f:
        saved = json.load(f)
    saved["post_processor"] = None if single is None else json.loads(processors.TemplateProcessing(
        single=single, pair=f"{single} $B:1", special_tokens=[("<s>", 1), ("</s>", 2)]).__getstate__())
    with open(path, "w") as f:
        json.dump(saved, f)
    return path


def one_line_error(main, argv: list[str], monkeypatch, capsys) -> str:
    """Runs a script's main (bench/run.py's, bench/parity.py's) on bad input, as `python script.py argv` from the repo root
    would: it must end with status 2 and one line on stderr, having printed no table row (nothing measured); the
    line is returned."""
    from utils import exit_status

    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", ["script.py", *argv])
    assert exit_status(main) == 2
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "| " not in out
    return lines[0]
