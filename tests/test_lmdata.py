"""Language-model data files: the three forms, the masked prompt, what a window cuts."""
import json

import pytest

from conftest import TOK512, asset, save_tokenizer_json
from lmdata import ALPACA_TEMPLATE, fit_pair, read_lm_rows, read_prompts, text_blocks, tokenize_lm
from tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer(asset(TOK512))


def test_a_pair_trains_its_completion_and_eos_only(tmp_path, tokenizer):
    path = tmp_path / "qa.jsonl"
    path.write_text(json.dumps({"prompt": "Q: sky?\nA:", "completion": " Blue."}) + "\n\n")
    kind, rows = read_lm_rows(str(path), "--train")
    data = tokenize_lm(kind, rows, tokenizer, 512, train_on_prompt=False)
    prompt, completion = tokenizer.encode("Q: sky?\nA:", False, False), tokenizer.encode(" Blue.", False, False)
    assert kind == "prompt-completion" and data.token_ids == [[1] + prompt + completion + [2]]
    assert data.trained_from == [1 + len(prompt)]
    assert tokenize_lm(kind, rows, tokenizer, 512, train_on_prompt=True).trained_from == [1]


def test_alpaca_rows_take_the_template_with_and_without_input(tmp_path):
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps([{"instruction": "Add.", "input": "2 and 3", "output": "5"},
                                {"instruction": "Say hi.", "input": "", "output": "Hi!"}]))
    kind, rows = read_lm_rows(str(path), "--train")
    assert kind == "alpaca" and [r.completion for r in rows] == ["5", "Hi!"]
    assert rows[0].prompt == ALPACA_TEMPLATE["with_input"].format(instruction="Add.", input="2 and 3")
    assert rows[1].prompt.endswith("### Instruction:\nSay hi.\n\n### Response:\n") and "### Input" not in rows[1].prompt
    prompts = read_prompts(str(path), "--input", ALPACA_TEMPLATE)
    assert [p for _, p in prompts] == [r.prompt for r in rows]


def test_a_long_pair_loses_its_prompt_from_the_left_then_its_completion_end():
    ids, start, cut = fit_pair(list(range(10, 20)), [30, 31, 32], prefix=[1], eos=2, window=8, train_on_prompt=False)
    assert ids == [1, 17, 18, 19, 30, 31, 32, 2] and start == 4 and cut
    ids, start, cut = fit_pair([10], list(range(30, 40)), prefix=[1], eos=2, window=6, train_on_prompt=False)
    assert ids == [1, 30, 31, 32, 33, 34] and start == 1 and cut
    assert fit_pair([10], [30], [1], 2, 8, False) == ([1, 10, 30, 2], 2, False)


def test_raw_text_is_one_stream_in_blocks_that_overlap_by_one(tmp_path, tokenizer):
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"text": "One day."}) + "\n" + json.dumps({"text": "The end."}) + "\n")
    kind, rows = read_lm_rows(str(path), "--train")
    stream = [1] + tokenizer.encode("One day.", False, False) + [2] + tokenizer.encode("The end.", False, False)
    blocks = text_blocks(rows, tokenizer, 4)
    assert kind == "text" and blocks[0] == stream[:4] and all(len(b) >= 2 for b in blocks)
    assert [t for b in blocks for t in b[1:]] == stream[1:]  # every token after the first is a target once
    assert tokenize_lm(kind, rows, tokenizer, 4, False).trained_from == [1] * len(blocks)


def test_a_tokenizer_without_a_start_token_trains_from_the_second_token(tmp_path):
    """A tokenizer.json whose template adds no <s>: pairs and raw text start with the text itself, as
    transformers' tokenizer(text) does, and the first token (nothing before it) is never a target."""
    from transformers import AutoTokenizer
    tokenizer = Tokenizer(save_tokenizer_json(asset(TOK512), tmp_path, "$A"))
    theirs = AutoTokenizer.from_pretrained(tmp_path)
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"prompt": "Q: sky?\nA:", "completion": " Blue."}) + "\n")
    pair = tokenize_lm(*read_lm_rows(str(path), "--train"), tokenizer, 512, train_on_prompt=True)
    assert pair.token_ids == [theirs("Q: sky?\nA:")["input_ids"] + theirs(" Blue.")["input_ids"] + [2]]
    assert pair.trained_from == [1]
    path.write_text(json.dumps({"text": "One day."}) + "\n")
    text = tokenize_lm(*read_lm_rows(str(path), "--train"), tokenizer, 512, train_on_prompt=False)
    assert text.token_ids == [theirs("One day.")["input_ids"]] and text.trained_from == [1]
