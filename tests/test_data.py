"""Data files, tokenizing to the model's window, and batching."""
import pytest
import torch

from conftest import TOK512, asset
from classifier import prompt_suffix_text
from data import MAX_PADDING, make_batches, micro_batches, pad_batch, shard, tokenize
from datafiles import Example
from tokenizer import Tokenizer
from utils import UsageError

LABELS = ["awful", "bad", "average", "good", "excellent"]


def test_max_sentence_len_cuts_only_the_sentence():
    tokenizer = Tokenizer(tokenizer_model=asset(TOK512))
    suffix = tokenizer.encode(prompt_suffix_text(LABELS), bos=False, eos=False)
    sentence = "a long and winding sentence about a film"
    body = tokenizer.encode(sentence, bos=False, eos=False)
    ids, n_cut = tokenize([Example(1, 0, sentence)], tokenizer, 512, max_sentence_len=2, prompt_suffix=suffix)
    assert ids == [[tokenizer.bos_id] + body[:2] + suffix] and n_cut == 0
    ids, _ = tokenize([Example(1, 0, sentence)], tokenizer, 512, max_sentence_len=3)
    assert ids == [[tokenizer.bos_id] + body[:3] + [tokenizer.eos_id]]


def test_the_window_cuts_the_sentence_and_keeps_the_prompt_and_label_room():
    tokenizer = Tokenizer(tokenizer_model=asset(TOK512))
    suffix = [7, 8, 9]
    ids, n_cut = tokenize([Example(1, 0, "word " * 50), Example(2, 1, "short")], tokenizer, 20, prompt_suffix=suffix, label_room=2)
    assert n_cut == 1
    assert len(ids[0]) == 20 - 2 and ids[0][-3:] == suffix and ids[0][0] == tokenizer.bos_id
    with pytest.raises(UsageError, match="max_seq_len 20"):
        tokenize([Example(1, 0, "x")], tokenizer, 20, prompt_suffix=list(range(17)), label_room=2)


def test_evaluation_batches_cover_every_example_once_sorted_by_length():
    lengths = [5, 1, 9, 3, 3, 7, 2]
    batches = make_batches(lengths, 3, shuffle=False)
    flat = [i for batch in batches for i in batch]
    assert sorted(flat) == list(range(len(lengths)))
    assert [lengths[i] for i in flat] == sorted(lengths)
    assert all(len(batch) <= 3 for batch in batches)


def test_training_batches_cover_every_example_once_and_follow_the_seed():
    lengths = [int(n) for n in torch.randint(1, 60, (500,), generator=torch.Generator().manual_seed(0))]
    draw = lambda seed: make_batches(lengths, 16, shuffle=True, generator=torch.Generator().manual_seed(seed))
    batches = draw(1)
    assert sorted(i for batch in batches for i in batch) == list(range(500))
    assert all(len(batch) <= 16 for batch in batches)
    assert draw(1) == batches and draw(2) != batches


def padding(lengths: list[int], batches: list[list[int]]) -> float:
    """Padded tokens per real token."""
    return sum(max(lengths[i] for i in batch) * len(batch) for batch in batches) / sum(lengths) - 1


@pytest.mark.parametrize("n_examples", [40, 200])
def test_every_epoch_draws_new_training_batches(n_examples):
    # distinct lengths: a whole-set sort (the buckets before issue 22) gave every epoch the very same batches
    lengths = [int(n) + 1 for n in torch.randperm(n_examples, generator=torch.Generator().manual_seed(0))]
    generator = torch.Generator().manual_seed(0)
    epochs = [make_batches(lengths, 16, shuffle=True, generator=generator) for _ in range(3)]
    for batches in epochs:
        assert sorted(i for batch in batches for i in batch) == list(range(n_examples))
    compositions = [{frozenset(batch) for batch in batches} for batches in epochs]
    assert not compositions[0] & compositions[1] and not compositions[1] & compositions[2]


@pytest.mark.parametrize("n, size", [(32, 4), (10, 4), (7, 8), (1, 4), (9, 2)])
def test_micro_batches_cut_a_step_evenly_by_length(n, size):
    lengths = [int(x) for x in torch.randint(1, 60, (n,), generator=torch.Generator().manual_seed(n))]
    parts = micro_batches(lengths, size)
    assert sorted(i for part in parts for i in part) == list(range(n))
    assert [lengths[i] for part in parts for i in part] == sorted(lengths)
    assert len(parts) == -(-n // size)  # as few as the size allows, and no empty one
    sizes = [len(part) for part in parts]
    assert max(sizes) <= size and max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("batch_size", [8, 32, 80])
def test_by_default_micro_batches_are_the_fewest_that_pad_a_quarter_or_less(batch_size):
    lengths = [int(x) for x in torch.randint(3, 120, (640,), generator=torch.Generator().manual_seed(0))]
    batches = make_batches(lengths, batch_size, shuffle=True, generator=torch.Generator().manual_seed(0))
    micro = []
    for batch in batches:
        parts = micro_batches([lengths[i] for i in batch])
        assert [lengths[batch[i]] for part in parts for i in part] == sorted(lengths[i] for i in batch)
        assert padding([lengths[i] for i in batch], parts) <= MAX_PADDING
        if len(parts) > 1:  # one part fewer pads more
            fewer = micro_batches([lengths[i] for i in batch], size=-(-len(batch) // (len(parts) - 1)))
            assert len(fewer) == len(parts) - 1 and padding([lengths[i] for i in batch], fewer) > MAX_PADDING
        micro += [[batch[i] for i in part] for part in parts]
    assert padding(lengths, micro) < 0.3 * padding(lengths, batches)  # random batches pad about 1 per real token


def test_a_short_global_batch_is_filled_with_copies_that_weigh_nothing():
    shares = [shard([10, 11, 12], rank, 2) for rank in range(2)]
    assert shares == [([10, 12], [1.0, 1.0]), ([11], [1.0])]
    shares = [shard([10], rank, 3) for rank in range(3)]
    assert [indices for indices, _ in shares] == [[10], [10], [10]]
    assert sum(w for _, weights in shares for w in weights) == 1.0


def test_pad_batch_right_pads_and_keeps_the_lengths():
    tokens, lengths = pad_batch([[1, 2, 3], [4]], pad_id=0)
    assert tokens.tolist() == [[1, 2, 3], [4, 0, 0]] and lengths.tolist() == [3, 1]
