import pytest

from config import LlamaConfig
from conftest import tiny_config


def test_unknown_model_args_are_ignored_and_missing_defaulted():
    with pytest.warns(UserWarning, match="ignored"):
        config = LlamaConfig.from_model_args({"dim": 64, "n_heads": 8, "flash": True})
    assert config.n_kv_heads == 8 and config.vocab_size == 32000 and config.hidden_dim == 192
    assert tiny_config().hidden_dim == 88  # 2/3 * 4 * 32 = 85, rounded up to a multiple of 8
