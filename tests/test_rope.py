import torch

from conftest import asset
from rope import apply_rotary_emb, precompute_freqs_cis, rotate


def test_reproduces_assignment_reference():
    query, key = apply_rotary_emb(2 * torch.ones(1, 2, 2, 4), 3 * torch.ones(1, 2, 2, 4), 4, 20)
    ref_query, ref_key = torch.load(asset("rotary_embedding_actual.data"))
    assert torch.allclose(query, ref_query)
    assert torch.allclose(key, ref_key)


def test_start_pos_continues_the_sequence():
    torch.manual_seed(0)
    query, key = torch.randn(2, 10, 4, 16), torch.randn(2, 10, 2, 16)
    full_q, full_k = apply_rotary_emb(query, key, 16, 32)
    tail_q, tail_k = apply_rotary_emb(query[:, 6:], key[:, 6:], 16, 32, start_pos=6)
    assert torch.allclose(tail_q, full_q[:, 6:], atol=1e-6)
    assert torch.allclose(tail_k, full_k[:, 6:], atol=1e-6)


def test_scores_depend_only_on_relative_position():
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)
    freqs_cis = precompute_freqs_cis(8, 64)
    score = lambda m, n: (rotate(q, freqs_cis[m:m + 1]) * rotate(k, freqs_cis[n:n + 1])).sum()
    assert torch.allclose(score(5, 2), score(40, 37), atol=1e-5)
    assert not torch.allclose(score(5, 2), score(5, 4), atol=1e-3)


def test_matches_transformers_rotate_half_on_permuted_layout():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    torch.manual_seed(0)
    head_dim, seqlen = 16, 12
    query, key = torch.randn(1, seqlen, 3, head_dim), torch.randn(1, seqlen, 3, head_dim)
    ours_q, ours_k = apply_rotary_emb(query, key, head_dim, seqlen)
    # transformers' layout: per head, even components then odd ones
    to_half = lambda x: torch.cat((x[..., 0::2], x[..., 1::2]), dim=-1).transpose(1, 2)
    angles = torch.arange(seqlen)[:, None] * 10000.0 ** (-torch.arange(0, head_dim, 2) / head_dim)
    cos, sin = torch.cat((angles, angles), dim=-1).cos()[None], torch.cat((angles, angles), dim=-1).sin()[None]
    hf_q, hf_k = apply_rotary_pos_emb(to_half(query), to_half(key), cos, sin)
    assert torch.allclose(to_half(ours_q), hf_q, atol=1e-6)
    assert torch.allclose(to_half(ours_k), hf_k, atol=1e-6)
