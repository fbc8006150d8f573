"""minLlama2's one entry point.

  --option generate   continue a prompt (greedy and T=1), write generated-sentence-temp-{0,1}.txt;
                      --quantize int8|fp16 decodes with int8 or fp16 weights
  --option prompt     zero-shot classification: score each label name as the prompt's continuation
  --option finetune   train the whole model with a classification head
  --option lora       train LoRA adapters and the head; the base model stays frozen
  --option classify   label new sentences with a checkpoint that finetune or lora wrote (--filepath, --input)
  --option export     write a Hugging Face folder (--output) that transformers loads: the classifier of
                      --filepath, with --adapter its LoRA adapters for PEFT, or with --lm-only the language model

Flags and output files follow the CS11-711 minllama assignment; every flag is accepted with hyphens or
underscores. Bad input ends with one line on stderr and exit status 2 (see utils.UsageError); Ctrl-C or SIGTERM
end with one line saying what was saved, and status 130 or 143. Training writes the best-dev checkpoint to
--filepath, <filepath>.state after every epoch for --resume (safe to delete when done), and the curves
<stem>.metrics.jsonl and <stem>.png. --pretrained-model-path takes llama2.c's .pt and .bin files and Hugging Face
folders (config.json, safetensors weights, tokenizer.model or tokenizer.json).
"""
import os
import signal
import sys


def stop_while_starting(signum: int, frame: object) -> None:
    print(f"\nerror: stopped by {signal.Signals(signum).name} before the run began; nothing was written",
          file=sys.stderr)
    os._exit(128 + signum)


if __name__ == "__main__":  # Ctrl-C while torch still imports: one line and status 130/143, not a traceback
    for stop_signal in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop_signal, stop_while_starting)

# The imports below take seconds, covered by the handlers above.
import argparse
import contextlib
import dataclasses
import math
import shlex
import time
from typing import Any, Optional

import torch

from checkpoint import (CHECKPOINT_FORMAT, base_fingerprint, check_run_files, describe_run, load_base_model,
                        load_classifier, load_trainable, read_saved)
from classifier import build_classifier, zero_shot_classifier
from data import Split, load_split, read_label_names, warn_if_labels_unused
from decoding import prepare_for_decoding, timed_generation, weight_megabytes
from evaluate import line_by_line, predict, print_metrics, report, write_predictions
from export import check_export_folder, run_export
from hf import default_tokenizer, is_hf_folder, stored_dtype
from lora import ALL_TARGETS, ATTENTION_TARGETS, DEFAULT_TARGETS, merge_lora
from runtime import DTYPES, Interrupted, Runtime, seed_everything, signals_interrupt, start_runtime
from settings import (DEFAULT_MODEL, ClassifySettings, DataSettings, ExportSettings, GenerationRun, GenerationSettings,
                      LoRASettings, ModelFiles, RunFiles, Settings, TrainingSettings)
from tokenizer import TOKENIZER_MODEL
from train import fit
from utils import ArgumentParser, UsageError, check_outputs, held_outputs, write_text_atomic

ASSIGNMENT_PREFIX = ("I have wanted to see this thriller for a while, and it didn't disappoint. "
                     "Keanu Reeves, playing the hero John Wick, is")
MODE_NAMES = {"prompt": "prompting", "finetune": "finetuning", "lora": "lora"}
CFIMDB = {"--train": "data/cfimdb-train.txt", "--dev": "data/cfimdb-dev.txt", "--test": "data/cfimdb-test.txt",
          "--label-names": "data/cfimdb-label-mapping.json"}


# ---------------------------------------------------------------------------------------------------------
# flags

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


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--option", choices=("generate", "prompt", "finetune", "lora", "classify", "export"),
                        default="generate", help="what to do (see above)")
    parser.add_argument("--train", help=f"training data (default: {CFIMDB['--train']}, see --dev)")
    parser.add_argument("--dev", help=f"dev data (default: {CFIMDB['--dev']}); give all of --train --dev --test "
                                      f"--label-names or none (CFIMDB), never some")
    parser.add_argument("--test", help=f"test data (default: {CFIMDB['--test']})")
    parser.add_argument("--label-names", help=f"JSON list of label names (default: {CFIMDB['--label-names']})")
    parser.add_argument("--pretrained-model-path", help=f"llama2.c checkpoint (train.py .pt or legacy .bin export) "
                                                        f"or Hugging Face folder (default: {DEFAULT_MODEL}; "
                                                        f"classify, export: the checkpoint's)")
    parser.add_argument("--tokenizer", help=f"sentencepiece model or tokenizer.json matching the checkpoint, "
                                            f"tok512.model for stories260K (default: {TOKENIZER_MODEL}, or a Hugging "
                                            f"Face folder's own; classify, export: the checkpoint's)")
    parser.add_argument("--max_sentence_len", type=int, default=None,
                        help="cut each classified sentence to this many tokens (prompts and labels stay whole)")
    parser.add_argument("--seed", type=int, default=1337, help="seeds initialisation, dropout and batch order")
    parser.add_argument("--use_gpu", action="store_true", help="run on CUDA (or Apple MPS)")
    parser.add_argument("--dtype", choices=("auto", *DTYPES), default="auto",
                        help="precision the weights are held and multiplied in (what trains keeps fp32 masters); auto: "
                             "the checkpoint's (a llama2.c model's fp32; classify: the training run's) where this "
                             "device multiplies it natively, else fp32")
    add_generation_flags(parser.add_argument_group("generate"))
    add_classification_flags(parser.add_argument_group("classification"))
    return parser


def add_generation_flags(gen: argparse._ArgumentGroup) -> None:
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
    gen.add_argument("--quantize", choices=("int8", "fp16"), default=None,
                     help="decode with int8 weights (one scale per row: a quarter of the bytes to read per token) "
                          "or fp16 weights (half the bytes, nearly lossless), converted when loading. After each "
                          "generation a line gives the decoding speed, 'decode: <n> new tokens in <s> s, <x> tok/s'; "
                          "it leaves out the prompt's forward pass and the first new token, which comes with it")


def add_classification_flags(cls: argparse._ArgumentGroup) -> None:
    cls.add_argument("--dev_out", default=None, help="default: <dataset>-dev-<prompting|finetuning|lora>-output.txt")
    cls.add_argument("--test_out", default=None, help="default: <dataset>-test-<prompting|finetuning|lora>-output.txt")
    cls.add_argument("--eval_train", action="store_true", help="also report accuracy on the training set")
    cls.add_argument("--epochs", type=int, default=10, help="training epochs")
    cls.add_argument("--batch_size", type=int, help="examples per step and process (default: 8; classify: the training run's)")
    cls.add_argument("--micro_batch_size", type=int, default=None,
                     help="training: examples per forward and backward pass at most; a step sorts its batch by "
                          "length, cuts it into micro-batches and sums their gradients, so that little padding is "
                          "computed and the step is the batch's (default: on a CPU as few as pad at most a quarter "
                          "of a token per real token, on a GPU the whole batch); with dropout, each micro-batch "
                          "draws its own masks")
    cls.add_argument("--gradient_checkpointing", action="store_true",
                     help="training: recompute each layer's activations in the backward pass instead of keeping "
                          "them: less memory for long inputs and big models, a second forward pass of compute, the "
                          "same results")
    cls.add_argument("--lr", type=finite_float, default=1e-5, help="AdamW learning rate")
    cls.add_argument("--hidden_dropout_prob", type=finite_float, default=0.3, help="dropout before the classification head")
    cls.add_argument("--filepath", default=None,
                     help="best-dev checkpoint (default: <dataset>-<option>-<lr>.pt); training also writes "
                          "<filepath>.state for --resume, <stem>.metrics.jsonl and <stem>.png")
    cls.add_argument("--resume", action="store_true",
                     help="continue training from <filepath>.state (none yet: start at epoch 0); only --epochs and "
                          "output/device flags may change")
    cls.add_argument("--overwrite", action="store_true",
                     help="replace a --filepath checkpoint that another run (other data or flags) made; export: "
                          "replace an --output folder that no export made")
    cls.add_argument("--lora_rank", type=int, default=4, help="rank of each LoRA update")
    cls.add_argument("--lora_alpha", type=finite_float, default=1.0, help="LoRA scaling: alpha / rank")
    cls.add_argument("--lora_dropout", type=finite_float, default=0.0, help="dropout on the LoRA input")
    cls.add_argument("--lora_targets", default=",".join(DEFAULT_TARGETS),
                     help=f"comma-separated among {','.join(ALL_TARGETS)}, or 'attention', or 'all'")
    cls.add_argument("--input", help="classify: one sentence, or '<label> ||| <sentence>', per line; - for stdin")
    cls.add_argument("--output", help="classify: write '<label> ||| <sentence>' lines here instead of printing "
                                      "'<label name>\\t<probability>\\t<sentence>'; export: the folder to write")
    cls.add_argument("--adapter", action="store_true",
                     help="export a LoRA checkpoint as a PEFT adapter (adapter_config.json, adapter_model.safetensors) "
                          "for its base model's folder, instead of merged into a whole model")
    cls.add_argument("--lm-only", action="store_true",
                     help="export the language model alone (LlamaForCausalLM): of --filepath, or without it of "
                          "--pretrained-model-path (e.g. a llama2.c model)")


# ---------------------------------------------------------------------------------------------------------
# flags -> settings, made and checked once

def get_args(argv: Optional[list[str]] = None) -> Settings:
    args = build_parser().parse_args(argv)
    check_values(args)
    lora_targets = parse_lora_targets(args.lora_targets)
    if args.option == "classify":
        return classify_settings(args)
    if args.option == "export":
        return export_settings(args)
    model = model_files(args)
    inputs = [("--pretrained-model-path", model.model), ("--tokenizer", model.tokenizer)]
    if args.option == "generate":
        prompt = ASSIGNMENT_PREFIX if args.prompt is None else args.prompt
        generation = GenerationSettings(prompt, args.max_new_tokens, args.top_k, args.top_p, args.quantize,
                                        generation_runs(args))
        outputs = [(run.flag, run.output) for run in generation.runs]
    else:
        data = data_settings(args)
        outputs = [("--dev_out", data.dev_out), ("--test_out", data.test_out)]
        inputs += [(flag, getattr(data, flag[2:].replace("-", "_"))) for flag in CFIMDB]
    if args.option in ("finetune", "lora"):
        files = RunFiles.beside(args.filepath or f"{dataset_name(data.dev)}-{args.option}-{args.lr}.pt")
        lora = LoRASettings(args.lora_rank, args.lora_alpha, args.lora_dropout, lora_targets) \
            if args.option == "lora" else None
        training = TrainingSettings(args.option, args.epochs, args.lr, args.hidden_dropout_prob, lora, files,
                                    args.resume, args.overwrite, args.micro_batch_size, args.gradient_checkpointing)
        outputs = files.outputs() + outputs  # the checkpoint first: the file that a clash names
    check_outputs(outputs, inputs)
    stored = stored_dtype(model.model) if is_hf_folder(model.model) else "fp32"
    settings = Settings(args.option, args.use_gpu, args.dtype, args.seed, model, tuple(outputs),
                        stored_dtype=(stored, f"{model.model} is stored in"))
    if args.option == "generate":
        return dataclasses.replace(settings, generation=generation)
    if args.option == "prompt":
        return dataclasses.replace(settings, data=data)
    return dataclasses.replace(settings, data=data, training=training)


def check_values(args: argparse.Namespace) -> None:
    checks = [
        (args.lr > 0, "--lr must be > 0"),
        (args.batch_size is None or args.batch_size > 0, "--batch_size must be > 0"),
        (args.micro_batch_size is None or args.micro_batch_size > 0, "--micro_batch_size must be > 0"),
        (args.option in ("finetune", "lora") or args.micro_batch_size is None,
         "--micro_batch_size goes with --option finetune or lora"),
        (args.option in ("finetune", "lora") or not args.gradient_checkpointing,
         "--gradient_checkpointing goes with --option finetune or lora"),
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
        (args.option == "classify" or not args.input, "--input goes with --option classify"),
        (args.option in ("classify", "export") or not args.output, "--output goes with --option classify or export"),
        (args.option == "export" or not args.lm_only, "--lm-only goes with --option export"),
        (args.option == "export" or not args.adapter, "--adapter goes with --option export"),
        (not (args.adapter and args.lm_only), "--adapter and --lm-only exclude each other: an adapter is not a "
                                               "language model"),
        (args.option in ("finetune", "lora") or not args.resume, "--resume goes with --option finetune or lora"),
        (args.option == "generate" or not args.quantize,
         "--quantize goes with --option generate (training and scoring use the float weights)"),
    ]
    for ok, message in checks:
        if not ok:
            raise UsageError(message)


def parse_lora_targets(spec: str) -> tuple[str, ...]:
    named = {"attention": ATTENTION_TARGETS, "all": ALL_TARGETS}
    targets = []
    for name in (part.strip() for part in spec.split(",")):
        if name not in ALL_TARGETS and name not in named:
            raise UsageError(f"--lora_targets: unknown target {name!r}; choose among "
                             f"{', '.join(ALL_TARGETS)}, 'attention' or 'all'")
        targets += named.get(name, (name,))
    return tuple(dict.fromkeys(targets))


def generation_runs(args: argparse.Namespace) -> tuple[GenerationRun, ...]:
    """The assignment's pair (greedy and T = 1), or one --temperature to the low (T = 0) or high output flag."""
    low = GenerationRun("--generated_sentence_low_temp_out", 0.0,
                        args.generated_sentence_low_temp_out or "generated-sentence-temp-0.txt")
    high_flag, high_out = "--generated_sentence_high_temp_out", args.generated_sentence_high_temp_out
    if args.temperature is None:
        return low, GenerationRun(high_flag, 1.0, high_out or "generated-sentence-temp-1.txt")
    if args.temperature == 0:
        return (low,)
    return (GenerationRun(high_flag, args.temperature, high_out or f"generated-sentence-temp-{args.temperature:g}.txt"),)


def data_settings(args: argparse.Namespace) -> DataSettings:
    """The data flags come all together or not at all: CFIMDB's files fill in only when none is given, so
    that an SST run never trains on CFIMDB because --train was forgotten."""
    needed = ["--dev", "--test", "--label-names"]
    if args.option != "prompt" or args.eval_train:
        needed.insert(0, "--train")
    given = {flag: getattr(args, flag[2:].replace("-", "_")) for flag in CFIMDB}
    missing = [flag for flag in needed if given[flag] is None]
    if len(missing) < len(needed) and missing:
        defaults = ", ".join(f"{flag} {CFIMDB[flag]}" for flag in missing)
        raise UsageError(f"{' '.join(missing)} not given while other data flags are; the defaults ({defaults}) "
                         f"would mix datasets: pass {' '.join(needed)} all, or none for CFIMDB")
    paths = {flag: given[flag] or CFIMDB[flag] for flag in CFIMDB}
    dataset, mode = dataset_name(paths["--dev"]), MODE_NAMES[args.option]
    return DataSettings(paths["--train"], paths["--dev"], paths["--test"], paths["--label-names"],
                        args.dev_out or f"{dataset}-dev-{mode}-output.txt",
                        args.test_out or f"{dataset}-test-{mode}-output.txt", args.eval_train, args.batch_size or 8,
                        args.max_sentence_len)


def model_files(args: argparse.Namespace) -> ModelFiles:
    model = args.pretrained_model_path or DEFAULT_MODEL
    return ModelFiles(model, args.tokenizer or (default_tokenizer(model) if is_hf_folder(model) else TOKENIZER_MODEL))


def dataset_name(dev_path: str) -> str:
    return os.path.basename(dev_path).split("-dev")[0].removesuffix(".txt")


def classify_settings(args: argparse.Namespace) -> Settings:
    """classify's batch size, precision and sentence cut default to the training run's, read from its checkpoint."""
    if not args.filepath or not args.input:
        raise UsageError("--option classify needs --filepath CHECKPOINT (from finetune or lora) and --input FILE "
                         "(- for standard input)")
    outputs = [("--output", args.output)] if args.output and args.output != "-" else []
    check_outputs(outputs, [("--filepath", args.filepath), ("--input", args.input),
                            ("--pretrained-model-path", args.pretrained_model_path), ("--tokenizer", args.tokenizer)])
    saved = read_saved(args.filepath, "--filepath", CHECKPOINT_FORMAT)
    classify = ClassifySettings(args.filepath, saved, args.input, args.output, args.pretrained_model_path,
                                args.tokenizer, args.batch_size or saved["training"]["--batch_size"],
                                args.max_sentence_len or saved["max_sentence_len"])
    return Settings("classify", args.use_gpu, args.dtype, args.seed, None, tuple(outputs), classify=classify,
                    stored_dtype=(saved["training"]["--dtype"], f"--filepath {args.filepath} was trained in"))


def export_settings(args: argparse.Namespace) -> Settings:
    """export's source: the classifier of --filepath, or with --lm-only and no --filepath a base model."""
    if not args.output or not (args.filepath or args.lm_only):
        raise UsageError("--option export needs --output DIR and --filepath CHECKPOINT (from finetune or lora); with "
                         "--lm-only, --pretrained-model-path MODEL instead of --filepath exports a base model")
    check_export_folder(args.output, args.overwrite)
    saved = read_saved(args.filepath, "--filepath", CHECKPOINT_FORMAT) if args.filepath else None
    if saved and not args.lm_only and "classifier_head.bias" in saved["trainable"]:
        raise UsageError(f"--filepath {args.filepath}: its head has a bias (trained before heads became transformers' "
                         f"bias-free `score`), which LlamaForSequenceClassification cannot hold; train it again, or "
                         f"export the language model alone with --lm-only")
    if args.adapter and not saved["lora"]:  # --adapter excludes --lm-only, so --filepath was given
        raise UsageError(f"--adapter: --filepath {args.filepath} was not trained with --option lora; export its whole "
                         f"model without --adapter")
    export = ExportSettings(args.output, args.lm_only, args.adapter, args.overwrite, args.filepath, saved,
                            args.pretrained_model_path, args.tokenizer)
    return Settings("export", args.use_gpu, "fp32", args.seed, None if saved else model_files(args),
                    (("--output", args.output),), export=export)


# ---------------------------------------------------------------------------------------------------------
# one function per option

def generate(settings: Settings, runtime: Runtime) -> None:
    generation = settings.generation
    # quantized weights are made from the stored ones as they are read: an fp32 copy of a bf16 file would add nothing
    held = (DTYPES.get(settings.stored_dtype[0]) or torch.float32) if generation.quantize else runtime.weights_dtype
    llama, tokenizer = load_base_model(settings.model.model, settings.model.tokenizer, runtime.device, held)
    llama = prepare_for_decoding(llama.eval(), generation.quantize)
    if generation.quantize:
        print(f"quantized the weights to {generation.quantize} ({weight_megabytes(llama):.1f} MB)")
    prompt_ids = tokenizer.encode(generation.prompt, bos=True, eos=False)
    room = llama.config.max_seq_len - 1
    if len(prompt_ids) > room:
        print(f"warning: the prompt has {len(prompt_ids)} tokens; keeping its last {room - 1} after the "
              f"start token (max_seq_len is {llama.config.max_seq_len})", file=sys.stderr)
        prompt_ids = prompt_ids[:1] + prompt_ids[-(room - 1):]
    idx = torch.tensor([prompt_ids], device=runtime.device)
    for run in generation.runs:
        with runtime.autocast():
            out, n_decoded, seconds = timed_generation(llama, idx, generation.max_new_tokens, run.temperature,
                                                       generation.top_k, generation.top_p)
        if out.shape[1] - idx.shape[1] < generation.max_new_tokens:
            print(f"note: stopped at the model's max_seq_len ({llama.config.max_seq_len} tokens)", file=sys.stderr)
        sentence = tokenizer.decode(out[0].tolist())
        print(f"Temperature is {run.temperature:g}")
        print(sentence)
        print("---------------")
        if n_decoded:
            print(f"decode: {n_decoded} new tokens in {seconds:.2f} s, {n_decoded / seconds:.1f} tok/s")
        write_text_atomic(run.output, sentence)
        print(f"Wrote generated sentence to {run.output}.")


def load_splits(settings: Settings, label_names: list[str], tokenizer: Any, max_seq_len: int,
                **room: Any) -> tuple[Optional[Split], Split, Split]:
    """train (None when prompt does not need it), dev and test, tokenized to fit the model beside `room`."""
    data = settings.data
    load = lambda name, path: load_split(name, path, len(label_names), tokenizer, max_seq_len, data.max_sentence_len,
                                         **room)
    dev, test = load("dev", data.dev), load("test", data.test)
    train = load("train", data.train) if settings.option != "prompt" or data.eval_train else None
    warn_if_labels_unused([s for s in (train, dev, test) if s], label_names, data.label_names)
    return train, dev, test


def report_splits(model: torch.nn.Module, splits: tuple[Optional[Split], Split, Split], label_names: list[str],
                  settings: Settings, pad_id: int, runtime: Runtime) -> None:
    train, dev, test = splits
    data = settings.data
    if data.eval_train:
        report(model, train, label_names, data.batch_size, pad_id, runtime, None)
    report(model, dev, label_names, data.batch_size, pad_id, runtime, data.dev_out)
    report(model, test, label_names, data.batch_size, pad_id, runtime, data.test_out)


def prompt(settings: Settings, runtime: Runtime) -> None:
    label_names = read_label_names(settings.data.label_names)
    llama, tokenizer = load_base_model(settings.model.model, settings.model.tokenizer, runtime.device,
                                       runtime.weights_dtype)
    model = zero_shot_classifier(llama, tokenizer, label_names, settings.data.label_names)
    splits = load_splits(settings, label_names, tokenizer, llama.config.max_seq_len,
                         prompt_suffix=model.prompt_suffix, label_room=model.label_room)
    report_splits(model, splits, label_names, settings, tokenizer.pad_id, runtime)


def train(settings: Settings, runtime: Runtime) -> None:
    """finetune and lora: train, reload the best-dev checkpoint, report on every split."""
    training = settings.training
    label_names = read_label_names(settings.data.label_names)
    held = runtime.weights_dtype if training.lora else torch.float32  # full fine-tuning trains fp32 masters
    llama, tokenizer = load_base_model(settings.model.model, settings.model.tokenizer, runtime.device, held)
    llama.gradient_checkpointing = training.gradient_checkpointing
    model = build_classifier(llama, len(label_names), training.hidden_dropout_prob, training.lora)
    splits = load_splits(settings, label_names, tokenizer, llama.config.max_seq_len)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    print(f"training {trainable:,} of {total:,} parameters ({100 * trainable / total:.2f}%)")
    described = describe_run(settings, llama, base_fingerprint(settings.model.model), label_names, runtime)
    state = check_run_files(settings, described["training"])
    fit(model, splits[0], splits[1], settings, tokenizer.pad_id, runtime, described, state)
    path = training.files.checkpoint
    load_trainable(model, read_saved(path, "--filepath", CHECKPOINT_FORMAT)["trainable"], path)
    merge_lora(model)  # no-op without adapters; with them, inference costs what the base model costs
    print(f"loaded the best-dev checkpoint {path}")
    report_splits(model, splits, label_names, settings, tokenizer.pad_id, runtime)


def classify(settings: Settings, runtime: Runtime) -> None:
    """Label --input with the --filepath checkpoint, rebuilt from its base model and tokenizer. Results go to
    --output, or as '<label name>\t<probability>\t<sentence>' lines to stdout (and the log to stderr); either
    way one line per input line, blank where the input line is blank."""
    classify, results = settings.classify, sys.stdout
    to_file = classify.output and classify.output != "-"
    with contextlib.redirect_stdout(sys.stdout if to_file else sys.stderr):
        model, tokenizer = load_classifier(classify.checkpoint, classify.saved, classify.model, classify.tokenizer,
                                           runtime.device, runtime.weights_dtype)
        label_names = classify.saved["label_names"]
        split = load_split("input", classify.input, len(label_names), tokenizer, model.llama.config.max_seq_len,
                           classify.max_sentence_len, labels_optional=True)
        probs = predict(model, split, classify.batch_size, tokenizer.pad_id, runtime).exp()
        predictions = probs.argmax(dim=-1).tolist()
        if split.labels[0] is not None:
            print_metrics(split, predictions, label_names, confusion=True)
        if to_file:
            write_predictions(classify.output, predictions, split)
            return
    rows = [f"{label_names[p]}\t{row[p].item():.4f}\t{sentence}"
            for p, row, sentence in zip(predictions, probs, split.sentences)]
    results.write(line_by_line(split, rows))


OPTIONS = {"generate": generate, "prompt": prompt, "finetune": train, "lora": train, "classify": classify,
           "export": lambda settings, runtime: run_export(settings)}


# ---------------------------------------------------------------------------------------------------------

def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)  # a captured log (2>&1) keeps stdout and stderr in order
    start = time.perf_counter()
    runtime = None
    try:
        with signals_interrupt():
            settings = get_args(argv)
            runtime = start_runtime(settings.use_gpu, settings.dtype, *settings.stored_dtype)
            if not runtime.is_main:
                sys.stdout = open(os.devnull, "w")  # one log: rank 0's
            seed_everything(settings.seed + runtime.rank)  # own dropout masks; shared batches come from --seed
            with held_outputs(list(settings.outputs) if runtime.is_main else []):  # rank 0 alone writes
                OPTIONS[settings.option](settings, runtime)
            if settings.option != "export":  # classify's stdout holds its results alone
                print(f"wall time {time.perf_counter() - start:.0f} s, {runtime.peak_memory()}",
                      file=sys.stderr if settings.option == "classify" else sys.stdout)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Interrupted as stop:
        if runtime is None or runtime.is_main:
            resume = shlex.join([sys.executable, os.path.relpath(os.path.abspath(__file__)), *argv]
                                + ([] if "--resume" in argv else ["--resume"]))
            print(f"\nerror: stopped by {stop}; {stop.progress}" + (f"; to continue: {resume}" if stop.resumable
                                                                     else ""), file=sys.stderr)
        return stop.status
    except BrokenPipeError:  # the reader of stdout went away (e.g. `| head`): stop quietly, as a shell tool does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    finally:
        if runtime is not None and runtime.world_size > 1:
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    status = main()
    for stop_signal in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop_signal, signal.SIG_IGN)  # the run is over and its status settled
    sys.exit(status)
