"""The model laid out for generating text (`--option generate`): Decoder, with fp32 or bf16 weights (a bf16 model's
own, where the CPU has bf16 products: Bf16Linear), int8 or fp16 ones (`--quantize int8|fp16`), and the timed
generation that the CLI and bench/run.py share.

Decoding one token reads every weight matrix once and does two flops per weight, so its speed is the speed of
reading the weights, plus the cost of every small operation around the products. Decoder keeps both low:
- Layout and library. nn.Linear keeps a weight as (out, in) and multiplies by its transpose; for a single row
  of input, MKL's product with the weight stored (in, out) reads it about 1.5x faster on this project's CPUs
  (measured: a stories42M token's products take 20-22 ms against 29-34 ms, the 32000 x 512 output matrix
  5.4-6.3 ms against 11-14 ms). TransposedLinear stores it that way: the same numbers, the same memory. On the
  CPU it multiplies in numpy's BLAS (OpenBLAS), which splits a single row's product across threads where
  PyTorch's MKL runs it on one (measured on 2 cores, a stories42M token's 33 products: 7-10 ms against 13-15,
  whatever PyTorch's thread count). The two libraries keep pools of threads that spin while they wait for
  work, and on a machine with few cores each pool's spinning starves the other (a token took 110 ms instead
  of 13, measured), so the fp32 step runs PyTorch's own small operations on one thread (too small to split
  anyway) and sets the caller's thread count back after it. numpy's BLAS threads follow OMP_NUM_THREADS (or
  OPENBLAS_NUM_THREADS).
- Size. Int8Linear keeps each row (one output feature) as int8 with one scale, W[i] ~ scale[i] * q[i] with q in
  [-127, 127], so every weight is off by at most half a step, scale[i] / 2 = max|W[i]| / 254: a quarter of
  the bytes. Activations stay floating point. On the CPU the products run in PyTorch's int8-weight kernel,
  which takes bf16 activations (fp32 ones take it 4x longer, measured) and makes bf16 outputs; the step keeps them
  bf16 where they go into another product or are added to the float32 residual stream (a conversion less each,
  about 5% of a token, measured), and makes them float32 for attention and the logits. The kernel gives wrong
  sums, or crashes, when a row's length is not a multiple of its vector block (torch 2.13 on AVX2: 172 and 100
  fail, multiples of 8 pass), so it only gets rows of a multiple of 32. Elsewhere, and on other devices, the rows
  are dequantized to the activations' dtype (float32 on the CPU) for each product: slower, never different.
  Fp16Linear keeps each weight in half precision (off by at most 2^-11 of itself, half the bytes) and multiplies
  in fbgemm's fp16-weight kernel with fp32 activations and sums, which needs AVX2, not the AVX512-FP16 that
  half-precision arithmetic would.
- Fewer operations. A step of one token spends a few microseconds on every operator call whatever its size, so
  each layer of Decoder does one product for queries, keys and values together and one for the gate and up
  projections together (the matrices concatenated at load; the queries divided by sqrt(head_dim) in their rotation),
  normalises in five small kernels, rotates queries and keys and passes the values through in one complex
  multiplication (the values' factor is 1 + 0i, exact; with the split into queries, keys and values, 15 operator
  calls a layer became 7), and attends a single query with two small products, not scaled_dot_product_attention's
  general kernel (about 40 us a call on this CPU, for a few hundred flops).
The token embeddings read their rows from the output matrix's new form when the two are tied (stored once).
"""
import contextlib
import time
from typing import Collection, ContextManager, Iterator, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from config import LlamaConfig
from kernels import cpu_has_bf16_matmul, row_blocks
from llama import Generation, KVCache, Llama, LlamaLayer, attention_mask, sample_next_token
from quantized import Int8RowsLinear, quantize_rows
from utils import return_free_memory


def numpy_view(weight: torch.Tensor) -> Optional[np.ndarray]:
    """The float32 CPU weight as numpy sees it (the same memory), made once: .numpy() is four operator calls."""
    return weight.numpy() if weight.device.type == "cpu" and weight.dtype == torch.float32 else None


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextlib.contextmanager
def without_onednn() -> Iterator[None]:
    previous = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = previous


class TransposedLinear(nn.Module):
    """A bias-free linear layer for inference whose weight is stored (in, out)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight_t", weight.detach().t().contiguous())
        self.weight_np = numpy_view(self.weight_t)

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        self.weight_np = numpy_view(self.weight_t)  # wherever the weight moves
        return self

    def in_numpy(self, x: torch.Tensor) -> bool:
        """Whether x is multiplied in numpy's BLAS (see the top): float32 on the CPU, outside autocast."""
        return (self.weight_np is not None and x.device.type == "cpu" and x.dtype == torch.float32
                and not torch.is_autocast_enabled("cpu"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_numpy(x):
            rows = x.reshape(-1, self.in_features).numpy()
            return torch.from_numpy(rows @ self.weight_np).view(*x.shape[:-1], self.out_features)
        if x.dtype != self.weight_t.dtype and not torch.is_autocast_enabled(x.device.type):
            return (x.to(self.weight_t.dtype) @ self.weight_t).to(x.dtype)  # a bf16 weight among fp16 ones
        return x @ self.weight_t

    def rows(self, indices: torch.Tensor) -> torch.Tensor:
        """Rows of the (out, in) weight, as an embedding table reads them."""
        return self.weight_t.t()[indices]


def fbgemm_fp16(device: torch.device) -> bool:
    """Whether fbgemm's fp16-weight product runs there: on the CPU, where PyTorch was built with it."""
    return device.type == "cpu" and "fbgemm" in torch.backends.quantized.supported_engines


class Int8Linear(nn.Module):
    """A bias-free linear layer for inference, its weight (out, in) in int8 with one scale per output row: made from
    float matrices, or from matrices loading already quantized (Int8RowsLinear, the same rows)."""

    def __init__(self, weight: Union[torch.Tensor, list[Union[torch.Tensor, Int8RowsLinear]]]):
        super().__init__()
        parts = weight if isinstance(weight, list) else [weight]
        if all(isinstance(part, Int8RowsLinear) for part in parts):
            q, scale = (torch.cat(rows) if len(rows) > 1 else rows[0]
                        for rows in ([part.q for part in parts], [part.scale for part in parts]))
        else:
            q, scale = quantize_rows(parts)
        self.out_features, self.in_features = q.shape
        self.register_buffer("weight", q)
        self.register_buffer("scale", scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu":
            if self.in_features % 32 == 0:
                flat = x.reshape(-1, self.in_features).to(torch.bfloat16)
                # bf16 out, as the kernel makes it: the decoding step converts only where it needs float32
                return torch._weight_int8pack_mm(flat, self.weight, self.scale).view(*x.shape[:-1], self.out_features)
            x = x.float()  # a bf16 input (the kernel's output) would take PyTorch's slow bf16 product on most CPUs
        # the rows scaled first: an int8 product scaled afterwards can pass fp16's 65504 where the model's never does
        return F.linear(x, self.weight.to(x.dtype) * self.scale[:, None].to(x.dtype))

    def rows(self, indices: torch.Tensor) -> torch.Tensor:
        return self.weight[indices].float() * self.scale[indices, None].float()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-row scales"


class Bf16Linear(nn.Module):
    """A bias-free linear layer for inference, its weight (out, in) in bf16 as the checkpoint stores it, for a CPU
    with bf16 products: nothing is converted at load, and a file's mapped weights are multiplied where they lie.
    Matrices stacked by rows (wq|wk|wv) stay apart, one product each: concatenating them copied two thirds of
    Llama-2-7B's weights, 14 s of its 38 s command (measured). A step of one row runs in PyTorch's own product,
    which reads the weights 1.5x faster than oneDNN's (27 against 18 GB/s, measured on Llama-2-7B's matrices);
    longer inputs (a prompt) run in oneDNN's (8x faster at 64 rows); Decoder.step_context chooses."""

    def __init__(self, weight: Union[torch.Tensor, list[torch.Tensor]]):
        super().__init__()
        parts = [part.detach() for part in (weight if isinstance(weight, list) else [weight])]
        self.out_features, self.in_features = sum(part.shape[0] for part in parts), parts[0].shape[1]
        self.n_parts = len(parts)
        for i, part in enumerate(parts):
            self.register_buffer(f"part{i}", part)

    @property
    def parts(self) -> list[torch.Tensor]:
        return [getattr(self, f"part{i}") for i in range(self.n_parts)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.bfloat16)
        outs = [F.linear(x, part) for part in self.parts]
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)  # bf16: the step converts where it must

    def rows(self, indices: torch.Tensor) -> torch.Tensor:
        return self.part0[indices].float()  # a table is one matrix

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bf16"


class Fp16Linear(nn.Module):
    """A bias-free linear layer for inference, its weight (out, in) in half precision. On the CPU the products
    run in fbgemm's kernel from a packed copy; `rows` keeps the plain half-precision matrix too, for an
    embedding table that reads it, and `products=False` keeps only that."""

    def __init__(self, weight: Union[torch.Tensor, list[torch.Tensor]], rows: bool = False, products: bool = True):
        super().__init__()
        parts = [part.detach() for part in (weight if isinstance(weight, list) else [weight])]  # stacked by rows
        self.out_features, self.in_features = sum(part.shape[0] for part in parts), parts[0].shape[1]
        self.packed = []  # one packed copy per block of rows: converting never holds more than a block in fp32
        if products and fbgemm_fp16(parts[0].device):
            self.packed = [torch.ops.quantized.linear_prepack_fp16(part[block].half().float(), None)
                           for part in parts for block in row_blocks(part)]
        self.packed_bytes = 2 * self.out_features * self.in_features if self.packed else 0
        self.register_buffer("weight", torch.cat([part.half() for part in parts]) if rows or not self.packed else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed:
            flat = x.reshape(-1, self.in_features).float()
            outs = [torch.ops.quantized.linear_dynamic_fp16(flat, packed) for packed in self.packed]
            out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
            return out.view(*x.shape[:-1], self.out_features).to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype))

    def rows(self, indices: torch.Tensor) -> torch.Tensor:
        return self.weight[indices].float()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp16"


def decoding_linear(weight: Union[torch.Tensor, list[torch.Tensor]], quantize: Optional[str], rows: bool = False,
                    products: bool = True) -> nn.Module:
    """The decoding form of a bias-free weight (out, in), or of matrices stacked by rows (int8 and fp16 convert them
    one by one, never their concatenation); rows/products say what it will be used for. A bf16 weight on the CPU
    stays bf16 where the CPU has bf16 products (Bf16Linear), else it is held in fp16 when it fits (half_of_bf16)."""
    parts = weight if isinstance(weight, list) else [weight]
    if quantize == "int8":
        return Int8Linear(parts)
    if quantize is None and all(part.dtype == torch.bfloat16 and part.device.type == "cpu" for part in parts) \
            and cpu_has_bf16_matmul():
        return Bf16Linear(parts)
    if quantize == "fp16" or all(half_of_bf16(part) for part in parts):
        return Fp16Linear(parts, rows=rows, products=products)
    return TransposedLinear(torch.cat(parts) if len(parts) > 1 else parts[0])


def half_of_bf16(weight: torch.Tensor) -> bool:
    """Whether a bf16 weight on the CPU decodes in fbgemm's fp16-weight product: the same two bytes a weight, read
    at about twice the speed of PyTorch's bf16 product (and many times it on a CPU without bf16 instructions). fp16
    holds every bf16 value of fp16's normal range exactly; below it (|w| < 2^-14) each loses at most 2^-25, far
    under the bf16 rounding of the weights around it. A matrix with a value beyond fp16's range stays bf16."""
    largest = torch.finfo(torch.float16).max
    return (weight.dtype == torch.bfloat16 and fbgemm_fp16(weight.device)
            and -largest <= weight.min().item() and weight.max().item() <= largest)


class TableEmbedding(nn.Module):
    """Token embeddings read from the rows of a TransposedLinear, an Int8Linear or an Fp16Linear."""

    def __init__(self, table: nn.Module):
        super().__init__()
        self.table = table

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.table.rows(tokens)


class DecoderLayer(nn.Module):
    """A LlamaLayer for inference: its weights in a decoding form, wq|wk|wv and w1|w3 each one matrix. It takes
    the matrices out of the layer it is made from."""

    def __init__(self, layer: LlamaLayer, config: LlamaConfig, quantize: Optional[str], eps: torch.Tensor):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        attention, feed_forward = layer.attention, layer.feed_forward
        self.attention_norm, self.ffn_norm = layer.attention_norm.weight, layer.ffn_norm.weight
        self.eps = eps
        self.wqkv = decoding_linear([stored(attention.wq), stored(attention.wk), stored(attention.wv)], quantize)
        # the layer gives up each matrix once converted: its bytes (a file's pages, a copy) leave memory before the
        # next matrix is made, so that converting holds one matrix more than the converted weights, not a layer
        attention.wq = attention.wk = attention.wv = None
        self.wo = decoding_linear(stored(attention.wo), quantize)
        attention.wo = None
        self.w13 = decoding_linear([stored(feed_forward.w1), stored(feed_forward.w3)], quantize)
        feed_forward.w1 = feed_forward.w3 = None
        self.w2 = decoding_linear(stored(feed_forward.w2), quantize)
        feed_forward.w2 = None

    def forward(self, x: torch.Tensor, rotations: torch.Tensor, cache: Optional[KVCache],
                start_pos: int) -> torch.Tensor:
        """x (batch, seqlen, dim) at positions start_pos..; rotations (seqlen, heads, head_dim // 2): Decoder's."""
        batch_size, seqlen, _ = x.shape
        n_heads, n_kv_heads, head_dim = self.n_heads, self.n_kv_heads, self.head_dim
        # (batch, seqlen, (n_heads + 2 n_kv_heads) head_dim)
        qkv = self.wqkv(rms_norm(x, self.attention_norm, self.eps)).float()
        pairs = torch.view_as_complex(qkv.view(batch_size, seqlen, -1, head_dim // 2, 2))
        qkv = torch.view_as_real(pairs * rotations).flatten(-2).transpose(1, 2)  # (batch, heads, seqlen, head_dim)
        query, key, value = qkv.split([n_heads, n_kv_heads, n_kv_heads], dim=1)
        if cache is not None:
            key, value = cache.update(key, value, start_pos)
        if seqlen == 1:
            # one query per head: each group of n_heads // n_kv_heads query heads against its key/value head, as
            # 3-d products over (batch * n_kv_heads), which read the cache where it is (4-d ones copy it first)
            key, value = key.flatten(0, 1), value.flatten(0, 1)  # (batch * n_kv_heads, positions, head_dim)
            scores = torch.bmm(query.reshape(batch_size * n_kv_heads, -1, head_dim), key.transpose(1, 2))
            out = torch.bmm(scores.softmax(dim=-1), value)  # (batch * n_kv_heads, group, head_dim)
        else:
            mask, is_causal = attention_mask(seqlen, start_pos, None, True, x.device)
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, is_causal=is_causal, scale=1.0,
                                                 enable_gqa=n_kv_heads != n_heads).transpose(1, 2)
        x = x + self.wo(out.reshape(batch_size, seqlen, n_heads * head_dim))
        gate, up = self.w13(rms_norm(x, self.ffn_norm, self.eps)).chunk(2, dim=-1)
        return x + self.w2(F.silu(gate) * up)


def stored(linear: nn.Module) -> Union[torch.Tensor, Int8RowsLinear]:
    """A layer's matrix as loading made it: a weight, or one already quantized to int8 rows as it was read."""
    return linear if isinstance(linear, Int8RowsLinear) else linear.weight


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * weight in five small kernels: F.rms_norm runs about a dozen on the CPU (36 us
    a call against 12, measured). eps is a tensor: a Python number would be made one at every call (a copy)."""
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    return x * torch.addcmul(eps, norm, norm, value=1 / x.shape[-1]).rsqrt_() * weight


class Decoder(nn.Module, Generation):
    """A Llama for generating text: the same outputs from fewer, faster operations (see the top of this
    file). Called like Llama, (tokens, kv_caches, start_pos) -> (logits, hidden states), without padding."""

    def __init__(self, model: Llama, quantize: Optional[str] = None):
        super().__init__()
        if quantize not in (None, "int8", "fp16"):
            raise ValueError(f"quantize must be None, 'int8' or 'fp16', got {quantize!r}")
        self.config = model.config
        tied = model.tied_embeddings
        self.norm = model.norm.weight
        self.eps = torch.tensor(model.config.norm_eps, device=self.norm.device)  # one tensor for every norm
        # the tables first: loading read them (to tell tied ones from untied), so they are already in memory
        self.output = decoding_linear(model.output.weight, quantize, rows=tied)
        model.output = nn.Identity()
        table = self.output if tied else decoding_linear(model.tok_embeddings.weight, quantize, rows=True,
                                                         products=False)
        model.tok_embeddings = nn.Identity()
        self.tok_embeddings = TableEmbedding(table)
        return_free_memory()
        self.layers = nn.ModuleList()
        for i in range(len(model.layers)):
            layer, model.layers[i] = model.layers[i], nn.Identity()  # each float layer is freed once converted
            self.layers.append(DecoderLayer(layer, model.config, quantize, self.eps))
            del layer
            return_free_memory()  # else the temporaries freed here add up to the peak (see utils)
        self.freqs_cis = model.freqs_cis  # (max_seq_len, head_dim // 2) complex64, where the weights are
        # the queries' rotations divide them by sqrt(head_dim) too, as attention wants them: no operation more
        self.query_rotations = self.freqs_cis * model.config.head_dim ** -0.5
        self.identity = torch.ones(1, model.config.n_kv_heads, model.config.head_dim // 2, dtype=self.freqs_cis.dtype,
                                   device=self.freqs_cis.device)

    def forward(self, tokens: torch.Tensor, kv_caches: Optional[list[KVCache]] = None, start_pos: int = 0,
                all_logits: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens (batch, seqlen) at positions start_pos.. -> (logits (batch, 1 or seqlen, vocab), hidden states)."""
        seqlen = tokens.shape[1]
        if start_pos + seqlen > self.config.max_seq_len:
            raise ValueError(f"sequence of {start_pos + seqlen} tokens exceeds max_seq_len {self.config.max_seq_len}")
        # each head's rotation at these positions, the values' the identity: the layers rotate queries and keys
        # and pass the values through in one complex multiplication (by 1 + 0i, exact)
        positions = slice(start_pos, start_pos + seqlen)
        rotations = torch.cat([self.query_rotations[positions, None].expand(-1, self.config.n_heads, -1),
                               self.freqs_cis[positions, None].expand(-1, self.config.n_kv_heads, -1),
                               self.identity.expand(seqlen, -1, -1)], dim=1)  # (seqlen, heads, head_dim // 2)
        h = self.tok_embeddings(tokens)
        with self.step_context(h):
            for i, layer in enumerate(self.layers):
                h = layer(h, rotations, kv_caches[i] if kv_caches else None, start_pos)
            h = rms_norm(h, self.norm, self.eps)
            return self.output(h if all_logits else h[:, -1:]).float(), h

    def step_context(self, h: torch.Tensor) -> ContextManager:
        """What a step on h runs under: PyTorch on one thread while numpy's BLAS multiplies (see the top); bf16
        products of a single row outside oneDNN (Bf16Linear)."""
        if isinstance(self.output, TransposedLinear) and self.output.in_numpy(h):
            return torch_threads(1)
        if isinstance(self.output, Bf16Linear) and h.shape[0] * h.shape[1] == 1:
            return without_onednn()
        return contextlib.nullcontext()

    def products(self) -> list[nn.Module]:
        """The weight products of a step, in order."""
        return [getattr(layer, name) for layer in self.layers for name in ("wqkv", "wo", "w13", "w2")] + [self.output]


def prepare_for_decoding(model: Llama, quantize: Optional[str] = None) -> Decoder:
    """The Decoder of model, with its own weights' precision or quantize="int8" / "fp16" (a model loaded with its
    layers in int8 keeps those rows). It takes the weights out of model, which is left without them: the float
    matrices are freed as they are converted."""
    return Decoder(model, quantize)


def timed_generation(llama: Generation, idx: torch.Tensor, max_new_tokens: int, temperature: float,
                     top_k: Optional[int] = None, top_p: Optional[float] = None,
                     stop_ids: Collection[int] = ()) -> tuple[torch.Tensor, int, float, bool]:
    """The prompt and its continuation (one sequence), the decoding steps' count and seconds (the clock starts
    once the first new token, the prefill's, exists), and whether the model ended it with one of stop_ids, which
    the continuation leaves out."""
    tokens, start, ended = [idx], None, False
    for token in llama.new_tokens(idx, max_new_tokens, temperature, top_k=top_k, top_p=top_p):
        if start is None:
            token.cpu()  # waits for the device: the prefill is over
            start = time.perf_counter()
        if stop_ids and token.item() in stop_ids:
            ended = True
            break
        tokens.append(token)
    out = torch.cat(tokens, dim=1).cpu()
    return out, max(0, len(tokens) - 2 + ended), time.perf_counter() - start if start else 0.0, ended


@torch.inference_mode()
def complete_batch(llama: Llama, prompts: list[list[int]], max_new_tokens: int, temperature: float, pad_id: int,
                   top_k: Optional[int] = None, top_p: Optional[float] = None,
                   stop_ids: Collection[int] = ()) -> list[list[int]]:
    """The new tokens of several prompts continued at once. They are left-padded, so that every row's next token
    comes from the last column; a row's rotary positions count from its own first token and a mask hides its
    padding, so that it gets what it would get alone (greedy decoding: the same tokens). A row ends at one of
    stop_ids (left out), after max_new_tokens, or at the model's window."""
    device, window = llama.norm.weight.device, llama.config.max_seq_len
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    longest = int(lengths.max())
    limits = [min(max_new_tokens, window - len(p)) for p in prompts]
    columns = torch.arange(longest, device=device)[None, :]
    padding_mask = columns >= (longest - lengths)[:, None]  # (batch, longest), True at real tokens
    tokens = torch.tensor([[pad_id] * (longest - len(p)) + p for p in prompts], device=device)
    caches = [KVCache(longest + max(limits)) for _ in llama.layers]
    hidden = llama.hidden_states(tokens, padding_mask, kv_caches=caches,
                                 positions=(columns - (longest - lengths)[:, None]).clamp(min=0))
    new: list[list[int]] = [[] for _ in prompts]
    running = [limit > 0 for limit in limits]
    for step in range(max(limits)):
        next_token = sample_next_token(llama.output(hidden[:, -1]).float(), temperature, top_k, top_p)  # (batch, 1)
        for row, token in enumerate(next_token[:, 0].tolist()):
            if running[row]:
                running[row] = token not in stop_ids
                new[row] += [token] * running[row]
                running[row] = running[row] and len(new[row]) < limits[row]
        if not any(running):
            break
        padding_mask = torch.cat([padding_mask, padding_mask.new_ones(len(prompts), 1)], dim=1)
        # a row that ended goes on at a position within the window, its tokens unused
        hidden = llama.hidden_states(next_token, padding_mask, kv_caches=caches, start_pos=longest + step,
                                     positions=(lengths + step).clamp(max=window - 1)[:, None])
    return new


def weight_megabytes(model: nn.Module) -> float:
    tensors = {t.data_ptr(): t for t in [*model.parameters(), *model.buffers()]}  # a tied matrix counts once
    packed = sum(getattr(m, "packed_bytes", 0) for m in model.modules())  # fbgemm's copies are no tensors
    return (sum(t.numel() * t.element_size() for t in tensors.values()) + packed) / 1e6
