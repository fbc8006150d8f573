import torch

from config import LlamaConfig
from conftest import STORIES260K, TOK512, asset, tiny_config
from llama import Llama, load_pretrained, sample_next_token
from tokenizer import Tokenizer
from bench.oracle import to_transformers

STORIES42M_SHAPE = LlamaConfig(dim=512, n_layers=8, n_heads=8, n_kv_heads=8, vocab_size=32000, max_seq_len=1024)


def assert_matches_transformers(model: Llama, tokens: torch.Tensor, padding_mask=None):
    hf = to_transformers(model)
    with torch.no_grad():
        ours, _ = model(tokens, padding_mask=padding_mask, all_logits=True)
        theirs = hf(tokens, attention_mask=padding_mask).logits
    real = padding_mask.bool() if padding_mask is not None else torch.ones_like(tokens, dtype=torch.bool)
    # within 1e-5, absolute or relative to the logit (fp32 rounding differs with the order of operations)
    torch.testing.assert_close(ours[real], theirs[real], atol=1e-5, rtol=1e-5)


def test_tiny_random_matches_transformers(tiny_model):
    assert_matches_transformers(tiny_model, torch.randint(0, 97, (3, 17)))


def test_stories42M_shape_random_matches_transformers():
    torch.manual_seed(0)
    assert_matches_transformers(Llama(STORIES42M_SHAPE).eval(), torch.randint(0, 32000, (2, 24)))


def test_stories260K_matches_transformers_padded_and_unpadded():
    model = load_pretrained(asset(STORIES260K)).eval()
    torch.manual_seed(0)
    tokens = torch.randint(3, 512, (3, 20))
    assert_matches_transformers(model, tokens)
    mask = torch.ones_like(tokens)
    mask[1, 12:] = 0
    mask[2, 5:] = 0
    assert_matches_transformers(model, tokens, padding_mask=mask)


def test_right_padding_gives_the_hidden_states_of_the_sequence_alone(tiny_model):
    torch.manual_seed(0)
    alone = torch.randint(0, 97, (1, 9))
    padded = torch.cat([alone, torch.zeros(1, 6, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(1, 9), torch.zeros(1, 6)], dim=1)
    with torch.no_grad():
        _, h_alone = tiny_model(alone)
        for padding_mask in (None, mask):  # causal attention needs no mask for right padding
            _, h_padded = tiny_model(padded, padding_mask=padding_mask)
            assert torch.allclose(h_padded[:, :9], h_alone, atol=1e-6)


def test_padding_mask_matters_without_causality(tiny_model):
    torch.manual_seed(0)
    alone = torch.randint(0, 97, (1, 9))
    padded = torch.cat([alone, torch.full((1, 4), 5)], dim=1)
    mask = torch.cat([torch.ones(1, 9), torch.zeros(1, 4)], dim=1)
    with torch.no_grad():
        _, h_alone = tiny_model(alone, causal=False)
        _, h_masked = tiny_model(padded, padding_mask=mask, causal=False)
        _, h_unmasked = tiny_model(padded, causal=False)
    assert torch.allclose(h_masked[:, :9], h_alone, atol=1e-6)
    assert not torch.allclose(h_unmasked[:, :9], h_alone, atol=1e-3)


def test_causal_attention_ignores_the_future(tiny_model):
    torch.manual_seed(0)
    a = torch.randint(0, 97, (1, 10))
    b = a.clone()
    b[0, 7:] = (b[0, 7:] + 1) % 97
    with torch.no_grad():
        assert torch.allclose(tiny_model(a)[1][:, :7], tiny_model(b)[1][:, :7], atol=1e-6)


def test_last_position_logits_by_default(tiny_model):
    tokens = torch.randint(0, 97, (2, 6))
    with torch.no_grad():
        last, hidden = tiny_model(tokens)
        full, _ = tiny_model(tokens, all_logits=True)
    assert last.shape == (2, 1, 97) and hidden.shape == (2, 6, 32)
    assert torch.allclose(last[:, 0], full[:, -1])



def test_one_position_per_sequence_is_the_full_pass_s_state_and_gradient():
    """only_at (a classifier's last real token) computes the last layer for that position alone: the same state
    and the same gradients as picking it from the full pass, with and without padding masks and causality."""
    torch.manual_seed(0)
    model = Llama(tiny_config(n_layers=3)).train()  # no dropout in the tiny config: train mode is deterministic
    tokens = torch.randint(0, 97, (3, 11))
    only_at = torch.tensor([10, 4, 0])
    padding_mask = torch.arange(11)[None] <= only_at[:, None]
    for causal, mask in ((True, None), (True, padding_mask), (False, padding_mask)):
        states, grads = [], []
        for picked in (False, True):
            model.zero_grad()
            if picked:
                h = model.hidden_states(tokens, mask, causal, only_at=only_at)[:, 0]
            else:
                h = model.hidden_states(tokens, mask, causal)[torch.arange(3), only_at]
            (h * torch.linspace(-1, 1, 32)).sum().backward()
            states.append(h.detach())
            grads.append({name: p.grad.clone() for name, p in model.named_parameters()})
        torch.testing.assert_close(states[1], states[0], atol=1e-6, rtol=1e-5)
        for name in grads[0]:
            # within float32 rounding of the largest entry: the products are summed in another order
            scale = grads[0][name].abs().max().item()
            torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-5 * scale, rtol=0, msg=name)


# ---------------------------------------------------------------------------------------------------------
# generation

def test_cached_greedy_decoding_equals_recomputing(tiny_model):
    prompt = torch.randint(0, 97, (2, 5))
    cached = tiny_model.generate(prompt, 30, temperature=0.0)
    recomputed = tiny_model.generate(prompt, 30, temperature=0.0, use_cache=False)
    assert cached.shape == (2, 35)
    assert torch.equal(cached, recomputed)


def test_cached_sampling_equals_recomputing_with_the_same_seed(tiny_model):
    prompt = torch.randint(0, 97, (1, 4))
    torch.manual_seed(3)
    cached = tiny_model.generate(prompt, 20, temperature=1.0)
    torch.manual_seed(3)
    recomputed = tiny_model.generate(prompt, 20, temperature=1.0, use_cache=False)
    assert torch.equal(cached, recomputed)


def test_stories260K_greedy_is_the_published_sample_and_cache_agrees():
    model = load_pretrained(asset(STORIES260K)).eval()
    tokenizer = Tokenizer(tokenizer_model=asset(TOK512))
    prompt = torch.tensor([tokenizer.encode("Once upon a time", bos=True, eos=False)])
    out = model.generate(prompt, 60, temperature=0.0)
    assert torch.equal(out, model.generate(prompt, 60, temperature=0.0, use_cache=False))
    text = tokenizer.decode(out[0].tolist())
    assert text.startswith("Once upon a time, there was a little girl named Lily. She loved to play outside")


def test_stops_cleanly_at_max_seq_len():
    torch.manual_seed(0)
    model = Llama(tiny_config(max_seq_len=16)).eval()
    out = model.generate(torch.randint(0, 97, (1, 10)), 50, temperature=0.0)
    assert out.shape == (1, 16)
    assert torch.equal(out, model.generate(out[:, :10], 50, temperature=0.0, use_cache=False))


def test_top_k_one_is_greedy_and_top_p_keeps_the_nucleus():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    assert torch.equal(sample_next_token(logits, 1.0, top_k=1), logits.argmax(-1, keepdim=True))
    peaked = torch.full((1, 10), -10.0)
    peaked[0, 7] = 10.0
    samples = torch.cat([sample_next_token(peaked, 1.0, top_p=0.5) for _ in range(20)])
    assert (samples == 7).all()


def test_generates_under_bf16_autocast(tiny_model):
    prompt = torch.randint(0, 97, (2, 5))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = tiny_model.generate(prompt, 10, temperature=0.0)
        logits, _ = tiny_model(prompt)
    assert out.shape == (2, 15) and torch.equal(out[:, :5], prompt)
    assert logits.dtype == torch.bfloat16


def test_top_p_one_keeps_every_token(monkeypatch):
    """A float32 cumulative sum reaches 1.0 long before the last of 32000 tokens: top_p 1.0 must drop none."""
    torch.manual_seed(0)
    logits = torch.randn(1, 32000) * 3
    seen = []
    multinomial = torch.multinomial
    monkeypatch.setattr(torch, "multinomial", lambda probs, **kw: seen.append(probs) or multinomial(probs, **kw))
    sample_next_token(logits, 1.0, top_p=1.0)
    sample_next_token(logits, 1.0, top_p=0.9999999)
    assert (seen[0] > 0).sum() == 32000
    assert (seen[1] > 0).sum() > 30000


def test_a_tiny_temperature_is_greedy():
    torch.manual_seed(0)
    logits = torch.randn(3, 32000) * 5
    for temperature in (1e-38, 1e-300, 5e-324):
        assert torch.equal(sample_next_token(logits, temperature), logits.argmax(-1, keepdim=True))


def test_casting_the_model_keeps_the_rotary_table_and_the_story():
    """.to(bfloat16) and .half() would turn a complex buffer real; greedy decoding then degenerates."""
    model = load_pretrained(asset(STORIES260K)).eval()
    table = model.freqs_cis.clone()
    for dtype in (torch.bfloat16, torch.float16):
        cast = load_pretrained(asset(STORIES260K)).eval().to(dtype)
        assert cast.freqs_cis.dtype == torch.complex64 and torch.equal(cast.freqs_cis, table)
    tokenizer = Tokenizer(tokenizer_model=asset(TOK512))
    prompt = torch.tensor([tokenizer.encode("Once upon a time", bos=True, eos=False)])
    text = tokenizer.decode(model.to(torch.bfloat16).generate(prompt, 20, temperature=0.0)[0].tolist())
    assert text.startswith("Once upon a time, there was a little girl named Lily. She loved to play")


def test_gradient_checkpointing_gives_the_same_gradients_with_dropout_and_padding():
    """The layers' activations are recomputed in the backward pass, with the same dropout masks."""
    gradients, kept = [], []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = Llama(tiny_config(dropout=0.2)).train()
        model.gradient_checkpointing = checkpointing
        tokens = torch.randint(0, 97, (3, 11), generator=torch.Generator().manual_seed(1))
        padding_mask = torch.ones_like(tokens)
        padding_mask[1, 7:] = 0
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            hidden = model.hidden_states(tokens, padding_mask, only_at=torch.tensor([10, 6, 10]))
        kept.append(sum(saved))  # what the backward pass would keep from the forward pass
        hidden.pow(2).sum().backward()
        gradients.append({name: p.grad for name, p in model.named_parameters()})
    assert kept[1] < kept[0] / 2
    for name, gradient in gradients[0].items():
        torch.testing.assert_close(gradients[1][name], gradient, atol=1e-6, rtol=1e-5, msg=name)
