"""The decoding layouts: the fp32 Decoder computes what the model computes (logits, greedy text, with and without
the cache); int8 and fp16 products against their dequantized weights, and the int8 and fp16 models against the
float one on stories260K (greedy text, next-token agreement and log-probabilities over real sentences)."""
import copy

import pytest
import torch

import decoding
from conftest import STORIES260K, TOK512, asset, tiny_config
from llama import Llama, load_pretrained
from decoding import (Bf16Linear, Fp16Linear, Int8Linear, TransposedLinear, prepare_for_decoding, timed_generation,
                      weight_megabytes)
from quantized import quantize_rows
from tokenizer import Tokenizer


def test_each_weight_is_within_half_a_step_of_its_int8_value():
    torch.manual_seed(0)
    weight = torch.randn(48, 80) * torch.logspace(-3, 1, 48)[:, None]  # rows of very different sizes
    q, scale = quantize_rows(weight)
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    error = (weight - q.float() * scale.float()[:, None]).abs()
    assert (error <= scale.float()[:, None] / 2 * (1 + 1e-6)).all()


@pytest.mark.parametrize("in_features", [64, 100, 172, 512])  # 100 and 172 broke torch's CPU kernel
@pytest.mark.parametrize("rows", [1, 5])
def test_int8_linear_is_the_product_with_its_dequantized_weight(in_features, rows):
    torch.manual_seed(0)
    layer = Int8Linear(torch.randn(96, in_features) * 0.05)
    x = torch.randn(2, rows, in_features)
    expected = x @ (layer.weight.float() * layer.scale.float()[:, None]).t()
    out = layer(x)
    kernel = in_features % 32 == 0  # the CPU kernel's bf16 output, kept as it is; the fallback's in x's dtype
    assert out.shape == (2, rows, 96) and out.dtype == (torch.bfloat16 if kernel else torch.float32)
    # bf16 activations and output: 2^-8 relative, on sums of about sqrt(in_features) terms
    assert torch.allclose(out.float(), expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item())


def test_the_fp16_fallback_cannot_overflow_where_the_float_product_does_not():
    torch.manual_seed(0)
    weight = torch.randn(8, 100) * 0.02  # 100 features: the dequantizing path
    layer = Int8Linear(weight)
    x = torch.full((1, 100), 40.0)  # sums of 100 x 40 x 127 would pass fp16's 65504 before scaling
    out = layer(x.half())
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), x @ weight.t(), rtol=2e-2, atol=0.2)


@pytest.mark.parametrize("packed", [True, False], ids=["fbgemm", "elsewhere"])
def test_fp16_linear_is_the_product_with_its_half_precision_weight(packed):
    torch.manual_seed(0)
    weight = torch.randn(96, 64) * 0.05
    layer = Fp16Linear(weight, products=packed, rows=not packed)
    assert bool(layer.packed) == packed and (layer.weight is None) == packed
    x = torch.randn(2, 3, 64)
    out = layer(x)
    assert out.shape == (2, 3, 96) and out.dtype == torch.float32
    torch.testing.assert_close(out, x @ weight.half().float().t(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tied", [True, False])
def test_the_fp32_decoder_computes_what_the_model_computes(tied):
    torch.manual_seed(0)
    model = Llama(tiny_config(), tied_embeddings=tied).eval()  # grouped-query attention: 4 heads, 2 kv heads
    prepared = prepare_for_decoding(copy.deepcopy(model))
    assert all(isinstance(m, TransposedLinear) for m in (prepared.output, prepared.layers[0].wqkv))
    assert (prepared.tok_embeddings.table is prepared.output) == tied
    tokens = torch.randint(0, 97, (2, 9))
    with torch.inference_mode():
        torch.testing.assert_close(prepared(tokens, all_logits=True)[0], model(tokens, all_logits=True)[0])
        expected = model.generate(tokens[:, :3], 20, temperature=0.0)
        assert torch.equal(prepared.generate(tokens[:, :3], 20, temperature=0.0), expected)
        assert torch.equal(prepared.generate(tokens[:, :3], 20, temperature=0.0, use_cache=False), expected)


def test_fp32_products_run_in_numpy_while_pytorch_keeps_one_thread():
    """On the CPU, fp32 products go to numpy's BLAS and PyTorch runs on one thread meanwhile (two pools of spinning
    threads on two cores: a stories42M token took 110 ms instead of 13); the caller's thread count comes back.
    Under autocast, and for weights that are not float32, PyTorch's product runs as before."""
    torch.manual_seed(0)
    prepared = prepare_for_decoding(Llama(tiny_config()).eval())
    product, seen = prepared.layers[0].wqkv, []
    multiply = product.forward
    product.forward = lambda x: (seen.append((torch.get_num_threads(), product.in_numpy(x))), multiply(x))[1]
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        prepared.generate(torch.tensor([[1, 5, 7]]), 4, temperature=0.0)
        assert seen == [(1, True)] * 4 and torch.get_num_threads() == 2
        seen.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16), torch.inference_mode():
            logits, _ = prepared(torch.tensor([[1, 5]]))
        assert seen == [(2, False)] and torch.isfinite(logits).all()
    finally:
        torch.set_num_threads(threads)
    x = torch.randn(3, 64)
    layer = TransposedLinear(torch.randn(32, 64))
    torch.testing.assert_close(layer(x), x @ layer.weight_t)
    layer.double()  # numpy's view follows the weight: none for float64
    assert layer.weight_np is None and layer(x.double()).dtype == torch.float64


@pytest.mark.parametrize("quantize", [None, "int8", "fp16"])
def test_products_lists_every_weight_product_of_a_step(quantize):
    """bench/run.py times a step without its products and the products alone from this list: a product missing from it
    would be counted as part of the rest, and one listed twice, twice."""
    torch.manual_seed(0)
    prepared = prepare_for_decoding(Llama(tiny_config(), tied_embeddings=True).eval(), quantize)
    kinds = (TransposedLinear, Int8Linear, Fp16Linear)
    listed = prepared.products()
    assert len(listed) == 4 * len(prepared.layers) + 1 == len({id(m) for m in listed})
    # tied: the output matrix is the embedding table as well, not a module of its own
    assert {id(m) for m in listed} == {id(m) for m in prepared.modules() if isinstance(m, kinds)}


@pytest.fixture(scope="module")
def models():
    model = load_pretrained(asset(STORIES260K)).eval()
    prepared = {q: prepare_for_decoding(copy.deepcopy(model), q) for q in ("int8", "fp16")}
    return model, prepared, Tokenizer(asset(TOK512))


@torch.inference_mode()
def test_int8_decoding_of_layers_quantized_as_read_is_that_of_the_float_model(models):
    """Generating with --quantize int8 loads the layers' matrices quantized one at a time (never the whole float
    model); the decoder made from them is the one made from the float model, to the bit."""
    _, prepared, _ = models
    as_read = prepare_for_decoding(load_pretrained(asset(STORIES260K), quantize="int8"), "int8")
    tokens = torch.tensor([[1, 403, 407, 261, 378, 90, 7]])
    assert torch.equal(as_read(tokens, all_logits=True)[0], prepared["int8"](tokens, all_logits=True)[0])
    assert {name: b.dtype for name, b in as_read.named_buffers()} == \
        {name: b.dtype for name, b in prepared["int8"].named_buffers()}


def test_the_tied_matrix_is_stored_once_at_a_quarter_of_the_bytes(models):
    model, prepared, _ = models
    quantized = prepared["int8"]
    assert quantized.tok_embeddings.table is quantized.output and isinstance(quantized.output, Int8Linear)
    floats = sum(p.numel() for p in model.parameters() if p.dim() == 2)
    int8s = sum(b.numel() for name, b in quantized.named_buffers() if name.endswith("weight") and b.dim() == 2)
    assert int8s == floats
    assert all(b.dtype == torch.int8 for name, b in quantized.named_buffers() if name.endswith("weight") and b.dim() == 2)


def test_fp16_weights_take_half_the_bytes_and_the_tied_table_its_rows_once_more(models):
    model, prepared, _ = models
    half = prepared["fp16"]
    assert half.tok_embeddings.table is half.output and isinstance(half.output, Fp16Linear)
    floats = sum(p.numel() for p in model.parameters() if p.dim() == 2)
    rows = half.output.weight.numel()  # the embedding table reads a plain copy beside fbgemm's packed one
    norms = model.config.dim * (2 * model.config.n_layers + 1)  # fp32
    assert weight_megabytes(half) * 1e6 == pytest.approx(2 * (floats + rows) + 4 * norms)


@pytest.mark.parametrize("quantize", ["int8", "fp16"])
def test_quantized_greedy_text_keeps_the_first_120_characters_of_fp32(models, quantize):
    model, prepared, tokenizer = models
    prompt = torch.tensor([tokenizer.encode("Once upon a time", bos=True, eos=False)])
    text = lambda m: tokenizer.decode(m.generate(prompt, 80, temperature=0.0)[0].tolist())
    assert text(prepared[quantize])[:120] == text(model)[:120]


@torch.inference_mode()
@pytest.mark.parametrize("quantize, min_agreement, max_mean_change", [("int8", 0.97, 0.1), ("fp16", 0.995, 0.005)])
def test_next_tokens_agree_with_fp32_and_log_probabilities_stay_close(models, quantize, min_agreement,
                                                                       max_mean_change):
    """Over 100 real sentences (SST dev), teacher-forced: the most likely next token agrees at >= 97% of
    positions (int8) or 99.5% (fp16), and the log-probability of the token that comes next moves by 0.1 (int8)
    or 0.005 nats (fp16) on average at most.

    Why those bounds: log-softmax moves by at most twice the largest logit change (|d log p_i| <= |d z_i| +
    |d logsumexp z| <= 2 max|d z|), checked below at every position, and the logits move by the weights'
    rounding through five layers: int8, half a step per weight (1/254 of the row's largest weight) plus the bf16
    rounding of activations (2^-9), measured 0.055 nats on average, 0.76 at worst; fp16, 2^-11 of each weight
    with fp32 activations, measured 0.0015 on average, 0.02 at worst."""
    model, prepared, tokenizer = models
    with open(asset("data/sst-dev.txt"), encoding="utf-8") as f:
        sentences = [line.split("|||", 1)[1].strip() for line in f.readlines()[:100]]
    agree = positions = 0
    next_token_changes = []
    for sentence in sentences:
        ids = torch.tensor([tokenizer.encode(sentence, bos=True, eos=False)])
        exact = model(ids, all_logits=True)[0][0]
        approx = prepared[quantize](ids, all_logits=True)[0][0].float()
        agree += int((exact.argmax(-1) == approx.argmax(-1)).sum())
        positions += ids.shape[1]
        log_p, log_q = exact.log_softmax(-1), approx.log_softmax(-1)
        largest_logit_change = (exact - approx).abs().amax(-1, keepdim=True)
        assert ((log_p - log_q).abs() <= 2 * largest_logit_change + 1e-5).all()
        next_ids = ids[0, 1:, None]
        next_token_changes.append((log_p[:-1].gather(1, next_ids) - log_q[:-1].gather(1, next_ids)).abs().flatten())
    assert agree / positions >= min_agreement, f"{agree}/{positions}"
    assert torch.cat(next_token_changes).mean() <= max_mean_change


def test_bf16_weights_decode_in_fp16_products_at_two_bytes_a_weight(monkeypatch):
    """On a CPU without bf16 products, a model held in bf16 decodes with fbgemm's fp16-weight products where its
    matrices fit fp16, with logits those of the fp32 model within bf16's rounding; a matrix beyond fp16's range
    stays bf16."""
    monkeypatch.setattr(decoding, "cpu_has_bf16_matmul", lambda: False)
    torch.manual_seed(0)
    held = Llama(tiny_config(), tied_embeddings=False).eval().to(torch.bfloat16)
    with torch.no_grad():
        held.layers[1].feed_forward.w2.weight[0, 0] = 70000.0  # beyond fp16's 65504
    held_as_fp32 = copy.deepcopy(held).float()  # the same bf16 values, computed in fp32
    bf16_bytes = sum(p.numel() * 2 for p in held.parameters() if p.dim() == 2)
    prepared = prepare_for_decoding(held)
    kinds = [type(m) for m in prepared.products()]
    assert kinds.count(TransposedLinear) == 1 and prepared.layers[1].w2.weight_t.dtype == torch.bfloat16
    assert kinds.count(Fp16Linear) == len(kinds) - 1
    assert weight_megabytes(prepared) * 1e6 == pytest.approx(bf16_bytes, rel=0.01)
    with torch.no_grad():
        tokens = torch.randint(0, 97, (1, 12), generator=torch.Generator().manual_seed(3))
        expected = held_as_fp32(tokens, all_logits=True)[0]
        logits = prepared(tokens, all_logits=True)[0]
    torch.testing.assert_close(logits, expected, atol=1e-2, rtol=1e-2)


def test_bf16_weights_decode_where_they_lie_on_a_cpu_with_bf16_products(monkeypatch):
    """With bf16 products, a bf16 model decodes from its own matrices: nothing converted or copied but the
    queries' matrix (scaled), no byte more, the logits those of the fp32 model within bf16's rounding of the activations,
    and a step of one token multiplies outside oneDNN while a prompt of several multiplies in it."""
    monkeypatch.setattr(decoding, "cpu_has_bf16_matmul", lambda: True)
    torch.manual_seed(0)
    held = Llama(tiny_config(), tied_embeddings=False).eval().to(torch.bfloat16)
    held_as_fp32 = copy.deepcopy(held).float()
    bf16_bytes = sum(p.numel() * 2 for p in held.parameters() if p.dim() == 2)
    attention, feed_forward = held.layers[0].attention, held.layers[0].feed_forward
    stored = [held.output.weight, attention.wk.weight, attention.wv.weight, attention.wo.weight,
              feed_forward.w1.weight, feed_forward.w3.weight, feed_forward.w2.weight]
    prepared = prepare_for_decoding(held)
    assert all(isinstance(m, Bf16Linear) for m in prepared.products())
    layer = prepared.layers[0]
    held_parts = [prepared.output.part0, *layer.wqkv.parts[1:], layer.wo.part0, *layer.w13.parts, layer.w2.part0]
    assert [t.data_ptr() for t in held_parts] == [t.data_ptr() for t in stored]
    assert weight_megabytes(prepared) * 1e6 == pytest.approx(bf16_bytes, rel=0.01)
    onednn = []
    layer.wo.register_forward_pre_hook(lambda *_: onednn.append(torch.backends.mkldnn.enabled))
    tokens = torch.randint(0, 97, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = held_as_fp32(tokens, all_logits=True)[0]
        torch.testing.assert_close(prepared(tokens, all_logits=True)[0], expected, atol=3e-2, rtol=3e-2)
        prepared(tokens[:, :1])
    assert onednn == [True, False] and torch.backends.mkldnn.enabled


def test_generation_stops_before_the_first_stop_token_and_counts_its_step():
    torch.manual_seed(0)
    llama = Llama(tiny_config(vocab_size=8)).eval()  # eight tokens: a stop token comes soon
    prompt = torch.tensor([[1, 5, 6]])
    torch.manual_seed(1)
    whole, steps, _, ended = timed_generation(llama, prompt, 40, temperature=1.0)
    new = whole[0, 3:].tolist()
    assert not ended and steps == 39 and 2 in new
    torch.manual_seed(1)
    cut, steps, _, ended = timed_generation(llama, prompt, 40, temperature=1.0, stop_ids={2})
    assert ended and cut[0, 3:].tolist() == new[:new.index(2)] and steps == new.index(2)
