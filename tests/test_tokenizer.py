import json
import os
import shutil
import sys

import pytest

from conftest import TOK512, asset, save_tokenizer_json
from tokenizer import Tokenizer
from utils import UsageError


def test_encode_adds_the_asked_for_markers_and_decodes_back():
    tokenizer = Tokenizer(asset(TOK512))
    ids = tokenizer.encode("Once upon a time", bos=True, eos=True)
    assert ids[0] == tokenizer.bos_id == 1 and ids[-1] == tokenizer.eos_id == 2
    assert tokenizer.decode(ids) == "Once upon a time"
    assert tokenizer.encode("Once upon a time", bos=False, eos=False) == ids[1:-1]


def test_the_pad_id_is_a_real_piece_that_text_never_uses():
    tokenizer = Tokenizer(asset(TOK512))
    assert 0 <= tokenizer.pad_id < tokenizer.n_words
    assert tokenizer.pad_id not in (tokenizer.bos_id, tokenizer.eos_id)
    assert tokenizer.pad_id not in tokenizer.encode("A sentence with punctuation, digits 0 1 2 and more!", False, False)


def test_another_vocabulary_or_file_is_refused(tmp_path):
    with pytest.raises(UsageError, match="512 pieces but checkpoint m.pt has a vocabulary of 32000"):
        Tokenizer(asset(TOK512)).check_vocab(32000, "m.pt")
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"junk" * 10)
    with pytest.raises(UsageError, match="not a sentencepiece model"):
        Tokenizer(str(junk))


def sentences(name: str) -> list[str]:
    with open(asset(f"data/{name}-dev.txt"), encoding="utf-8") as f:
        return [line.split(" ||| ", 1)[1].rstrip("\n") for line in f if line.strip()]


@pytest.fixture(scope="module", params=[TOK512, "tokenizer.model"])
def saved_by_transformers(request, tmp_path_factory):
    """A sentencepiece model, and the tokenizer.json folder that transformers 5 saves of it (and nothing else)."""
    transformers = pytest.importorskip("transformers")
    source, folder = tmp_path_factory.mktemp("spm"), tmp_path_factory.mktemp("json")
    shutil.copyfile(asset(request.param), source / "tokenizer.model")
    (source / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer", "add_bos_token": True}))
    transformers.AutoTokenizer.from_pretrained(source).save_pretrained(folder)
    assert sorted(os.listdir(folder)) == ["tokenizer.json", "tokenizer_config.json"]
    return asset(request.param), folder


def test_tokenizer_json_gives_transformers_ids_and_sentencepiece_s(saved_by_transformers):
    from transformers import AutoTokenizer
    model, folder = saved_by_transformers
    ours, spm = Tokenizer(str(folder / "tokenizer.json")), Tokenizer(model)
    assert (ours.n_words, ours.bos_id, ours.eos_id, ours.pad_id) == (spm.n_words, spm.bos_id, spm.eos_id, spm.pad_id)
    texts = sentences("sst") + sentences("cfimdb") + ["a <s> inside, </s> and <unk> too", "  two  spaces ", ""]
    theirs = AutoTokenizer.from_pretrained(folder, split_special_tokens=True)
    with_eos = AutoTokenizer.from_pretrained(folder, split_special_tokens=True, add_bos_token=True, add_eos_token=True)
    assert [ours.encode(t, bos=False, eos=False) for t in texts] == theirs(texts, add_special_tokens=False)["input_ids"]
    assert [ours.encode(t, bos=True, eos=False) for t in texts] == theirs(texts)["input_ids"]
    assert [ours.encode(t, bos=True, eos=True) for t in texts] == with_eos(texts)["input_ids"]
    # runs of spaces are cut otherwise by sentencepiece than by transformers' reading of its model (docs/usage.md)
    same_text = [t for t in texts if "  " not in t]
    assert [ours.encode(t, True, True) for t in same_text] == [spm.encode(t, True, True) for t in same_text]
    assert [ours.decode(ours.encode(t, True, True)) for t in texts[:50]] == [spm.decode(spm.encode(t, True, True))
                                                                             for t in texts[:50]]
    assert ours.piece(ours.pad_id) == spm.piece(spm.pad_id) == "<0x00>"


@pytest.mark.parametrize("single", ["<s> $A", "$A", "<s> $A </s>", None])
def test_a_text_is_read_between_the_post_processor_s_special_tokens_as_transformers_reads_it(tmp_path, single):
    from transformers import AutoTokenizer
    ours = Tokenizer(save_tokenizer_json(asset(TOK512), tmp_path, single))
    texts = sentences("sst")[:20] + ["a <s> inside, </s> and <unk> too", ""]
    theirs = AutoTokenizer.from_pretrained(tmp_path, split_special_tokens=True)  # text is text, as ours reads it
    assert [ours.encode_text(t) for t in texts] == theirs(texts)["input_ids"]
    assert (Tokenizer(asset(TOK512)).prefix, Tokenizer(asset(TOK512)).suffix) == ([1], [])  # llama2.c's: <s> first


def test_a_tokenizer_json_without_llama_s_start_token_is_refused(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    bare = tokenizers.Tokenizer(tokenizers.models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    bare.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(UsageError, match="tokenizer.json: no token <s> or </s>"):
        Tokenizer(str(tmp_path / "tokenizer.json"))


def test_without_the_tokenizers_library_a_tokenizer_json_is_one_line_of_advice(tmp_path, monkeypatch):
    (tmp_path / "tokenizer.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # import tokenizers now raises ImportError
    with pytest.raises(UsageError, match="tokenizer.json needs Hugging Face's tokenizers; run ./setup.sh"):
        Tokenizer(str(tmp_path / "tokenizer.json"))
