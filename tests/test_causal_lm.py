"""The language model as a task, against transformers' LlamaForCausalLM: the masked loss, the perplexity recipe,
batched greedy generation."""
import math

import pytest
import torch

from causal_lm import IGNORE, build_language_model, next_token_targets, sliding_windows
from conftest import tiny_config
from data import Split, pad_batch
from decoding import complete_batch
from evaluate import lm_loss
from llama import Llama
from runtime import Runtime
from bench.oracle import to_transformers

CPU = Runtime(torch.device("cpu"))


def random_examples(n: int, seed: int) -> tuple[list[list[int]], list[int]]:
    generator = torch.Generator().manual_seed(seed)
    token_ids, trained_from = [], []
    for _ in range(n):
        length = int(torch.randint(3, 20, (1,), generator=generator))
        token_ids.append([1] + torch.randint(3, 97, (length - 1,), generator=generator).tolist())
        trained_from.append(int(torch.randint(1, length, (1,), generator=generator)))
    return token_ids, trained_from


def test_the_masked_loss_is_transformers_loss_with_labels(tiny_model):
    """Token-mean cross-entropy over the trained positions, prompts and padding masked: labels=-100 in transformers."""
    token_ids, trained_from = random_examples(6, seed=0)
    tokens, _ = pad_batch(token_ids, pad_id=0)
    ours = build_language_model(tiny_model, lora=None)(tokens, next_token_targets(token_ids, trained_from,
                                                                                   tokens.shape[1]))
    labels = torch.full_like(tokens, IGNORE)
    for row, (ids, start) in enumerate(zip(token_ids, trained_from)):
        labels[row, start:len(ids)] = torch.tensor(ids[start:])
    attention_mask = (torch.arange(tokens.shape[1])[None] < torch.tensor([len(t) for t in token_ids])[:, None]).long()
    theirs = to_transformers(tiny_model)(input_ids=tokens, attention_mask=attention_mask, labels=labels).loss
    assert len(ours) == sum(len(ids) - start for ids, start in zip(token_ids, trained_from))
    torch.testing.assert_close(ours.mean(), theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n_tokens, window, stride", [(150, 64, 32), (150, 64, 63), (64, 64, 10), (30, 64, 32)])
def test_perplexity_scores_each_token_once_with_the_context_of_its_window(tiny_model, n_tokens, window, stride):
    """transformers' fixed-length recipe, token by token: a window of `window` tokens moved by `stride`; each token
    after the first is scored in the first window that reaches it, with that window's tokens before it."""
    ids = [1] + torch.randint(3, 97, (n_tokens - 1,), generator=torch.Generator().manual_seed(1)).tolist()
    windows = sliding_windows(len(ids), window, stride)
    split = Split("input", [], [], [ids[b:e] for b, e, _ in windows], trained_from=[f - b for b, _, f in windows])
    loss_sum, count = lm_loss(build_language_model(tiny_model, None), split, 3, 0, CPU)

    hf, expected, scored = to_transformers(tiny_model), 0.0, set()
    for begin in range(0, len(ids), stride):
        end = min(begin + window, len(ids))
        with torch.no_grad():
            log_probs = hf(input_ids=torch.tensor([ids[begin:end]])).logits[0].log_softmax(-1)
        for t in range(begin + 1, end):
            if t not in scored:
                scored.add(t)
                expected -= log_probs[t - begin - 1, ids[t]].item()
        if end == len(ids):
            break
    assert scored == set(range(1, len(ids))) and count == len(ids) - 1
    assert loss_sum == pytest.approx(expected, rel=1e-5)
    assert math.exp(loss_sum / count) > 1


def test_batched_greedy_completions_are_one_at_a_time_and_transformers():
    torch.manual_seed(0)
    llama = Llama(tiny_config(max_seq_len=40)).eval()
    prompts = [[1, 5, 9, 11, 30], [1, 7], [1, 40, 41, 42, 43, 44, 45, 46, 47, 48], [1, 3, 3]]
    batched = complete_batch(llama, prompts, max_new_tokens=12, temperature=0.0, pad_id=0, stop_ids={2})
    alone = [complete_batch(llama, [p], 12, 0.0, pad_id=0, stop_ids={2})[0] for p in prompts]
    assert batched == alone
    hf = to_transformers(llama)
    for prompt, new in zip(prompts, batched):
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=2, pad_token_id=0)
        theirs = out[0, len(prompt):].tolist()
        assert new == (theirs[:theirs.index(2)] if 2 in theirs else theirs)


def test_a_completion_stops_at_the_window_of_its_own_prompt():
    """A short prompt beside a long one gets the tokens it would get alone: the window limits each row apart."""
    torch.manual_seed(0)
    llama = Llama(tiny_config(max_seq_len=16)).eval()
    prompts = [[1] + list(range(10, 24)), [1, 5]]
    new = complete_batch(llama, prompts, max_new_tokens=20, temperature=0.0, pad_id=0)
    assert [len(n) for n in new] == [1, 14]
    assert new[1] == complete_batch(llama, prompts[1:], 20, 0.0, pad_id=0)[0]
