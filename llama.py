"""Llama 2: RMSNorm, grouped-query causal attention with a key/value cache, SwiGLU feed-forward, pre-norm
layers, tied embedding/output; and load_pretrained, the assignment's entry point, for llama2.c checkpoints and
Hugging Face folders.

Parameter names are llama2.c's (wq, wk, wv, wo, w1, w2, w3, ...), so its checkpoints load as they are.
"""
from collections.abc import Mapping
from contextlib import ExitStack, contextmanager, nullcontext
from typing import Any, ContextManager, Iterator, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from base_llama import LlamaPreTrainedModel
from config import LlamaConfig
from hf import SafetensorsWeights, is_hf_folder, read_config, read_hf
from kernels import rms_norm, swiglu
from llama2c import read_llama2c
from quantized import QUANTIZED_LAYERS
from rope import precompute_freqs_cis, rotate
from utils import UsageError, return_free_memory


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)  # kernels.py: autograd's, keeping less for the backward pass


class KVCache:
    """Keys and values of every position decoded so far, preallocated so that a step writes one slot. The
    buffers are made at the first update, in the dtype the keys arrive in (autocast may lower it)."""

    def __init__(self, max_len: int):
        self.max_len = max_len
        self.keys: Optional[torch.Tensor] = None
        self.values: Optional[torch.Tensor] = None

    def update(self, keys: torch.Tensor, values: torch.Tensor, start_pos: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Store keys/values (batch, n_kv_heads, seqlen, head_dim) at start_pos; return all positions so far."""
        if self.keys is None:
            batch_size, n_kv_heads, _, head_dim = keys.shape
            self.keys = keys.new_zeros(batch_size, n_kv_heads, self.max_len, head_dim)
            self.values = values.new_zeros(batch_size, n_kv_heads, self.max_len, head_dim)
        end = start_pos + keys.shape[2]
        self.keys[:, :, start_pos:end] = keys
        self.values[:, :, start_pos:end] = values
        return self.keys[:, :, :end], self.values[:, :, :end]

    def repeat_batch(self, times: int) -> None:
        """Each sequence becomes `times` consecutive copies: continuations that share one prompt."""
        self.keys = self.keys.repeat_interleave(times, dim=0)
        self.values = self.values.repeat_interleave(times, dim=0)


def pick(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """t[b, index[b]] for each sequence b, (batch, seqlen, ...) -> (batch, 1, ...); a table without a batch
    dimension, (seqlen, ...), is every sequence's."""
    if t.dim() == 2:
        return t[index, None]
    return t[torch.arange(len(index), device=index.device), index, None]


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.n_heads = config.n_heads
        self.n_kv_heads = config.n_kv_heads
        self.head_dim = config.head_dim
        self.wq = nn.Linear(config.dim, config.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(config.dim, config.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(config.dim, config.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(config.n_heads * self.head_dim, config.dim, bias=False)
        self.attn_dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor, mask: Optional[torch.Tensor],
                is_causal: bool, cache: Optional[KVCache] = None, start_pos: int = 0,
                only_at: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x (batch, seqlen, dim) -> (batch, seqlen, dim). only_at (batch,) asks for one position of each sequence:
        the queries there alone, out (batch, 1, dim); keys and values are still every position's."""
        batch_size, seqlen, _ = x.shape
        key = rotate(self.wk(x).view(batch_size, seqlen, self.n_kv_heads, self.head_dim), freqs_cis)
        value = self.wv(x).view(batch_size, seqlen, self.n_kv_heads, self.head_dim)
        if only_at is not None:
            x, freqs_cis = pick(x, only_at), pick(freqs_cis, only_at)
        query = rotate(self.wq(x).view(batch_size, -1, self.n_heads, self.head_dim), freqs_cis)

        # heads become a batch dimension: (batch, heads, seqlen, head_dim)
        query, key, value = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
        if cache is not None:
            key, value = cache.update(key, value, start_pos)
        # enable_gqa lets each group of n_heads // n_kv_heads query heads share one key/value head
        # without materialising repeated copies.
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, is_causal=is_causal,
            dropout_p=self.attn_dropout if self.training else 0.0, enable_gqa=self.n_kv_heads != self.n_heads)
        out = out.transpose(1, 2).reshape(batch_size, -1, self.n_heads * self.head_dim)
        return self.resid_dropout(self.wo(out))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, dropout: float):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)  # gate
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)  # down
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)  # up
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.w2(swiglu(self.w1(x), self.w3(x))))


class LlamaLayer(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.attention = Attention(config)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.feed_forward = FeedForward(config.dim, config.hidden_dim, config.dropout)

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor, mask: Optional[torch.Tensor],
                is_causal: bool, cache: Optional[KVCache] = None, start_pos: int = 0,
                only_at: Optional[torch.Tensor] = None) -> torch.Tensor:
        """only_at (batch,): the output at that position of each sequence alone, (batch, 1, dim) (see Attention)."""
        attended = self.attention(self.attention_norm(x), freqs_cis, mask, is_causal, cache, start_pos, only_at)
        h = (x if only_at is None else pick(x, only_at)) + attended
        return h + self.feed_forward(self.ffn_norm(h))


class Generation:
    """generate and new_tokens, for a model whose call (tokens, kv_caches=..., start_pos=...) returns
    (logits, hidden_states) like Llama's: Llama itself, and decoding.Decoder, its layout for decoding."""
    config: LlamaConfig

    @torch.inference_mode()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: Optional[int] = None, top_p: Optional[float] = None, use_cache: bool = True) -> torch.Tensor:
        """Extend idx (batch, seqlen) by up to max_new_tokens tokens; stop early at max_seq_len.

        temperature 0 is greedy; otherwise sample from softmax(logits / temperature), optionally only
        among the top_k tokens or the smallest set whose probability reaches top_p. With the cache each
        new token costs one position; use_cache=False recomputes the whole sequence (the reference).
        """
        new_tokens = self.new_tokens(idx, max_new_tokens, temperature, top_k, top_p, use_cache)
        return torch.cat([idx, *new_tokens], dim=1)

    @torch.inference_mode()
    def new_tokens(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                   top_k: Optional[int] = None, top_p: Optional[float] = None,
                   use_cache: bool = True) -> Iterator[torch.Tensor]:
        """generate's tokens one at a time, (batch, 1) each, as they are made: the first comes from the
        prompt's forward pass (the prefill), each later one from one decoding step."""
        prompt_len = idx.shape[1]
        n_new = max(0, min(max_new_tokens, self.config.max_seq_len - prompt_len))
        if n_new == 0:
            return
        caches = [KVCache(prompt_len + n_new) for _ in range(self.config.n_layers)] if use_cache else None
        logits, _ = self(idx, kv_caches=caches)
        for step in range(n_new):
            next_token = sample_next_token(logits[:, -1, :], temperature, top_k, top_p)  # (batch, 1)
            yield next_token
            if step == n_new - 1:
                break
            if use_cache:
                logits, _ = self(next_token, kv_caches=caches, start_pos=prompt_len + step)
            else:
                idx = torch.cat([idx, next_token], dim=1)
                logits, _ = self(idx)


class Llama(LlamaPreTrainedModel, Generation):
    def __init__(self, config: LlamaConfig, tied_embeddings: bool = True):
        super().__init__(config)
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(LlamaLayer(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        if tied_embeddings:
            self.tok_embeddings.weight = self.output.weight
        self.gradient_checkpointing = False  # trade compute for memory in training (see _layer)
        self.init_weights()
        self.freqs_cis = self._rope_table(self.norm.weight.device)  # (max_seq_len, head_dim // 2) complex64

    def _rope_table(self, device: torch.device) -> torch.Tensor:
        # Never on the meta device: a model built there gets its weights later (load_pretrained, sharded.py), and
        # the table comes from the config alone.
        with torch.device("cpu"):
            table = precompute_freqs_cis(self.config.head_dim, self.config.max_seq_len, self.config.rope_theta)
        return table if device.type == "meta" else table.to(device)

    def _apply(self, fn, *args, **kwargs):
        # The rotary table is derived from the config: a plain attribute, not a buffer, because .to(dtype),
        # .half() and .bfloat16() would cast a buffer to a real dtype (dropping the imaginary part) or round
        # it. Moves rebuild it, complex64, wherever the weights now are.
        super()._apply(fn, *args, **kwargs)
        self.freqs_cis = self._rope_table(self.norm.weight.device)
        return self

    @property
    def tied_embeddings(self) -> bool:
        return self.tok_embeddings.weight is self.output.weight

    def forward(
        self,
        tokens: torch.Tensor,
        padding_mask: Optional[torch.Tensor] = None,
        all_logits: bool = False,
        causal: bool = True,
        kv_caches: Optional[list[KVCache]] = None,
        start_pos: int = 0,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """tokens (batch, seqlen) -> (logits, hidden_states).

        logits are (batch, 1, vocab) for the last position, or (batch, seqlen, vocab) with all_logits;
        hidden_states (batch, seqlen, dim) are the final normalised ones (see hidden_states for the rest).
        """
        h = self.hidden_states(tokens, padding_mask, causal, kv_caches, start_pos)
        logits = self.output(h if all_logits else h[:, [-1], :])
        return logits, h

    def hidden_states(self, tokens: torch.Tensor, padding_mask: Optional[torch.Tensor] = None, causal: bool = True,
                      kv_caches: Optional[list[KVCache]] = None, start_pos: int = 0,
                      positions: Optional[torch.Tensor] = None, only_at: Optional[torch.Tensor] = None) -> torch.Tensor:
        """tokens (batch, seqlen) -> final normalised hidden states (batch, seqlen, dim), without the output
        layer (a classifier needs none of its 32000-wide logits).

        padding_mask (batch, start_pos + seqlen), True at real tokens, keeps padding out of every real token's
        attention. causal=False exists only to reproduce the assignment's reference outputs (sanity_check.py).
        With kv_caches, tokens are positions start_pos.. of sequences whose earlier keys/values are in the caches.
        positions (batch, seqlen), when given, are the rotary positions instead of start_pos..: a continuation of
        right-padded sequences goes on from each one's own length (its cache slots still start at start_pos).
        only_at (batch,) asks for the hidden state at one position of each sequence alone, (batch, 1, dim), e.g. a
        classifier's last real token: the last layer's output there needs that position's query and every
        position's keys and values, so the last layer computes nothing else.
        """
        seqlen = tokens.shape[1]
        # rotary positions past the window are what no model learned (a cache slot may lie past it: see positions)
        furthest = start_pos + seqlen if positions is None else int(positions.max()) + 1
        if furthest > self.config.max_seq_len:
            raise ValueError(f"sequence of {furthest} tokens exceeds max_seq_len {self.config.max_seq_len}")
        freqs_cis = self.freqs_cis[start_pos:start_pos + seqlen] if positions is None else self.freqs_cis[positions]
        mask, is_causal = attention_mask(seqlen, start_pos, padding_mask, causal, tokens.device)
        caches = kv_caches or [None] * len(self.layers)

        h = self.dropout(self.tok_embeddings(tokens))
        for layer, cache in zip(self.layers[:-1], caches):
            h = self._layer(layer, h, freqs_cis, mask, is_causal, cache, start_pos)
        if only_at is not None:
            mask, is_causal = attention_mask(seqlen, start_pos, padding_mask, causal, tokens.device, only_at)
        h = self._layer(self.layers[-1], h, freqs_cis, mask, is_causal, caches[-1], start_pos, only_at)
        return self.norm(h)

    def _layer(self, layer: LlamaLayer, *inputs: Any) -> torch.Tensor:
        """One layer's output. With gradient_checkpointing while training, its activations are not kept for the
        backward pass but recomputed there, one layer at a time (the same dropout masks: the RNG is replayed)."""
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(layer, *inputs, use_reentrant=False, context_fn=same_function_modes)
        return layer(*inputs)


def same_function_modes() -> tuple[ContextManager, ContextManager]:
    """Checkpointing's contexts: its second forward pass runs inside the backward pass, where PyTorch leaves the
    function modes behind (kernels.Bf16ProductsInFp32Kernels is one); it enters those the first pass ran under, or
    each product would save other tensors for the backward pass than the first did."""
    modes = torch.overrides._get_current_function_mode_stack()

    @contextmanager
    def entered() -> Iterator[None]:
        with ExitStack() as stack:
            for mode in modes:
                stack.enter_context(mode)
            yield

    return nullcontext(), entered()


def attention_mask(seqlen: int, start_pos: int, padding_mask: Optional[torch.Tensor], causal: bool,
                   device: torch.device, only_at: Optional[torch.Tensor] = None) -> Tuple[Optional[torch.Tensor], bool]:
    """The (mask, is_causal) pair for F.scaled_dot_product_attention; a boolean mask (batch or 1, 1, queries,
    keys) is True where a query may attend. With only_at (batch,), the one query of each sequence at that
    position (see Attention). Without padding the fast paths need no mask at all."""
    if padding_mask is None and only_at is None:
        if not causal or seqlen == 1:
            return None, False
        if start_pos == 0:
            return None, True
    n_keys = start_pos + seqlen
    if only_at is None:
        query_pos = torch.arange(start_pos, n_keys, device=device)[None, :, None]  # (1, seqlen, 1)
    else:
        query_pos = (start_pos + only_at)[:, None, None]  # (batch, 1, 1)
    key_pos = torch.arange(n_keys, device=device)[None, None, :]
    allowed = (key_pos <= query_pos) | (not causal)
    mask = allowed[:, None]
    if padding_mask is not None:
        # A padding query attends to itself too, so no row of the mask is empty (that would give NaN).
        mask = (mask & padding_mask[:, None, None, :].bool()) | (key_pos == query_pos)[:, None]
    return mask, False


def sample_next_token(logits: torch.Tensor, temperature: float, top_k: Optional[int] = None,
                      top_p: Optional[float] = None) -> torch.Tensor:
    """logits (batch, vocab) -> next token ids (batch, 1)."""
    if not logits.isfinite().all():  # argmax would pick the NaN, multinomial would end in a traceback
        raise UsageError("the model's next-token scores are NaN or infinite: its precision overflows in this model "
                         "or its weights hold NaN; try --dtype fp32 (and no --quantize)")
    if temperature == 0.0:
        return logits.argmax(dim=-1, keepdim=True)
    # Shift the best logit to 0 before dividing: a tiny temperature then sends the others to -inf, never to
    # inf - inf = NaN, and sampling becomes greedy as it should. float64, so that temperatures below float32's
    # range still divide, and top_p's cumulative sum does not reach 1.0 while thousands of tokens remain.
    logits = logits.double()
    logits = (logits - logits.max(dim=-1, keepdim=True).values) / temperature
    if top_k is not None:
        kth_best = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, [-1]]
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token once the tokens ranked above it already reach top_p
        drop_sorted = probs.cumsum(dim=-1) - probs >= top_p
        logits = logits.masked_fill(drop_sorted.scatter(1, order, drop_sorted), float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), num_samples=1)


# ---------------------------------------------------------------------------------------------------------
# Loading checkpoints

def read_checkpoint(checkpoint: str) -> tuple[LlamaConfig, Mapping[str, torch.Tensor], bool]:
    """(config, weights under our names as the file stores them, tied) of a llama2.c .pt or .bin (llama2c.py) or a
    Hugging Face folder (hf.py). The weights are memory-mapped or read when asked for, never all at once."""
    return read_hf(checkpoint) if is_hf_folder(checkpoint) else read_llama2c(checkpoint)


def stored_weights(checkpoint: str) -> Mapping[str, torch.Tensor]:
    """A checkpoint's weights, read as for a model but without loading anything yet, to fingerprint them."""
    if is_hf_folder(checkpoint):
        return SafetensorsWeights(checkpoint, *read_config(checkpoint))
    return read_llama2c(checkpoint)[1]


def load_pretrained(checkpoint: str, dtype: torch.dtype = torch.float32, quantize: Optional[str] = None,
                    on_meta: bool = False) -> Llama:
    """A Llama with the weights of a llama2.c checkpoint (train.py's .pt or the legacy .bin export, read and
    checked by llama2c.py) or of a Hugging Face folder (hf.py), held in dtype. quantize ("nf4" or "int8"): the
    layers' matrices are held quantized and frozen instead, their products in dtype (quantized.py, for QLoRA).
    on_meta: checked against the file but left on the meta device, for each process of a sharded run to read its
    own rows into (sharded.py). A checkpoint that does not match its own config is a UsageError."""
    config, weights, tied = read_checkpoint(checkpoint)
    # Built on the meta device: its names are checked against the file before any memory is taken, and the
    # tensors read become the parameters (assign), each converted on its own, so the weights are never held twice.
    with torch.device("meta"):
        model = Llama(config, tied_embeddings=tied)
    expected = model.state_dict()
    missing = sorted(k for k in expected if k not in weights)
    unexpected = sorted(k for k in weights if k not in expected)
    if missing or unexpected:
        raise UsageError(f"checkpoint {checkpoint}: tensors do not match a Llama of its own config "
                         f"(missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                         f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''})")
    held = {}
    for name, parameter in expected.items():
        if tied and name == "tok_embeddings.weight":
            continue  # the output matrix, tied below
        if weights.shape(name) != parameter.shape:
            raise UsageError(f"checkpoint {checkpoint}: tensor {name} has shape {tuple(weights.shape(name))} but its "
                             f"config give {tuple(parameter.shape)}; the file is inconsistent")
        if on_meta:
            continue
        tensor = weights[name]
        layer = name.removesuffix(".weight")
        if quantize and name.startswith("layers.") and isinstance(model.get_submodule(layer), nn.Linear):
            check_finite(checkpoint, name, tensor)
            model.set_submodule(layer, QUANTIZED_LAYERS[quantize](tensor, dtype))  # as read: one matrix at a time
            del tensor
            return_free_memory()  # else the heap keeps every matrix's temporaries (2.7 GB more at 7B, measured)
            continue
        held[name] = tensor.to(dtype)
        check_finite(checkpoint, name, held[name])
    if on_meta:
        return model.to(dtype)
    model.load_state_dict(held, strict=False, assign=True)  # every name was checked above
    if tied:
        model.tok_embeddings.weight = model.output.weight
    return model


def check_finite(checkpoint: str, name: str, tensor: torch.Tensor) -> None:
    """A weight with NaN or inf is a damaged file or a diverged run: a reduction finds it, and makes no copy."""
    if not all(bound.isfinite() for bound in torch.aminmax(tensor)):
        raise UsageError(f"checkpoint {checkpoint}: tensor {name} holds NaN or infinite values; the file is "
                         f"damaged or its training diverged: use another checkpoint")
