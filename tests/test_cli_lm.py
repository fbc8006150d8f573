"""The language model end to end on stories260K (--task lm, perplexity, batched generation, export), as a user runs
it, against transformers, torch's AdamW and PEFT."""
import json

import pytest
import torch

from conftest import STORIES260K, TOK512, asset, file_size_limit
from lmdata import read_lm_rows, tokenize_lm
from test_cli import fails, model_flags, run, sst_subset  # noqa: F401 (a fixture)
from tokenizer import Tokenizer

QA = [("What color is the sky?", "The sky is blue."), ("What does a cat say?", "A cat says meow."),
      ("Who likes to play?", "Lily likes to play."), ("Where is the ball?", "The ball is in the park."),
      ("What is hot?", "The sun is hot."), ("Who is Tom?", "Tom is a boy.")]
STORY = ("Once upon a time, there was a little girl named Lily. She loved to play outside in the park. One day, she "
         "saw a big red ball under a tree. She ran to the ball and picked it up. Lily was very happy.\n")


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


@pytest.fixture
def qa(tmp_path) -> str:
    return write_jsonl(tmp_path / "qa.jsonl", [{"prompt": f"Q: {q}\nA:", "completion": f" {a}"} for q, a in QA])


def test_sft_answers_its_training_prompts_and_stops_at_eos(tmp_path, qa):
    run(["--option", "finetune", "--task", "lm", *model_flags(), "--train", qa, "--epochs", "40", "--lr", "3e-3",
         "--batch_size", "3", "--filepath", "qa.pt"], tmp_path)
    questions = write_jsonl(tmp_path / "questions.jsonl", [{"id": n, "prompt": f"Q: {q}\nA:"} for n, (q, _) in
                                                           enumerate(QA)])
    run(["--option", "generate", "--filepath", "qa.pt", "--input", questions, "--output", "answers.jsonl",
         "--batch_size", "4"], tmp_path)
    answers = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert [a["id"] for a in answers] == list(range(len(QA)))  # the input's order, its fields kept
    assert [a["completion"] for a in answers] == [f" {a}" for _, a in QA]  # nothing after </s>


def test_steps_are_transformers_with_torch_adamw_its_schedule_and_clipping(tmp_path, qa):
    """Four full-batch steps cut into micro-batches, with cosine warmup, weight decay and clipping; the loss of a
    step is its token losses' sum over its trained tokens (transformers' num_items_in_batch). Our AdamW is the
    assignment's, with its eps inside the bias correction: torch's takes eps / sqrt(1 - beta2^t) to match."""
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM, get_cosine_schedule_with_warmup

    schedule = ["--lr_scheduler", "cosine", "--warmup_steps", "2", "--weight_decay", "5", "--max_grad_norm", "0.5"]
    run(["--option", "finetune", "--task", "lm", *model_flags(), "--train", qa, "--epochs", "4", "--lr", "1e-3",
         "--batch_size", "6", "--micro_batch_size", "2", *schedule, "--filepath", "m.pt"], tmp_path)
    run(["--option", "export", "--filepath", "m.pt", "--output", "ours"], tmp_path)
    run(["--option", "export", "--lm-only", *model_flags(), "--output", "base"], tmp_path)

    kind, rows = read_lm_rows(qa, "--train")
    data = tokenize_lm(kind, rows, Tokenizer(asset(TOK512)), 512, train_on_prompt=False)
    theirs = LlamaForCausalLM.from_pretrained(tmp_path / "base", torch_dtype=torch.float32)
    optimizer = torch.optim.AdamW([{"params": [p for p in theirs.parameters() if p.dim() >= 2], "weight_decay": 5.0},
                                   {"params": [p for p in theirs.parameters() if p.dim() < 2], "weight_decay": 0.0}],
                                  lr=1e-3)
    scheduler = get_cosine_schedule_with_warmup(optimizer, 2, 4)
    n_items = sum(len(ids) - start for ids, start in zip(data.token_ids, data.trained_from))
    norms = []
    for step in range(4):
        optimizer.zero_grad()
        for part in range(0, 6, 2):
            ids = data.token_ids[part:part + 2]
            longest = max(map(len, ids))
            tokens = torch.tensor([t + [0] * (longest - len(t)) for t in ids])
            labels = torch.tensor([[-100] * start + t[start:] + [-100] * (longest - len(t))
                                   for t, start in zip(ids, data.trained_from[part:part + 2])])
            theirs(input_ids=tokens, attention_mask=(tokens != 0).long(), labels=labels,
                   num_items_in_batch=n_items).loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(theirs.parameters(), 0.5)))
        for group in optimizer.param_groups:
            group["eps"] = 1e-6 / (1 - 0.999 ** (step + 1)) ** 0.5
        optimizer.step()
        scheduler.step()
    assert min(norms) > 0.5  # clipping took part in every step
    base, ours = load_file(tmp_path / "base" / "model.safetensors"), load_file(tmp_path / "ours" / "model.safetensors")
    for name, trained in theirs.state_dict().items():
        if name in ours:  # a tied lm_head is the embedding
            moved = (trained - base[name]).abs().max()
            assert (ours[name] - trained).abs().max() < 0.01 * moved, name  # the float noise of tiny gradients


def test_resume_in_the_middle_of_warmup_is_bit_exact(tmp_path, qa):
    common = ["--option", "lora", "--task", "lm", *model_flags(), "--train", qa, "--dev", qa, "--lr", "1e-2",
              "--batch_size", "2", "--warmup_steps", "5", "--weight_decay", "0.1", "--max_grad_norm", "1",
              "--lora_targets", "all", "--filepath", "model.pt"]
    for folder in ("whole", "resumed"):
        (tmp_path / folder).mkdir()
    run(common + ["--epochs", "2"], tmp_path / "whole")
    run(common + ["--epochs", "1"], tmp_path / "resumed")  # 3 steps: warmup goes on after the resume
    run(common + ["--epochs", "2", "--resume"], tmp_path / "resumed")
    for name in ("model.pt", "model.pt.state"):
        whole = torch.load(tmp_path / "whole" / name, weights_only=True)
        resumed = torch.load(tmp_path / "resumed" / name, weights_only=True)
        assert all(torch.equal(whole["trainable"][k], resumed["trainable"][k]) for k in whole["trainable"])
    assert whole["schedule"]["last_epoch"] == 6
    assert (tmp_path / "whole" / "model.metrics.jsonl").read_text().count("dev_perplexity") == 2


def test_a_decaying_schedule_refuses_other_epochs_on_resume(tmp_path, qa, capsys):
    common = ["--option", "lora", "--task", "lm", *model_flags(), "--train", qa, "--lr_scheduler", "linear",
              "--filepath", "model.pt"]
    run(common + ["--epochs", "1"], tmp_path)
    error = fails(common + ["--epochs", "2", "--resume"], tmp_path, capsys)
    assert "--epochs 1 there, 2 here" in error and "constant --lr_scheduler" in error


def test_continued_pretraining_on_raw_text_lowers_its_perplexity(tmp_path):
    (tmp_path / "story.txt").write_text(STORY * 4, encoding="utf-8")
    run(["--option", "perplexity", *model_flags(), "--input", "story.txt", "--output", "before.json"], tmp_path)
    run(["--option", "finetune", "--task", "lm", *model_flags(), "--train", "story.txt", "--block_size", "64",
         "--epochs", "3", "--lr", "1e-3", "--batch_size", "4", "--filepath", "story.pt"], tmp_path)
    run(["--option", "perplexity", "--filepath", "story.pt", "--input", "story.txt", "--output", "after.json"],
        tmp_path)
    before, after = (json.loads((tmp_path / name).read_text()) for name in ("before.json", "after.json"))
    tokens = len(Tokenizer(asset(TOK512)).encode(STORY * 4, bos=True, eos=False)) - 1
    assert before["tokens"] == after["tokens"] == tokens
    assert after["perplexity"] < 0.7 * before["perplexity"]


def test_an_exported_lm_and_its_peft_adapter_generate_our_text(tmp_path, qa):
    from peft import PeftModel
    from transformers import AutoTokenizer, LlamaForCausalLM

    run(["--option", "lora", "--task", "lm", *model_flags(), "--train", qa, "--epochs", "3", "--lr", "1e-2",
         "--lora_targets", "all", "--lora_alpha", "16", "--filepath", "qa.pt"], tmp_path)
    prompt = f"Q: {QA[0][0]}\nA:"
    questions = write_jsonl(tmp_path / "q.jsonl", [{"prompt": prompt}])
    run(["--option", "generate", "--filepath", "qa.pt", "--input", questions, "--output", "a.jsonl",
         "--max_new_tokens", "12", "--ignore_eos"], tmp_path)
    ours = json.loads((tmp_path / "a.jsonl").read_text())["completion"]
    run(["--option", "export", "--filepath", "qa.pt", "--output", "merged"], tmp_path)
    run(["--option", "export", "--filepath", "qa.pt", "--adapter", "--output", "adapter"], tmp_path)
    run(["--option", "export", "--lm-only", *model_flags(), "--output", "base"], tmp_path)

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    assert ids[0].tolist() == Tokenizer(asset(TOK512)).encode(prompt, bos=True, eos=False)
    merged = LlamaForCausalLM.from_pretrained(tmp_path / "merged", torch_dtype=torch.float32)
    out = merged.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=None)
    assert tokenizer.decode(out[0, ids.shape[1]:]) == ours
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"
    peft = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tmp_path / "base", torch_dtype=torch.float32),
                                     tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(peft(out).logits, merged(out).logits, rtol=1e-4, atol=1e-4)


def test_every_output_that_cannot_be_written_is_one_line_and_leaves_no_file(tmp_path, sst_subset, capsys):
    """A file-size limit (as `ulimit -f` sets) on the outputs of generate, perplexity and the zero-shot predictions:
    one line naming the file and the cause, exit 2, and the folder holds what it held before."""
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": STORY[:40]}])
    (tmp_path / "story.txt").write_text(STORY, encoding="utf-8")
    runs = {"out.jsonl": ["--option", "generate", "--input", prompts, "--output", "out.jsonl", "--max_new_tokens", "8"],
            "ppl.json": ["--option", "perplexity", "--input", "story.txt", "--output", "ppl.json"],
            "dev.txt": ["--option", "prompt", *sst_subset, "--dev_out", "dev.txt", "--test_out", "test.txt"]}
    import sklearn.metrics  # noqa: F401 (imported here: joblib's import makes a file, which the limit would fail)
    before = sorted(p.name for p in tmp_path.iterdir())
    for output, args in runs.items():
        with file_size_limit(16):
            line = fails([*args, *model_flags()], tmp_path, capsys)
        assert line.startswith(f"error: could not write {output}: File too large"), line
        assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_a_long_prompt_keeps_the_tokenizer_s_prefix_and_its_end():
    from run_llama import keep_end
    assert keep_end([1, 5, 6, 7, 8], 3, n_prefix=1) == [1, 7, 8]
    assert keep_end([5, 6, 7, 8], 3, n_prefix=0) == [6, 7, 8]  # a tokenizer.json that adds no <s>
    assert keep_end([5, 6], 3, n_prefix=0) == [5, 6]
