"""bench/parity.py's input checks (its runs take minutes a seed: docs/accuracy.md has them)."""
import pytest

from bench import parity
from conftest import STORIES260K, TOK512, asset, one_line_error


@pytest.mark.parametrize("argv, words", [
    (["--checkpoint", "{tmp}/nope.pt"], ["--checkpoint", "nope.pt", "no such file"]),
    (["--tokenizer", "tokenizer.model"], ["tokenizer.model", "32000", "512", "--tokenizer"]),
    (["--seeds", "0"], ["--seeds 0", "at least 1"]),
    (["--length-noise", "-1"], ["--length-noise"]),
    (["--variants", "ours,theirs"], ["--variants", "'theirs'"]),
])
def test_bad_flags_end_in_one_line_before_any_training(tmp_path, monkeypatch, capsys, argv, words):
    """A wrong tokenizer used to fail inside training with an index error, a wrong checkpoint with a traceback."""
    asset(STORIES260K), asset(TOK512), asset("tokenizer.model")
    argv = ["--task", "sst2"] + [arg.replace("{tmp}", str(tmp_path)) for arg in argv]
    line = one_line_error(parity.main, argv, monkeypatch, capsys)
    for word in words:
        assert word in line, line
