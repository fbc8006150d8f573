"""minLlama2's one entry point.

  --option generate   continue a prompt (greedy and T=1), write generated-sentence-temp-{0,1}.txt;
                      --quantize int8 decodes with int8 weights
  --option prompt     zero-shot classification: score each label name as the prompt's continuation
  --option finetune   train the whole model with a classification head
  --option lora       train LoRA adapters and the head; the base model stays frozen
  --option classify   label new sentences with a checkpoint that finetune or lora wrote (--filepath, --input)

Flags and output files follow the CS11-711 minllama assignment; every flag is accepted with hyphens or
underscores. Bad input ends with one line on stderr and exit status 2 (see utils.UsageError); Ctrl-C or SIGTERM
end with one line saying what was saved, and status 130 or 143.

Training writes the best-dev checkpoint to --filepath, <filepath>.state after every epoch (optimizer and
random-number states for --resume; about three times the checkpoint's size, safe to delete when done), and the
curves <stem>.metrics.jsonl and <stem>.png. --resume continues a run: only --epochs and the output and device
flags may change; the data, model and training flags must be the same (a differing one is named).
"""
import argparse
import contextlib
import dataclasses
import json
import math
import os
import shlex
import signal
import sys
import time
from typing import Any, Optional

import torch
import torch.nn.functional as F
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score
from tqdm import tqdm

from checkpoint import (CHECKPOINT_FORMAT, STATE_FORMAT, differences, load_trainable, locate, read_saved,
                        rng_state, set_rng_state, stored_file, weights_fingerprint)
from classifier import LlamaEmbeddingClassifier, LlamaZeroShotClassifier
from decoding import prepare_for_decoding
from llama import Llama, load_pretrained
from lora import ALL_TARGETS, ATTENTION_TARGETS, DEFAULT_TARGETS, inject_lora, merge_lora
from optimizer import AdamW
from tokenizer import Tokenizer
from utils import (DTYPES, Interrupted, Runtime, UsageError, amp_dtype, atomic_write, check_labels, check_outputs,
                   file_sha256, make_batches, pad_batch, read_label_names, read_labeled_data, require_file,
                   save_atomic, seed_everything, shard, signals_interrupt, start_runtime, write_text_atomic)

ASSIGNMENT_PREFIX = ("I have wanted to see this thriller for a while, and it didn't disappoint. "
                     "Keanu Reeves, playing the hero John Wick, is")
MODE_NAMES = {"prompt": "prompting", "finetune": "finetuning", "lora": "lora"}
CFIMDB = {"--train": "data/cfimdb-train.txt", "--dev": "data/cfimdb-dev.txt", "--test": "data/cfimdb-test.txt",
          "--label-names": "data/cfimdb-label-mapping.json"}
DEFAULT_MODEL, DEFAULT_TOKENIZER = "stories42M.pt", "tokenizer.model"


# ---------------------------------------------------------------------------------------------------------
# flags

class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are UsageErrors (one line, exit status 2) and that takes --a-b and --a_b alike."""

    def error(self, message: str) -> None:
        raise UsageError(message)

    def parse_known_args(self, args: Optional[list[str]] = None, namespace: Any = None) -> Any:
        args = sys.argv[1:] if args is None else list(args)
        spellings = {flag.replace("-", "_"): flag for flag in self._option_string_actions if flag.startswith("--")}
        normalised = []
        for i, arg in enumerate(args):
            if arg == "--":
                normalised += args[i:]
                break
            flag, eq, value = arg.partition("=")
            normalised.append(spellings.get(flag.replace("-", "_"), flag) + eq + value if arg.startswith("--") else arg)
        return super().parse_known_args(normalised, namespace)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "default" not in text:
            text += " (default: %(default)s)"
        return text


def finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def get_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--option", choices=("generate", "prompt", "finetune", "lora", "classify"), default="generate",
                        help="what to do (see above)")
    parser.add_argument("--train", help=f"training data (default: {CFIMDB['--train']}, see --dev)")
    parser.add_argument("--dev", help=f"dev data (default: {CFIMDB['--dev']}); give all of --train --dev --test "
                                      f"--label-names or none (CFIMDB), never some")
    parser.add_argument("--test", help=f"test data (default: {CFIMDB['--test']})")
    parser.add_argument("--label-names", help=f"JSON list of label names (default: {CFIMDB['--label-names']})")
    parser.add_argument("--pretrained-model-path", help=f"llama2.c checkpoint: train.py .pt or legacy .bin export "
                                                        f"(default: {DEFAULT_MODEL}; classify: the checkpoint's)")
    parser.add_argument("--tokenizer", help=f"sentencepiece model matching the checkpoint, tok512.model for "
                                            f"stories260K (default: {DEFAULT_TOKENIZER}; classify: the checkpoint's)")
    parser.add_argument("--max_sentence_len", type=int, default=None,
                        help="cut each classified sentence to this many tokens (prompts and labels stay whole)")
    parser.add_argument("--seed", type=int, default=1337, help="seeds initialisation, dropout and batch order")
    parser.add_argument("--use_gpu", action="store_true", help="run on CUDA (or Apple MPS)")
    parser.add_argument("--dtype", choices=tuple(DTYPES),
                        help="autocast precision; bf16/fp16 speed up GPUs, fp32 matches the reference outputs "
                             "(default: fp32; classify: the training run's)")

    gen = parser.add_argument_group("generate")
    gen.add_argument("--prompt", default=None, help="text to continue (default: the assignment's John Wick prefix)")
    gen.add_argument("--max_new_tokens", type=int, default=75, help="tokens to generate")
    gen.add_argument("--temperature", type=finite_float, default=None,
                     help="sample once at this temperature instead of the assignment's pair (0 and 1); "
                          "temperature 0 writes to the low-temperature file, any other to the high one")
    gen.add_argument("--top_k", type=int, default=None, help="sample among the k most likely tokens only")
    gen.add_argument("--top_p", type=finite_float, default=None,
                     help="sample among the most likely tokens whose probabilities add up to p")
    gen.add_argument("--generated_sentence_low_temp_out",
                     help="greedy output (default: generated-sentence-temp-0.txt)")
    gen.add_argument("--generated_sentence_high_temp_out",
                     help="sampled output (default: generated-sentence-temp-1.txt, or -<T>.txt for --temperature T)")
    gen.add_argument("--quantize", choices=("int8",), default=None,
                     help="decode with int8 weights (one scale per row), quantized when loading: a quarter of the "
                          "bytes to read per token. After each generation a line gives the decoding speed, "
                          "'decode: <n> new tokens in <s> s, <x> tok/s'; it leaves out the prompt's forward pass "
                          "and the first new token, which comes with it")

    cls = parser.add_argument_group("classification")
    cls.add_argument("--dev_out", default=None, help="default: <dataset>-dev-<prompting|finetuning|lora>-output.txt")
    cls.add_argument("--test_out", default=None, help="default: <dataset>-test-<prompting|finetuning|lora>-output.txt")
    cls.add_argument("--eval_train", action="store_true", help="also report accuracy on the training set")
    cls.add_argument("--epochs", type=int, default=10, help="training epochs")
    cls.add_argument("--batch_size", type=int, help="examples per step and process (default: 8; classify: the training run's)")
    cls.add_argument("--lr", type=finite_float, default=1e-5, help="AdamW learning rate")
    cls.add_argument("--hidden_dropout_prob", type=finite_float, default=0.3, help="dropout before the classification head")
    cls.add_argument("--filepath", default=None,
                     help="best-dev checkpoint (default: <dataset>-<option>-<lr>.pt); training also writes "
                          "<filepath>.state for --resume, <stem>.metrics.jsonl and <stem>.png")
    cls.add_argument("--resume", action="store_true",
                     help="continue training from <filepath>.state; only --epochs and output/device flags may change")
    cls.add_argument("--overwrite", action="store_true",
                     help="replace a --filepath checkpoint that another run (other data or flags) made")
    cls.add_argument("--lora_rank", type=int, default=4, help="rank of each LoRA update")
    cls.add_argument("--lora_alpha", type=finite_float, default=1.0, help="LoRA scaling: alpha / rank")
    cls.add_argument("--lora_dropout", type=finite_float, default=0.0, help="dropout on the LoRA input")
    cls.add_argument("--lora_targets", default=",".join(DEFAULT_TARGETS),
                     help=f"comma-separated among {','.join(ALL_TARGETS)}, or 'attention', or 'all'")
    cls.add_argument("--input", help="classify: one sentence, or '<label> ||| <sentence>', per line; - for stdin")
    cls.add_argument("--output", help="classify: write '<label> ||| <sentence>' lines here instead of printing "
                                      "'<label name>\\t<probability>\\t<sentence>'")
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    validate_args(args)
    return args


def validate_args(args: argparse.Namespace) -> None:
    checks = [
        (args.lr > 0, "--lr must be > 0"),
        (args.batch_size is None or args.batch_size > 0, "--batch_size must be > 0"),
        (args.epochs >= 0, "--epochs must be >= 0"),
        (args.temperature is None or args.temperature >= 0, "--temperature must be >= 0"),
        (args.max_new_tokens >= 0, "--max_new_tokens must be >= 0"),
        (args.top_k is None or args.top_k > 0, "--top_k must be > 0"),
        (args.top_p is None or 0 < args.top_p <= 1, "--top_p must be in (0, 1]"),
        (0 <= args.hidden_dropout_prob < 1, "--hidden_dropout_prob must be in [0, 1)"),
        (args.lora_rank > 0, "--lora_rank must be > 0"),
        (args.lora_alpha > 0, "--lora_alpha must be > 0"),
        (0 <= args.lora_dropout < 1, "--lora_dropout must be in [0, 1)"),
        (args.max_sentence_len is None or args.max_sentence_len > 0, "--max_sentence_len must be > 0"),
        (args.option == "classify" or not (args.input or args.output), "--input and --output go with --option classify"),
        (args.option in ("finetune", "lora") or not args.resume, "--resume goes with --option finetune or lora"),
        (args.option == "generate" or not args.quantize,
         "--quantize goes with --option generate (training and scoring use the float weights)"),
    ]
    for ok, message in checks:
        if not ok:
            raise UsageError(message)
    args.lora_targets = parse_lora_targets(args.lora_targets)
    if args.option == "classify":
        if not args.filepath or not args.input:
            raise UsageError("--option classify needs --filepath CHECKPOINT (from finetune or lora) and --input FILE "
                             "(- for standard input)")
        check_outputs([("--output", args.output)] if args.output and args.output != "-" else [],
                      [("--filepath", args.filepath), ("--input", args.input),
                       ("--pretrained-model-path", args.pretrained_model_path), ("--tokenizer", args.tokenizer)])
        return
    args.pretrained_model_path = args.pretrained_model_path or DEFAULT_MODEL
    args.tokenizer = args.tokenizer or DEFAULT_TOKENIZER
    args.batch_size = args.batch_size or 8
    args.dtype = args.dtype or "fp32"
    if args.option == "generate":
        check_outputs([(flag, path) for flag, _, path in generation_runs(args)],
                      [("--pretrained-model-path", args.pretrained_model_path), ("--tokenizer", args.tokenizer)])
        return
    choose_data(args)
    dataset = os.path.basename(args.dev).split("-dev")[0].removesuffix(".txt")
    mode = MODE_NAMES[args.option]
    args.dev_out = args.dev_out or f"{dataset}-dev-{mode}-output.txt"
    args.test_out = args.test_out or f"{dataset}-test-{mode}-output.txt"
    outputs = [("--dev_out", args.dev_out), ("--test_out", args.test_out)]
    if args.option != "prompt":
        args.filepath = args.filepath or f"{dataset}-{args.option}-{args.lr}.pt"
        stem = os.path.splitext(args.filepath)[0]
        outputs += [("--filepath", args.filepath), ("--filepath (training state)", args.filepath + ".state"),
                    ("--filepath (metrics)", stem + ".metrics.jsonl"), ("--filepath (curves)", stem + ".png")]
    inputs = [(flag, getattr(args, flag[2:].replace("-", "_"))) for flag in CFIMDB]
    check_outputs(outputs, inputs + [("--pretrained-model-path", args.pretrained_model_path),
                                     ("--tokenizer", args.tokenizer)])


def choose_data(args: argparse.Namespace) -> None:
    """The data flags come all together or not at all: CFIMDB's files fill in only when none is given, so
    that an SST run never trains on CFIMDB because --train was forgotten."""
    needed = ["--dev", "--test", "--label-names"]
    if args.option != "prompt" or args.eval_train:
        needed.insert(0, "--train")
    value = lambda flag: getattr(args, flag[2:].replace("-", "_"))
    missing = [flag for flag in needed if value(flag) is None]
    if len(missing) < len(needed) and missing:
        defaults = ", ".join(f"{flag} {CFIMDB[flag]}" for flag in missing)
        raise UsageError(f"{' '.join(missing)} not given while other data flags are; the defaults ({defaults}) "
                         f"would mix datasets: pass {' '.join(needed)} all, or none for CFIMDB")
    for flag in CFIMDB:
        if value(flag) is None:
            setattr(args, flag[2:].replace("-", "_"), CFIMDB[flag])


def generation_runs(args: argparse.Namespace) -> list[tuple[str, float, str]]:
    """(flag, temperature, output file) for each generation: the assignment's pair, or one --temperature."""
    low = ("--generated_sentence_low_temp_out", 0.0, args.generated_sentence_low_temp_out or "generated-sentence-temp-0.txt")
    high_default = "generated-sentence-temp-1.txt"
    if args.temperature is None:
        return [low, ("--generated_sentence_high_temp_out", 1.0, args.generated_sentence_high_temp_out or high_default)]
    if args.temperature == 0:
        return [low]
    return [("--generated_sentence_high_temp_out", args.temperature,
             args.generated_sentence_high_temp_out or f"generated-sentence-temp-{args.temperature:g}.txt")]


def parse_lora_targets(spec: str) -> tuple[str, ...]:
    named = {"attention": ATTENTION_TARGETS, "all": ALL_TARGETS}
    targets = []
    for name in (part.strip() for part in spec.split(",")):
        if name not in ALL_TARGETS and name not in named:
            raise UsageError(f"--lora_targets: unknown target {name!r}; choose among "
                             f"{', '.join(ALL_TARGETS)}, 'attention' or 'all'")
        targets += named.get(name, (name,))
    return tuple(dict.fromkeys(targets))


def load_model(model_path: str, tokenizer_path: str, device: torch.device) -> tuple[Llama, Tokenizer]:
    if model_path == DEFAULT_MODEL and not os.path.exists(model_path):
        raise UsageError(f"--pretrained-model-path {DEFAULT_MODEL}: no such file; run ./setup.sh to download it, or "
                         f"use the tiny model: --pretrained-model-path stories260K.pt --tokenizer tok512.model")
    llama = load_pretrained(model_path)
    tokenizer = Tokenizer(tokenizer_path)
    tokenizer.check_vocab(llama.config.vocab_size, model_path)
    print(f"loaded {model_path} ({llama.num_parameters() / 1e6:.2f}M parameters) on {device}")
    return llama.to(device), tokenizer


# ---------------------------------------------------------------------------------------------------------
# generate

def generate(args: argparse.Namespace, runtime: Runtime) -> None:
    llama, tokenizer = load_model(args.pretrained_model_path, args.tokenizer, runtime.device)
    prepare_for_decoding(llama.eval(), args.quantize)
    if args.quantize:
        print(f"quantized the weights to int8 ({weight_megabytes(llama):.1f} MB)")
    prompt_ids = tokenizer.encode(args.prompt or ASSIGNMENT_PREFIX, bos=True, eos=False)
    room = llama.config.max_seq_len - 1
    if len(prompt_ids) > room:
        print(f"warning: the prompt has {len(prompt_ids)} tokens; keeping its last {room - 1} after the "
              f"start token (max_seq_len is {llama.config.max_seq_len})", file=sys.stderr)
        prompt_ids = prompt_ids[:1] + prompt_ids[-(room - 1):]
    idx = torch.tensor([prompt_ids], device=runtime.device)
    for _, temperature, outfile in generation_runs(args):
        with runtime.autocast():
            out, n_decoded, seconds = timed_generation(llama, idx, args.max_new_tokens, temperature, args.top_k,
                                                       args.top_p)
        if out.shape[1] - idx.shape[1] < args.max_new_tokens:
            print(f"note: stopped at the model's max_seq_len ({llama.config.max_seq_len} tokens)", file=sys.stderr)
        sentence = tokenizer.decode(out[0].tolist())
        print(f"Temperature is {temperature:g}")
        print(sentence)
        print("---------------")
        if n_decoded:
            print(f"decode: {n_decoded} new tokens in {seconds:.2f} s, {n_decoded / seconds:.1f} tok/s")
        write_text_atomic(outfile, sentence)
        print(f"Wrote generated sentence to {outfile}.")


def timed_generation(llama: Llama, idx: torch.Tensor, max_new_tokens: int, temperature: float,
                     top_k: Optional[int] = None, top_p: Optional[float] = None) -> tuple[torch.Tensor, int, float]:
    """The prompt and its continuation, and the decoding steps' count and seconds: the clock starts once the
    first new token (the prefill's) exists."""
    tokens, start = [idx], None
    for token in llama.new_tokens(idx, max_new_tokens, temperature, top_k=top_k, top_p=top_p):
        tokens.append(token)
        if start is None:
            token.cpu()  # waits for the device: the prefill is over
            start = time.perf_counter()
    out = torch.cat(tokens, dim=1).cpu()
    return out, max(0, len(tokens) - 2), time.perf_counter() - start if start else 0.0


def weight_megabytes(model: torch.nn.Module) -> float:
    tensors = {t.data_ptr(): t for t in [*model.parameters(), *model.buffers()]}  # a tied matrix counts once
    return sum(t.numel() * t.element_size() for t in tensors.values()) / 1e6


# ---------------------------------------------------------------------------------------------------------
# classification data and evaluation

@dataclasses.dataclass
class Split:
    name: str  # train, dev, test or input
    path: str
    labels: list[Optional[int]]
    sentences: list[str]
    token_ids: list[list[int]]  # what the model reads, already cut to its window


def tokenize(examples: list[tuple[Optional[int], str]], tokenizer: Tokenizer, max_seq_len: int,
             max_sentence_len: Optional[int] = None, prompt_suffix: Optional[list[int]] = None,
             label_room: int = 0) -> tuple[list[list[int]], int]:
    """Token ids of each sentence: bos + sentence + suffix (zero-shot; the label is appended later) or
    bos + sentence + eos. Only the sentence is ever cut: to max_sentence_len, and to what the model's window
    leaves beside the suffix and the label. Returns the ids and how many sentences the window cut."""
    tail = prompt_suffix if prompt_suffix is not None else [tokenizer.eos_id]
    room = max_seq_len - 1 - len(tail) - label_room
    if room <= 0:
        raise UsageError(f"the prompt and labels need {max_seq_len - room} tokens, more than the model's "
                         f"max_seq_len {max_seq_len}; use shorter --label-names")
    token_ids, n_cut = [], 0
    for _, sentence in examples:
        body = tokenizer.encode(sentence, bos=False, eos=False)[:max_sentence_len]
        n_cut += len(body) > room
        token_ids.append([tokenizer.bos_id] + body[:room] + tail)
    return token_ids, n_cut


def load_split(name: str, path: str, n_labels: int, tokenizer: Tokenizer, max_seq_len: int,
               max_sentence_len: Optional[int] = None, prompt_suffix: Optional[list[int]] = None,
               label_room: int = 0) -> Split:
    """Read, check and tokenize one data file (see tokenize)."""
    flag = f"--{name}"
    examples = read_labeled_data(path, flag)
    check_labels(examples, n_labels, flag, path)
    token_ids, n_cut = tokenize(examples, tokenizer, max_seq_len, max_sentence_len, prompt_suffix, label_room)
    print(f"load {len(examples)} data from {path}" + (f" ({n_cut} cut to fit {max_seq_len} tokens)" if n_cut else ""))
    return Split(name, path, [label for label, _ in examples], [s for _, s in examples], token_ids)


def prompt_suffix_text(label_names: list[str]) -> str:
    if len(label_names) == 2:
        names = " or ".join(label_names)
    else:
        names = ", ".join(label_names[:-1]) + ", or " + label_names[-1]
    return f"Is this movie {names}? This movie is "


def progress(iterable: list, desc: str, runtime: Runtime, **kwargs) -> tqdm:
    """A progress bar on rank 0 only; TQDM_DISABLE=1 silences it there too."""
    if not runtime.is_main:
        kwargs["disable"] = True
    return tqdm(iterable, desc=desc, **kwargs)


@torch.inference_mode()
def predict(model: torch.nn.Module, split: Split, batch_size: int, pad_id: int, runtime: Runtime) -> torch.Tensor:
    """Log-probabilities of the labels (n_examples, n_labels), in input order; batches are formed by length so
    little padding is computed, and under torchrun each process predicts every world_size-th batch."""
    model.eval()
    lengths = [len(t) for t in split.token_ids]
    batches = make_batches(lengths, batch_size, shuffle=False)[runtime.rank::runtime.world_size]
    scored = {}
    for indices in progress(batches, f"eval {split.name}", runtime, leave=False):
        tokens, batch_lengths = pad_batch([split.token_ids[i] for i in indices], pad_id)
        with runtime.autocast():
            log_probs = model(tokens.to(runtime.device), batch_lengths.to(runtime.device))
        scored.update(zip(indices, log_probs.float().cpu()))
    merged = {i: row for part in runtime.gather(scored) for i, row in part.items()}
    return torch.stack([merged[i] for i in range(len(lengths))])


def print_metrics(split: Split, predictions: list[int], label_names: list[str], confusion: bool) -> dict[str, float]:
    acc = accuracy_score(split.labels, predictions)
    f1 = f1_score(split.labels, predictions, average="macro")
    note = ""
    if len(set(split.labels)) == 1:
        note = (f"  (every {split.name} label is {split.labels[0]}: if they are placeholders, as in CFIMDB's test "
                f"file, this accuracy means nothing)")
    print(f"{split.name} acc :: {acc:.3f}  macro-F1 :: {f1:.3f}{note}")
    if confusion:
        matrix = confusion_matrix(split.labels, predictions, labels=range(len(label_names)))
        width = max(8, *(len(name) + 1 for name in label_names))
        print(f"{split.name} confusion matrix (rows: true label, columns: predicted)")
        print(" " * width + "".join(f"{name:>{width}}" for name in label_names))
        for name, row in zip(label_names, matrix):
            print(f"{name:<{width}}" + "".join(f"{count:>{width}}" for count in row))
    return {"acc": acc, "f1": f1}


def report(model: torch.nn.Module, split: Split, args: argparse.Namespace, label_names: list[str], pad_id: int,
           runtime: Runtime, outfile: Optional[str]) -> None:
    predictions = predict(model, split, args.batch_size, pad_id, runtime).argmax(dim=-1).tolist()
    print_metrics(split, predictions, label_names, confusion=split.name == "dev")
    if outfile and runtime.is_main:
        write_text_atomic(outfile, "".join(f"{p} ||| {s}\n" for p, s in zip(predictions, split.sentences)))
        print(f"wrote {len(predictions)} predictions to {outfile}")


def build_classifier(llama: Llama, n_labels: int, hidden_dropout_prob: float,
                     lora: Optional[dict[str, Any]]) -> LlamaEmbeddingClassifier:
    """The fine-tuning classifier; with lora settings, adapters on the base model, which then stays frozen."""
    model = LlamaEmbeddingClassifier(llama, n_labels, hidden_dropout_prob)
    if lora:
        adapted = inject_lora(llama, lora["targets"], lora["rank"], lora["alpha"], lora["dropout"])
        for name, param in model.named_parameters():
            param.requires_grad = "lora_" in name or name.startswith("classifier_head.")
        print(f"LoRA rank {lora['rank']} on {len(adapted)} layers ({', '.join(lora['targets'])})")
    return model.to(llama.output.weight.device)


def zero_shot_model(llama: Llama, tokenizer: Tokenizer, label_names: list[str],
                    path: str) -> tuple[LlamaZeroShotClassifier, dict]:
    label_ids = [tokenizer.encode(name, bos=False, eos=False) for name in label_names]
    for i, ids in enumerate(label_ids):
        if ids in label_ids[:i]:
            raise UsageError(f"--label-names {path}: {label_names[label_ids.index(ids)]!r} and {label_names[i]!r} "
                             f"are the same tokens to the tokenizer; zero-shot cannot tell them apart")
    suffix = tokenizer.encode(prompt_suffix_text(label_names), bos=False, eos=False)
    return LlamaZeroShotClassifier(llama, label_ids), dict(prompt_suffix=suffix,
                                                          label_room=max(len(ids) for ids in label_ids))


def warn_if_labels_unused(splits: list[Split], label_names: list[str], path: str) -> None:
    used = {label for split in splits for label in split.labels}
    if used < set(range(len(label_names))):
        print(f"warning: the data uses labels {sorted(used)} only, but --label-names {path} names "
              f"{len(label_names)}; is it this dataset's mapping?", file=sys.stderr)


def train_or_prompt(args: argparse.Namespace, runtime: Runtime) -> None:
    label_names = read_label_names(args.label_names)
    llama, tokenizer = load_model(args.pretrained_model_path, args.tokenizer, runtime.device)
    max_seq_len = llama.config.max_seq_len

    if args.option == "prompt":
        model, room = zero_shot_model(llama, tokenizer, label_names, args.label_names)
    else:
        base_fingerprint = weights_fingerprint(llama.state_dict())
        lora = dict(rank=args.lora_rank, alpha=args.lora_alpha, dropout=args.lora_dropout,
                    targets=list(args.lora_targets)) if args.option == "lora" else None
        model, room = build_classifier(llama, len(label_names), args.hidden_dropout_prob, lora), {}
    load = lambda name, path: load_split(name, path, len(label_names), tokenizer, max_seq_len,
                                         args.max_sentence_len, **room)
    dev, test = load("dev", args.dev), load("test", args.test)
    train = load("train", args.train) if args.option != "prompt" or args.eval_train else None
    warn_if_labels_unused([s for s in (train, dev, test) if s], label_names, args.label_names)

    if args.option != "prompt":
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        print(f"training {trainable:,} of {total:,} parameters ({100 * trainable / total:.2f}%)")
        described = describe_run(args, llama, base_fingerprint, label_names, lora, runtime)
        state = prepare_training(args, described["training"])
        fit(model, train, dev, args, label_names, tokenizer.pad_id, runtime, described, state)
        load_trainable(model, read_saved(args.filepath, "--filepath", CHECKPOINT_FORMAT)["trainable"], args.filepath)
        merge_lora(model)  # no-op without adapters; with them, inference costs what the base model costs
        print(f"loaded the best-dev checkpoint {args.filepath}")

    if args.eval_train:
        report(model, train, args, label_names, tokenizer.pad_id, runtime, None)
    report(model, dev, args, label_names, tokenizer.pad_id, runtime, args.dev_out)
    report(model, test, args, label_names, tokenizer.pad_id, runtime, args.test_out)


# ---------------------------------------------------------------------------------------------------------
# checkpoints: what a run is, and which files it may replace

def describe_run(args: argparse.Namespace, llama: Llama, base_fingerprint: str, label_names: list[str],
                 lora: Optional[dict], runtime: Runtime) -> dict[str, Any]:
    """Everything a checkpoint says about itself besides its tensors. Its "training" record holds the flags
    that shape the result: a resumed run must share them, and they tell one run's checkpoint from another's."""
    files = {flag: {"path": os.path.abspath(path), "fingerprint": file_sha256(path)}
             for flag, path in (("--train", args.train), ("--dev", args.dev), ("--tokenizer", args.tokenizer))}
    files["--pretrained-model-path"] = {"path": os.path.abspath(args.pretrained_model_path),
                                        "fingerprint": base_fingerprint}
    training = {**files, "--option": args.option, "--label-names": label_names, "--epochs": args.epochs,
                "--lr": args.lr, "--batch_size": args.batch_size, "--seed": args.seed, "--dtype": args.dtype,
                "--hidden_dropout_prob": args.hidden_dropout_prob, "--max_sentence_len": args.max_sentence_len,
                "processes": runtime.world_size}
    if lora:
        training.update({f"--lora_{key}": value for key, value in lora.items()})
    return {"format": CHECKPOINT_FORMAT, "option": args.option, "label_names": label_names,
            "max_sentence_len": args.max_sentence_len, "hidden_dropout_prob": args.hidden_dropout_prob, "lora": lora,
            "base_model": {**stored_file(args.pretrained_model_path, base_fingerprint, args.filepath),
                           "model_args": dataclasses.asdict(llama.config)},
            "tokenizer": stored_file(args.tokenizer, files["--tokenizer"]["fingerprint"], args.filepath),
            "training": training}


def prepare_training(args: argparse.Namespace, record: dict) -> Optional[dict]:
    """Before any training: the state to resume (with --resume), checked to come from this run; and a refusal
    to replace a checkpoint or state that another run made, unless --overwrite."""
    state_path = args.filepath + ".state"
    state = None
    if args.resume:
        if not os.path.isfile(state_path):
            raise UsageError(f"--resume: no training state {state_path}; run once without --resume first")
        state = read_saved(state_path, "--resume", STATE_FORMAT)
        changed = differences(state["training"], record, may_differ=("--epochs",))
        if changed:
            raise UsageError(f"--resume {state_path}: that run differs from this one ({'; '.join(changed)}); only "
                             f"--epochs may change on resume: use its flags, or another --filepath")
    if args.overwrite:
        return state
    for path, saved_format in ((args.filepath, CHECKPOINT_FORMAT), (state_path, STATE_FORMAT)):
        if not os.path.exists(path) or (state is not None and path == state_path):
            continue
        try:
            saved = read_saved(path, "--filepath", saved_format)
        except UsageError:
            raise UsageError(f"--filepath {path}: exists and was not written by a run like this one; pass "
                             f"--overwrite to replace it, or choose another --filepath") from None
        changed = differences(saved["training"], record, may_differ=("--epochs",) if args.resume else ())
        if changed:
            hint = " --resume to continue it," if [c.split()[0] for c in changed] == ["--epochs"] else ""
            raise UsageError(f"--filepath {path}: made by another run ({'; '.join(changed)}); pass{hint} "
                             f"--overwrite to replace it, or choose another --filepath")
    return state


def write_metrics(history: list[dict], filepath: str) -> None:
    """<stem>.metrics.jsonl, one line per epoch."""
    stem = os.path.splitext(filepath)[0]
    write_text_atomic(stem + ".metrics.jsonl", "".join(json.dumps(entry) + "\n" for entry in history))


def plot_curves(history: list[dict], filepath: str) -> None:
    """<stem>.png: train loss and dev accuracy per epoch, where matplotlib is installed."""
    stem = os.path.splitext(filepath)[0]
    try:
        import matplotlib
    except ImportError:
        print(f"note: pip install matplotlib (or ./setup.sh --test) to also get the curves in {stem}.png")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [entry["epoch"] for entry in history]
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(9, 3.5))
    loss_ax.plot(epochs, [entry["train_loss"] for entry in history], marker="o")
    loss_ax.set(xlabel="epoch", ylabel="train loss")
    acc_ax.plot(epochs, [entry["dev_acc"] for entry in history], marker="o", label="accuracy")
    acc_ax.plot(epochs, [entry["dev_f1"] for entry in history], marker="o", label="macro-F1")
    acc_ax.set(xlabel="epoch", ylabel="dev")
    acc_ax.legend()
    fig.suptitle(os.path.basename(filepath))
    fig.tight_layout()
    atomic_write(stem + ".png", lambda f: fig.savefig(f, format="png"))
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------
# training: one loop for full fine-tuning and LoRA; they differ only in which parameters require grad

def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint holds: the whole model for full fine-tuning, adapters + head for LoRA."""
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def fit(model: torch.nn.Module, train: Split, dev: Split, args: argparse.Namespace, label_names: list[str],
        pad_id: int, runtime: Runtime, described: dict, state: Optional[dict]) -> None:
    """Train for args.epochs; keep the best-dev checkpoint at args.filepath and, after every epoch, the
    whole training state at args.filepath + '.state' for --resume.

    Under torchrun every process draws the same global batches of batch_size * world_size examples (one
    shared generator) and trains on its own share; each example weighs 1 / (global batch size), so that the
    gradient DistributedDataParallel averages is the one a single process would compute."""
    trainer = model
    if runtime.world_size > 1:
        trainer = torch.nn.parallel.DistributedDataParallel(model, device_ids=[runtime.device.index]
                                                            if runtime.device.type == "cuda" else None)
    optimizer = AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.amp_dtype == torch.float16)
    generator = torch.Generator().manual_seed(args.seed)
    state_path = args.filepath + ".state"
    first_epoch, best_dev_acc, best_epoch, history = 0, -1.0, None, []
    if state is not None:
        load_trainable(model, state["trainable"], state_path)
        try:
            optimizer.load_state_dict(state["optimizer"])
            scaler.load_state_dict(state["scaler"])
        except (KeyError, ValueError, RuntimeError, TypeError) as e:
            raise UsageError(f"--resume {state_path}: its optimizer state does not fit this model ({e}); "
                             f"delete it and train again") from e
        set_rng_state(state["rng"][runtime.rank], generator, runtime.device, state_path)
        first_epoch, best_dev_acc, best_epoch = state["epoch"] + 1, state["best_dev_acc"], state["best_epoch"]
        history = state["history"]
        print(f"resumed from {state_path} after epoch {state['epoch']}")

    global_batch = args.batch_size * runtime.world_size
    if runtime.world_size > 1:
        print(f"{runtime.world_size} processes x batch {args.batch_size} = effective batch size {global_batch}")
    lengths = [len(t) for t in train.token_ids]
    try:
        for epoch in range(first_epoch, args.epochs):
            trainer.train()
            batches = make_batches(lengths, global_batch, shuffle=True, generator=generator)
            bar = progress(batches, f"train-{epoch}", runtime)
            total_loss, n_seen, start = 0.0, 0, time.perf_counter()
            for step, indices in enumerate(bar):
                mine, weights = shard(indices, runtime.rank, runtime.world_size)
                tokens, batch_lengths = pad_batch([train.token_ids[i] for i in mine], pad_id)
                labels = torch.tensor([train.labels[i] for i in mine], device=runtime.device)
                with runtime.autocast():
                    log_probs = trainer(tokens.to(runtime.device), batch_lengths.to(runtime.device))
                nll = F.nll_loss(log_probs, labels, reduction="none")  # (batch,)
                loss_sum = (nll * torch.tensor(weights, device=runtime.device)).sum()
                batch_loss = runtime.sum(loss_sum.item())  # over all processes; NaN anywhere stops all
                if not math.isfinite(batch_loss):
                    saved = f"; the best checkpoint so far is kept in {args.filepath}" if best_epoch is not None else ""
                    raise UsageError(f"training loss became {batch_loss} at epoch {epoch}, step {step}; lower "
                                     f"--lr{saved}")
                optimizer.zero_grad(set_to_none=True)
                # DDP averages over processes, hence world_size / (global batch) rather than 1 / (own share)
                scaler.scale(loss_sum * (runtime.world_size / len(indices))).backward()
                scaler.step(optimizer)
                scaler.update()
                total_loss += batch_loss
                n_seen += len(indices)
                bar.set_postfix(loss=f"{total_loss / n_seen:.3f}",
                                ex_per_s=f"{n_seen / (time.perf_counter() - start):.1f}")
            train_seconds = time.perf_counter() - start

            dev_predictions = predict(model, dev, args.batch_size, pad_id, runtime).argmax(dim=-1).tolist()
            dev_acc = accuracy_score(dev.labels, dev_predictions)
            dev_f1 = f1_score(dev.labels, dev_predictions, average="macro")
            print(f"epoch {epoch}: train loss :: {total_loss / max(n_seen, 1):.3f}, dev acc :: {dev_acc:.3f}, "
                  f"{time.perf_counter() - start:.0f} s")
            history.append({"epoch": epoch, "train_loss": total_loss / max(n_seen, 1), "dev_acc": dev_acc,
                            "dev_f1": dev_f1, "seconds": time.perf_counter() - start,
                            "examples_per_s": n_seen / train_seconds})
            if dev_acc > best_dev_acc:
                best_dev_acc, best_epoch = dev_acc, epoch
                save_checkpoint(model, described, history, best_epoch, args.filepath, runtime)
            rngs = runtime.gather(rng_state(generator, runtime.device))
            if runtime.is_main:  # after the checkpoint: a state never refers to a checkpoint not yet on disk
                save_atomic({"format": STATE_FORMAT, "training": described["training"], "epoch": epoch,
                             "best_dev_acc": best_dev_acc, "best_epoch": best_epoch, "history": history,
                             "trainable": trainable_state(model), "optimizer": optimizer.state_dict(),
                             "scaler": scaler.state_dict(), "rng": rngs}, state_path)
                write_metrics(history, args.filepath)
            first_epoch = epoch + 1
    except Interrupted as stop:
        if first_epoch > 0:
            command = shlex.join(["python", "run_llama.py", *args.argv] + ([] if args.resume else ["--resume"]))
            stop.progress = (f"epochs up to {first_epoch - 1} are saved in {state_path}; to continue: {command}")
        raise
    if best_epoch is None:  # zero epochs: the untrained model is the best there is
        save_checkpoint(model, described, history, best_epoch, args.filepath, runtime)
    if runtime.is_main and history:
        plot_curves(history, args.filepath)
    runtime.barrier()  # the checkpoint is on disk before any process reads it back


def save_checkpoint(model: torch.nn.Module, described: dict, history: list[dict], best_epoch: Optional[int],
                    path: str, runtime: Runtime) -> None:
    if runtime.is_main:
        save_atomic({**described, "history": list(history), "best_epoch": best_epoch,
                     "trainable": trainable_state(model)}, path)
        print(f"saved the best model so far to {path}")


# ---------------------------------------------------------------------------------------------------------
# classify: use what finetune or lora trained

def classify(args: argparse.Namespace, runtime: Runtime) -> None:
    """Label --input with the --filepath checkpoint, rebuilt from its base model and tokenizer. Results go to
    --output, or as '<label name>\\t<probability>\\t<sentence>' lines to stdout (and the log to stderr)."""
    results = sys.stdout
    with contextlib.redirect_stdout(sys.stderr if not args.output else sys.stdout):
        saved = read_saved(args.filepath, "--filepath", CHECKPOINT_FORMAT)
        base = locate(saved["base_model"], args.filepath, "--pretrained-model-path", args.pretrained_model_path)
        tokenizer_path = locate(saved["tokenizer"], args.filepath, "--tokenizer", args.tokenizer)
        require_file("--tokenizer", tokenizer_path, "pass the tokenizer the model was trained with")
        if file_sha256(tokenizer_path) != saved["tokenizer"]["fingerprint"]:
            raise UsageError(f"--tokenizer {tokenizer_path}: not the tokenizer --filepath {args.filepath} was trained "
                             f"with ({saved['tokenizer']['path']}); pass that one")
        runtime = dataclasses.replace(runtime, amp_dtype=amp_dtype(args.dtype or saved["training"]["--dtype"],
                                                                   runtime.device))
        llama, tokenizer = load_model(base, tokenizer_path, runtime.device)
        if weights_fingerprint(llama.state_dict()) != saved["base_model"]["fingerprint"]:
            raise UsageError(f"--pretrained-model-path {base}: its weights are not those of "
                             f"{saved['base_model']['path']}, the base model --filepath {args.filepath} was trained "
                             f"from; pass that model")
        label_names = saved["label_names"]
        model = build_classifier(llama, len(label_names), saved["hidden_dropout_prob"], saved["lora"])
        load_trainable(model, saved["trainable"], args.filepath)
        merge_lora(model)

        examples = read_labeled_data(args.input, "--input", labels_optional=True)
        labeled = examples[0][0] is not None
        if labeled:
            check_labels(examples, len(label_names), "--input", args.input)
        max_sentence_len = args.max_sentence_len or saved["max_sentence_len"]
        token_ids, _ = tokenize(examples, tokenizer, llama.config.max_seq_len, max_sentence_len)
        split = Split("input", args.input, [label for label, _ in examples], [s for _, s in examples], token_ids)
        batch_size = args.batch_size or saved["training"]["--batch_size"]
        probs = predict(model, split, batch_size, tokenizer.pad_id, runtime).exp()
        predictions = probs.argmax(dim=-1).tolist()
        if labeled:
            print_metrics(split, predictions, label_names, confusion=True)
        if args.output and args.output != "-":
            write_text_atomic(args.output, "".join(f"{p} ||| {s}\n" for p, s in zip(predictions, split.sentences)))
            print(f"wrote {len(predictions)} predictions to {args.output}")
            return
    for p, row, sentence in zip(predictions, probs, split.sentences):
        results.write(f"{label_names[p]}\t{row[p].item():.4f}\t{sentence}\n")


# ---------------------------------------------------------------------------------------------------------

def main(argv: Optional[list[str]] = None) -> int:
    start = time.perf_counter()
    runtime = None
    try:
        with signals_interrupt():
            args = get_args(argv)
            runtime = start_runtime(args.use_gpu, "fp32" if args.option == "classify" else args.dtype)
            if not runtime.is_main:
                sys.stdout = open(os.devnull, "w")  # one log: rank 0's
            seed_everything(args.seed + runtime.rank)  # own dropout masks; shared batches come from args.seed
            if args.option == "generate":
                generate(args, runtime)
            elif args.option == "classify":
                classify(args, runtime)
            else:
                train_or_prompt(args, runtime)
                print(f"wall time {time.perf_counter() - start:.0f} s")
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Interrupted as stop:
        if runtime is None or runtime.is_main:
            print(f"\nerror: stopped by {stop}; {stop.progress}", file=sys.stderr)
        return stop.status
    except BrokenPipeError:  # the reader of stdout went away (e.g. `| head`): stop quietly, as a shell tool does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    finally:
        if runtime is not None and runtime.world_size > 1:
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
