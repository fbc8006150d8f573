import pytest

from conftest import TOK512, asset
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
