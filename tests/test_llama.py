import os

import pytest
import torch

from config import LlamaConfig
from conftest import STORIES260K, asset, tiny_config, to_transformers
from llama import Llama, load_pretrained
from utils import UsageError

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


def test_pt_and_bin_exports_give_identical_logits():
    pt, bin_ = load_pretrained(asset("stories260K.pt")), load_pretrained(asset("stories260K.bin"))
    tokens = torch.randint(0, 512, (2, 30))
    with torch.no_grad():
        assert torch.equal(pt(tokens, all_logits=True)[0], bin_(tokens, all_logits=True)[0])
    assert pt.config.hidden_dim == bin_.config.hidden_dim == 172


def save_checkpoint(tmp_path, state_dict, model_args, name="model.pt"):
    path = os.path.join(tmp_path, name)
    torch.save({"model": state_dict, "model_args": model_args, "iter_num": 0}, path)
    return path


def test_loads_assignment_names_and_compile_prefix(tmp_path, tiny_model):
    renames = {"wq": "compute_query", "wk": "compute_key", "wv": "compute_value", "wo": "compute_output"}
    state = {}
    for name, tensor in tiny_model.state_dict().items():
        parts = [renames.get(p, p) for p in name.split(".")]
        state["_orig_mod." + ".".join(parts)] = tensor
    args = {k: getattr(tiny_model.config, k) for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size",
                                                         "multiple_of", "max_seq_len")}
    loaded = load_pretrained(save_checkpoint(tmp_path, state, args)).eval()
    tokens = torch.randint(0, 97, (2, 8))
    with torch.no_grad():
        assert torch.equal(loaded(tokens)[0], tiny_model(tokens)[0])
    assert loaded.tied_embeddings


@pytest.mark.parametrize("corrupt, message", [
    (lambda s: s.pop("layers.1.attention.wk.weight"), "missing"),
    (lambda s: s.__setitem__("layers.0.extra.weight", torch.zeros(3)), "unexpected"),
    (lambda s: s.__setitem__("norm.weight", torch.ones(31)), "shape"),
])
def test_strict_loading_refuses_mismatched_tensors(tmp_path, tiny_model, corrupt, message):
    state = dict(tiny_model.state_dict())
    corrupt(state)
    args = {"dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 97, "multiple_of": 8}
    with pytest.raises(UsageError, match=message):
        load_pretrained(save_checkpoint(tmp_path, state, args))


def test_unknown_model_args_are_ignored_and_missing_defaulted():
    with pytest.warns(UserWarning, match="ignored"):
        config = LlamaConfig.from_model_args({"dim": 64, "n_heads": 8, "flash": True})
    assert config.n_kv_heads == 8 and config.vocab_size == 32000 and config.hidden_dim == 192
    assert tiny_config().hidden_dim == 88  # 2/3 * 4 * 32 = 85, rounded up to a multiple of 8


def test_untied_bin_export_loads_its_own_output_matrix(tmp_path):
    import struct

    torch.manual_seed(0)
    model = Llama(tiny_config(), tied_embeddings=False).eval()
    c = model.config
    tensors = [model.tok_embeddings.weight]
    for name in ("attention_norm", "attention.wq", "attention.wk", "attention.wv", "attention.wo", "ffn_norm",
                 "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"):
        tensors += [layer.get_submodule(name).weight for layer in model.layers]
    tensors += [model.norm.weight, model.freqs_cis.real, model.freqs_cis.imag, model.output.weight]
    path = os.path.join(tmp_path, "untied.bin")
    with open(path, "wb") as f:
        f.write(struct.pack("7i", c.dim, c.hidden_dim, c.n_layers, c.n_heads, c.n_kv_heads, -c.vocab_size,
                            c.max_seq_len))
        for t in tensors:
            f.write(t.detach().float().numpy().tobytes())
    loaded = load_pretrained(path).eval()
    assert not loaded.tied_embeddings
    tokens = torch.randint(0, 97, (1, 7))
    with torch.no_grad():
        assert torch.equal(loaded(tokens)[0], model(tokens)[0])


def test_loads_torch_s_old_non_zip_format(tmp_path):
    path = os.path.join(tmp_path, "old.pt")
    torch.save(torch.load(asset(STORIES260K)), path, _use_new_zipfile_serialization=False)  # cannot be mmapped
    tokens = torch.randint(0, 512, (1, 9))
    with torch.no_grad():
        assert torch.equal(load_pretrained(path)(tokens)[0], load_pretrained(asset(STORIES260K))(tokens)[0])
