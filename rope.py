"""Rotary position embeddings (RoPE), in llama2.c's interleaved-pair form.

Each head vector is read as head_dim/2 pairs (x[2i], x[2i+1]), i.e. complex numbers x[2i] + i x[2i+1]; the
pair at position p is rotated by the angle p * theta^(-2i/head_dim), a multiplication by e^(i angle).
Rotating queries and keys makes their dot product depend only on the distance between positions.
(transformers rotates (x[i], x[i + head_dim/2]) instead: the same maths on a permuted layout, which is why
its checkpoints permute wq/wk rows.)
"""
from typing import Tuple

import torch


def precompute_freqs_cis(head_dim: int, max_seq_len: int, theta: float = 10000.0) -> torch.Tensor:
    """e^(i p theta^(-2i/head_dim)) for every position p and pair i: complex64 (max_seq_len, head_dim // 2)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32)[: head_dim // 2] / head_dim)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)
    return torch.polar(torch.ones_like(angles), angles)


def rotate(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Rotate x (batch, seqlen, n_heads, head_dim) by freqs_cis (seqlen, head_dim // 2), or by
    (batch, seqlen, head_dim // 2) when each sequence has positions of its own."""
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # (batch, seqlen, n_heads, head_dim // 2)
    return torch.view_as_real(pairs * freqs_cis.unsqueeze(-2)).flatten(-2).type_as(x)


def apply_rotary_emb(
    query: torch.Tensor,
    key: torch.Tensor,
    head_dim: int,
    max_seq_len: int,
    theta: float = 10000.0,
    start_pos: int = 0,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The assignment's entry point: rotate query (batch, seqlen, n_heads, head_dim) and key
    (batch, seqlen, n_kv_heads, head_dim) whose first position is `start_pos`."""
    seqlen = query.shape[1]
    if start_pos + seqlen > max_seq_len:
        raise ValueError(f"positions {start_pos}..{start_pos + seqlen - 1} exceed max_seq_len {max_seq_len}")
    freqs_cis = precompute_freqs_cis(head_dim, start_pos + seqlen, theta)[start_pos:].to(query.device)
    return rotate(query, freqs_cis), rotate(key, freqs_cis)
