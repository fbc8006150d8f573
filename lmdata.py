"""Language-model data (--task lm): the three forms people fine-tune a Llama on, read by the file's content, and
their token ids with the positions that train.

- prompt / completion (JSONL with "prompt" and "completion" strings, TRL's form): [BOS] + prompt + completion + [EOS],
  the two encoded apart so that their boundary is exact; the completion and the EOS train, the prompt does not
  (with --train_on_prompt both do).
- Alpaca (a JSON list, or JSONL, of "instruction" / optional "input" / "output"): the prompt is ALPACA_TEMPLATE
  filled in, the output its completion.
- raw text (a .txt file, or JSONL with "text"): one token stream, [BOS] first and [EOS] between JSONL documents,
  cut into windows of block_size tokens that overlap by one, so that every token after the first is trained once.

An example is its token ids and `trained_from`: the first position whose token is a target (position 0, the BOS,
never is). The loss sums -log p(ids[t] | ids[:t]) over t >= trained_from.
"""
import codecs
import json
import os
from typing import Any, NamedTuple, Optional

from tokenizer import Tokenizer
from utils import UsageError, require_file

# Alpaca's prompt (Taori et al., 2023), with and without an input; a checkpoint records the one it trained with.
ALPACA_TEMPLATE = {
    "with_input": ("Below is an instruction that describes a task, paired with an input that provides further "
                   "context. Write a response that appropriately completes the request.\n\n"
                   "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"),
    "without_input": ("Below is an instruction that describes a task. Write a response that appropriately "
                      "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"),
}


class Row(NamedTuple):
    """One prompt-completion pair, or one raw-text document (prompt None)."""
    line: int  # where it is in its file (an item's position from 1, in a JSON list)
    prompt: Optional[str]
    completion: str


class LMData(NamedTuple):
    token_ids: list[list[int]]
    trained_from: list[int]
    kind: str  # "prompt-completion", "alpaca" or "text"
    n_cut: int  # rows that did not fit the window


def alpaca_prompt(record: dict, template: dict[str, str]) -> str:
    """The prompt of an Alpaca record (its instruction, and its input where it has a non-empty one)."""
    if record.get("input"):
        return template["with_input"].format(instruction=record["instruction"], input=record["input"])
    return template["without_input"].format(instruction=record["instruction"])


def read_text(path: str, flag: str) -> str:
    """A UTF-8 file's text exactly as it is (a byte-order mark aside)."""
    require_file(flag, path, "fix the path")
    with open(path, "rb") as f:
        raw = f.read().removeprefix(codecs.BOM_UTF8)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise UsageError(f"{flag} {path}:{line}: not UTF-8 ({e.reason}); re-save the file as UTF-8") from e


def _records(path: str, flag: str) -> list[tuple[int, Any]]:
    """(line, object) of a JSONL file's non-blank lines, or (position, item) of a JSON list."""
    text = read_text(path, flag)
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except ValueError as e:
            raise UsageError(f"{flag} {path}: not valid JSON ({e}); pass a JSON list of objects, or JSONL") from e
        return list(enumerate(items, start=1))
    records = []
    for line_no, line in enumerate(text.split("\n"), start=1):
        if line.strip():
            try:
                records.append((line_no, json.loads(line)))
            except ValueError as e:
                raise UsageError(f"{flag} {path}:{line_no}: not a JSON object ({e})") from e
    return records


FORMS = {"prompt-completion": ("prompt", "completion"), "alpaca": ("instruction", "output"), "text": ("text",)}


def _form(record: Any, where: str) -> str:
    if isinstance(record, dict):
        for kind, fields in FORMS.items():
            if all(field in record for field in fields):
                return kind
    raise UsageError(f"{where}: not a language-model example; each must be an object with \"prompt\" and "
                     f"\"completion\", \"instruction\" and \"output\" (Alpaca), or \"text\"")


def read_lm_rows(path: str, flag: str, template: dict[str, str] = ALPACA_TEMPLATE) -> tuple[str, list[Row]]:
    """The form of a language-model data file and its rows; anything else is a one-line error naming file:line."""
    if os.path.splitext(path)[1].lower() == ".txt":
        text = read_text(path, flag)
        if not text.strip():
            raise UsageError(f"{flag} {path}: the file is empty; give it the text to train on")
        return "text", [Row(1, None, text)]
    records = _records(path, flag)
    if not records:
        raise UsageError(f"{flag} {path}: the file has no examples")
    kind = _form(records[0][1], f"{flag} {path}:{records[0][0]}")
    rows = []
    for line, record in records:
        where = f"{flag} {path}:{line}"
        if _form(record, where) != kind:
            raise UsageError(f"{where}: a {_form(record, where)} example in a file of {kind} examples; use one form "
                             f"per file")
        for field in FORMS[kind] + (("input",) if kind == "alpaca" and record.get("input") is not None else ()):
            if not isinstance(record[field], str):
                raise UsageError(f"{where}: {field!r} is {type(record[field]).__name__}, not a string")
        completion = record[FORMS[kind][-1]]
        if not completion.strip():
            raise UsageError(f"{where}: {FORMS[kind][-1]!r} is empty; every example needs text to train on")
        prompt = {"prompt-completion": lambda: record["prompt"], "alpaca": lambda: alpaca_prompt(record, template),
                  "text": lambda: None}[kind]()
        rows.append(Row(line, prompt, completion))
    return kind, rows


def text_blocks(rows: list[Row], tokenizer: Tokenizer, block_size: int) -> list[list[int]]:
    """Raw text as one stream (the tokenizer's prefix, <s>, then doc [EOS] doc ...) in windows of block_size that
    overlap by one token."""
    stream = list(tokenizer.prefix)
    for n, row in enumerate(rows):
        stream += ([tokenizer.eos_id] if n else []) + tokenizer.encode(row.completion, bos=False, eos=False)
    step = block_size - 1
    return [stream[start:start + block_size] for start in range(0, max(len(stream) - 1, 1), step)]


def fit_pair(prompt: list[int], completion: list[int], prefix: list[int], eos: int, window: int,
             train_on_prompt: bool) -> tuple[list[int], int, bool]:
    """(ids, trained_from, whether it was cut) of one pair in at most `window` tokens, after the tokenizer's prefix
    (<s>): the prompt is cut from the left so that the completion survives; a completion that does not fit alone is
    cut at its end (and has no EOS). The first token is never trained: nothing comes before it."""
    room = window - len(prefix) - 1 - len(completion)  # what the prompt may keep beside the rest
    if room >= 0:
        kept = prompt[len(prompt) - min(room, len(prompt)):]
        ids = prefix + kept + completion + [eos]
        return ids, max(1, len(prefix) if train_on_prompt else len(prefix) + len(kept)), len(kept) < len(prompt)
    return prefix + completion[:window - len(prefix)], max(1, len(prefix)), True


def tokenize_lm(kind: str, rows: list[Row], tokenizer: Tokenizer, window: int, train_on_prompt: bool) -> LMData:
    if kind == "text":
        blocks = text_blocks(rows, tokenizer, window)
        return LMData(blocks, [1] * len(blocks), kind, 0)
    token_ids, trained_from, n_cut = [], [], 0
    for row in rows:
        ids, start, cut = fit_pair(tokenizer.encode(row.prompt, bos=False, eos=False),
                                   tokenizer.encode(row.completion, bos=False, eos=False), tokenizer.prefix,
                                   tokenizer.eos_id, window, train_on_prompt)
        token_ids.append(ids)
        trained_from.append(start)
        n_cut += cut
    return LMData(token_ids, trained_from, kind, n_cut)


def read_prompts(path: str, flag: str, template: dict[str, str]) -> list[tuple[dict, str]]:
    """The JSONL lines to complete, each with its prompt: a "prompt" as it is, or an "instruction" (and "input")
    in the Alpaca template."""
    prompts = []
    for line, record in _records(path, flag):
        where = f"{flag} {path}:{line}"
        field = next((f for f in ("prompt", "instruction") if isinstance(record, dict) and f in record), None)
        if field is None:
            raise UsageError(f"{where}: each line must be a JSON object with a \"prompt\" or an \"instruction\"")
        if not isinstance(record[field], str) or field == "instruction" and not isinstance(record.get("input", ""), str):
            raise UsageError(f"{where}: {field!r} (and \"input\") must be strings")
        prompts.append((record, record["prompt"] if field == "prompt" else alpaca_prompt(record, template)))
    if not prompts:
        raise UsageError(f"{flag} {path}: the file has no prompts")
    return prompts
