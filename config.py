"""Model hyperparameters: one dataclass, defaults are llama2.c's stories42M."""
import dataclasses
import warnings
from dataclasses import dataclass
from typing import Any, Optional

# Keys that llama2.c or the assignment store beside the architecture and that do not change the model.
_NAME_ALIASES = {"layer_norm_eps": "norm_eps"}


@dataclass
class LlamaConfig:
    dim: int = 512
    n_layers: int = 8
    n_heads: int = 8
    n_kv_heads: Optional[int] = None  # None means n_heads (plain multi-head attention)
    vocab_size: int = 32000
    hidden_dim: Optional[int] = None  # None means llama2.c's rule: 2/3 of 4*dim, rounded up to multiple_of
    multiple_of: int = 32
    norm_eps: float = 1e-5
    max_seq_len: int = 1024
    dropout: float = 0.0
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.hidden_dim is None:
            hidden = int(2 * (4 * self.dim) / 3)
            self.hidden_dim = self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)
        sizes = (self.dim, self.n_layers, self.n_heads, self.n_kv_heads, self.vocab_size, self.hidden_dim,
                 self.max_seq_len)
        if not all(isinstance(n, int) and n > 0 for n in sizes):
            raise ValueError(f"dim, n_layers, n_heads, n_kv_heads, vocab_size, hidden_dim and max_seq_len must be "
                             f"positive integers, got {sizes}")
        if self.dim % self.n_heads or self.n_heads % self.n_kv_heads:
            raise ValueError(f"dim ({self.dim}) must divide into n_heads ({self.n_heads}) heads, "
                             f"and n_heads into n_kv_heads ({self.n_kv_heads}) groups")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @classmethod
    def from_model_args(cls, model_args: dict[str, Any]) -> "LlamaConfig":
        """Build a config from a llama2.c `model_args` dict; missing keys take the defaults."""
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs, ignored = {}, []
        for key, value in model_args.items():
            key = _NAME_ALIASES.get(key, key)
            if key in fields:
                kwargs[key] = value
            else:
                ignored.append(key)
        if ignored:
            warnings.warn(f"model_args keys {sorted(ignored)} do not describe the architecture and were ignored")
        return cls(**kwargs)
