"""run_llama.py's flags, made into typed settings once: defaults filled in, values and paths checked before any
work. The one module besides the entry scripts that sees an argparse Namespace.
"""
import argparse
import dataclasses
import math
import os
import sys
from typing import Callable, Optional

from checkpoint import CHECKPOINT_FORMAT, read_saved
from export import check_export_folder
from hf import default_tokenizer, is_hf_folder, stored_dtype
from lora import ALL_TARGETS, ATTENTION_TARGETS, DEFAULT_TARGETS
from optimizer import SCHEDULES
from runtime import DTYPES
from settings import (DEFAULT_MODEL, ClassifySettings, DataSettings, ExportSettings, Fields, GenerationRun,
                      GenerationSettings, LoRASettings, ModelFiles, PerplexitySettings, RunFiles, Settings,
                      TrainedModel, TrainingSettings)
from tokenizer import TOKENIZER_MODEL
from utils import ArgumentParser, UsageError, check_outputs, require_file

DESCRIPTION = """\
minLlama2: a small Llama 2 in PyTorch. One --option per job:

  generate   continue a prompt (greedy and T=1), write generated-sentence-temp-{0,1}.txt; with --input
             prompts.jsonl --output out.jsonl complete many prompts in batches (of --filepath, a --task lm run)
  prompt     zero-shot classification: score each label name as the prompt's continuation
  finetune   train the whole model with a classification head, or with --task lm the language model itself
  lora       train LoRA adapters (and the head); the base model stays frozen
  classify   label new sentences with a checkpoint that finetune or lora wrote (--filepath, --input)
  perplexity score a text file (--input) with the base model or a --task lm checkpoint (--filepath)
  export     write a Hugging Face folder (--output): the model of --filepath, with --adapter its LoRA
             adapters for PEFT, or with --lm-only the language model

Flags and output files follow the CS11-711 minllama assignment; every flag is accepted with hyphens or
underscores. Data files: '<label> ||| <sentence>' lines, or by extension .jsonl / .csv / .tsv with a text and a
label field; a label is an integer or one of the --label-names. Language-model data (--task lm): JSONL of
prompt/completion, Alpaca JSON or JSONL (instruction/input/output), or raw text (.txt, or JSONL of text). Models:
llama2.c .pt/.bin files and Hugging Face folders. Bad input ends with one line and exit status 2.
"""

EXAMPLES = """\
examples (stories260K, the tiny model that setup.sh --no-stories42M keeps; drop both model flags for stories42M):
  M="--pretrained-model-path stories260K.pt --tokenizer tok512.model"
  SST="--train data/sst-train.txt --dev data/sst-dev.txt --test data/sst-test.txt --label-names data/sst-label-mapping.json"
  python run_llama.py --option generate $M --prompt "Once upon a time"
  python run_llama.py --option prompt $M $SST
  python run_llama.py --option finetune $M $SST --epochs 5 --batch_size 80 --lr 1e-3 --output_dir runs/sst-ft
  python run_llama.py --option lora $M $SST --epochs 5 --batch_size 80 --lr 1e-2 --output_dir runs/sst-lora
  echo "A moving film." | python run_llama.py --option classify --filepath runs/sst-lora/sst-lora-0.01.pt --input -
  python run_llama.py --option export --filepath runs/sst-lora/sst-lora-0.01.pt --output sst-classifier
  python run_llama.py --option lora --task lm $M --train qa.jsonl --epochs 20 --lr 1e-2 --filepath qa.pt
  python run_llama.py --option generate --filepath qa.pt --input questions.jsonl --output answers.jsonl
  python run_llama.py --option perplexity $M --input story.txt
"""

ASSIGNMENT_PREFIX = ("I have wanted to see this thriller for a while, and it didn't disappoint. "
                     "Keanu Reeves, playing the hero John Wick, is")
OPTIONS = ("generate", "prompt", "finetune", "lora", "classify", "perplexity", "export")
USAGE = "%(prog)s [--option {" + ",".join(OPTIONS) + "}] [flags]"
MODE_NAMES = {"prompt": "prompting", "finetune": "finetuning", "lora": "lora"}
TRAINING = ("finetune", "lora")
CFIMDB = {"--train": "data/cfimdb-train.txt", "--dev": "data/cfimdb-dev.txt", "--test": "data/cfimdb-test.txt",
          "--label-names": "data/cfimdb-label-mapping.json"}


# ---------------------------------------------------------------------------------------------------------
# flags

class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is not None and action.default is not False and action.default != argparse.SUPPRESS \
                and "default" not in text:
            text += " (default: %(default)s)"
        return text


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number (say e.g. 0.5 or 1e-4)") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def whole_number(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number (say e.g. 8)") from None


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(usage=USAGE, description=DESCRIPTION, epilog=EXAMPLES, formatter_class=HelpFormatter)
    todo = parser.add_argument_group("what to do")
    todo.add_argument("--option", choices=OPTIONS, default="generate", help="what to do (see above)")
    todo.add_argument("--task", choices=("classify", "lm"), default="classify",
                      help="finetune, lora: a classifier with a head (the assignment's), or the language model itself "
                           "trained by next-token cross-entropy (--train alone needed; --dev, --test optional)")
    model = parser.add_argument_group("model", "every option: the model, its precision and device")
    model.add_argument("--pretrained-model-path", help=f"llama2.c checkpoint (train.py .pt or legacy .bin export) "
                                                       f"or Hugging Face folder (default: {DEFAULT_MODEL}; "
                                                       f"classify, export: the checkpoint's)")
    model.add_argument("--tokenizer", help=f"sentencepiece model or tokenizer.json matching the checkpoint, "
                                           f"tok512.model for stories260K (default: {TOKENIZER_MODEL}, or a Hugging "
                                           f"Face folder's own; classify, export: the checkpoint's)")
    model.add_argument("--dtype", choices=("auto", *DTYPES), default="auto",
                       help="precision the weights are held and multiplied in (what trains keeps fp32 masters); auto: "
                            "the checkpoint's (a llama2.c model's fp32; classify: the training run's) where this "
                            "device multiplies it natively, else fp32")
    model.add_argument("--use_gpu", action="store_true", help="run on CUDA (or Apple MPS)")
    model.add_argument("--quantize", choices=("int8", "fp16", "nf4"), default=None,
                       help="generate: decode with int8 weights (one scale per row: a quarter of the bytes to read per "
                            "token) or fp16 weights (half the bytes, nearly lossless), converted when loading; a line "
                            "gives the speed of the tokens after the first. lora: hold the frozen base's layers in nf4 "
                            "(QLoRA's 4-bit NormalFloat, 4.13 bits a weight) or int8, quantized as read, adapters "
                            "trained above them (default: the weights' own precision)")
    data = parser.add_argument_group("data", "prompt, finetune, lora, classify; --input for generate and perplexity")
    data.add_argument("--train", help=f"training data (default: {CFIMDB['--train']}, see --dev)")
    data.add_argument("--dev", help=f"dev data (default: {CFIMDB['--dev']}); give all of --train --dev --test "
                                    f"--label-names or none (CFIMDB), never some")
    data.add_argument("--test", help=f"test data (default: {CFIMDB['--test']})")
    data.add_argument("--label-names", help=f"JSON list of label names (default: {CFIMDB['--label-names']})")
    data.add_argument("--input", help="classify: sentences, one per line (or '<label> ||| <sentence>'), or a .jsonl, "
                                      ".csv or .tsv data file whose labels may be left out; - for stdin; generate: "
                                      "JSONL of \"prompt\" (used as it is) or \"instruction\" (and \"input\": "
                                      "the checkpoint's Alpaca template) lines; perplexity: the text file (no default)")
    data.add_argument("--text_field", default="text", help="the sentence's field in .jsonl data, its column in .csv/.tsv")
    data.add_argument("--label_field", default="label", help="the label's field in .jsonl data, its column in .csv/.tsv")
    data.add_argument("--max_sentence_len", type=whole_number, default=None,
                      help="cut each classified sentence to this many tokens, prompts and labels staying whole "
                           "(default: whole sentences, cut only to the model's window; classify: the training run's)")
    data.add_argument("--block_size", type=whole_number, default=None,
                      help="--task lm: tokens per example at most (raw text is cut into such blocks; a longer "
                           "prompt-completion pair loses its prompt's start) (default: the model's max_seq_len)")
    data.add_argument("--train_on_prompt", action="store_true",
                      help="--task lm: train on prompts too, not only on completions")
    train = parser.add_argument_group("training", "finetune and lora")
    train.add_argument("--epochs", type=whole_number, default=10, help="training epochs")
    train.add_argument("--batch_size", type=whole_number, help="examples per step and process (default: 8; classify: the training run's)")
    train.add_argument("--micro_batch_size", type=whole_number, default=None,
                       help="training: examples per forward and backward pass at most; a step sorts its batch by "
                            "length, cuts it into micro-batches and sums their gradients, so that little padding is "
                            "computed and the step is the batch's (default: on a CPU as few as pad at most a quarter "
                            "of a token per real token, on a GPU or above a --quantize base the whole batch); with "
                            "dropout, each micro-batch draws its own masks")
    train.add_argument("--lr", type=finite_float, default=1e-5, help="AdamW learning rate")
    train.add_argument("--lr_scheduler", choices=SCHEDULES, default="constant",
                       help="the learning rate per optimizer step after --warmup_steps: constant, decayed linearly "
                            "or along half a cosine to 0 at the last step (transformers' schedules)")
    train.add_argument("--warmup_steps", type=whole_number, default=0, help="optimizer steps of linear warmup from 0 to --lr")
    train.add_argument("--weight_decay", type=finite_float, default=0.0,
                       help="AdamW's decoupled weight decay, on matrices (not norm weights)")
    train.add_argument("--max_grad_norm", type=finite_float, default=0.0,
                       help="clip the gradients' global norm to this, as torch's clip_grad_norm_ (0: no clipping)")
    train.add_argument("--hidden_dropout_prob", type=finite_float, default=0.3, help="dropout before the classification head")
    train.add_argument("--seed", type=whole_number, default=1337, help="seeds initialisation, dropout and batch order")
    train.add_argument("--gradient_checkpointing", action="store_true",
                       help="training: recompute each layer's activations in the backward pass instead of keeping "
                            "them: less memory for long inputs and big models, a second forward pass of compute, the "
                            "same results")
    train.add_argument("--fsdp", action="store_true",
                       help="finetune under torchrun: shard the weights, gradients and AdamW state across the processes "
                            "(FSDP2) instead of keeping all of them in each (DistributedDataParallel): for a model whose "
                            "training does not fit one device; the same results, more communication")
    train.add_argument("--resume", action="store_true",
                       help="continue training from <filepath>.state (none yet: start at epoch 0); only --epochs and "
                            "output/device flags may change")
    train.add_argument("--eval_train", action="store_true", help="also report accuracy on the training set")
    lora = parser.add_argument_group("LoRA", "lora, and the adapters it trains")
    lora.add_argument("--lora_rank", type=whole_number, default=4, help="rank of each LoRA update")
    lora.add_argument("--lora_alpha", type=finite_float, default=1.0, help="LoRA scaling: alpha / rank")
    lora.add_argument("--lora_dropout", type=finite_float, default=0.0, help="dropout on the LoRA input")
    lora.add_argument("--lora_targets", default=",".join(DEFAULT_TARGETS),
                      help=f"comma-separated among {','.join(ALL_TARGETS)}, or 'attention', or 'all'")
    gen = parser.add_argument_group("generation", "generate (--stride: perplexity)")
    gen.add_argument("--prompt", default=None, help="text to continue (default: the assignment's John Wick prefix)")
    gen.add_argument("--max_new_tokens", type=whole_number, default=75,
                     help="tokens to generate at most: a story ends earlier where the model ends it (see --ignore_eos)")
    gen.add_argument("--ignore_eos", action="store_true",
                     help="go on past the end of the story (the model's </s>, or <s>, which starts the next one in "
                          "llama2.c's models) up to --max_new_tokens")
    gen.add_argument("--temperature", type=finite_float, default=None,
                     help="sample once at this temperature instead of the assignment's pair (0 and 1); "
                          "temperature 0 writes to the low-temperature file, any other to the high one (default: the pair)")
    gen.add_argument("--top_k", type=whole_number, default=None, help="sample among the k most likely tokens only (default: among all)")
    gen.add_argument("--top_p", type=finite_float, default=None,
                     help="sample among the most likely tokens whose probabilities add up to p (default: among all)")
    gen.add_argument("--stride", type=whole_number, default=None,
                     help="perplexity: tokens the window moves by; each token is scored once, with the context its "
                          "window gives (default: half the window, max_seq_len // 2)")
    out = parser.add_argument_group("outputs", "where each option writes")
    out.add_argument("--output_dir", default=None,
                     help="write the run's files (checkpoint, state, metrics, curves, predictions, generated text, "
                          "and run.json with the command) into this folder, made as needed, under their usual "
                          "names; absolute output paths stay where they are (default: the current folder, no "
                          "run.json)")
    out.add_argument("--filepath", default=None,
                     help="best-dev checkpoint (default: <dataset>-<option>-<lr>.pt, --task lm: <train file's "
                          "stem>-<option>-<lr>.pt); training also writes <filepath>.state for --resume, "
                          "<stem>.metrics.jsonl and <stem>.png; generate, perplexity: a --task lm checkpoint to use")
    out.add_argument("--overwrite", action="store_true",
                     help="replace a --filepath checkpoint that another run (other data or flags) made; export: "
                          "replace an --output folder that no export made")
    out.add_argument("--dev_out", default=None, help="default: <dataset>-dev-<prompting|finetuning|lora>-output.txt")
    out.add_argument("--test_out", default=None, help="default: <dataset>-test-<prompting|finetuning|lora>-output.txt")
    out.add_argument("--output", help="classify: write the predictions here, in the format its extension names "
                                      "(.jsonl, .csv, .tsv, else '<label> ||| <sentence>'), instead of printing "
                                      "'<label name>\\t<probability>\\t<sentence>' (default); generate: the JSONL "
                                      "of each --input line with its \"completion\"; perplexity: a JSON file of the "
                                      "result; export: the folder to write")
    out.add_argument("--generated_sentence_low_temp_out",
                     help="greedy output (default: generated-sentence-temp-0.txt)")
    out.add_argument("--generated_sentence_high_temp_out",
                     help="sampled output (default: generated-sentence-temp-1.txt, or -<T>.txt for --temperature T)")
    out.add_argument("--adapter", action="store_true",
                     help="export a LoRA checkpoint as a PEFT adapter (adapter_config.json, adapter_model.safetensors) "
                          "for its base model's folder, instead of merged into a whole model")
    out.add_argument("--lm-only", action="store_true",
                     help="export the language model alone (LlamaForCausalLM): of --filepath, or without it of "
                          "--pretrained-model-path (e.g. a llama2.c model)")
    return parser

# ---------------------------------------------------------------------------------------------------------
# flags -> settings, made and checked once

def get_args(argv: Optional[list[str]] = None) -> Settings:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    check_values(args)
    lora_targets = parse_lora_targets(args.lora_targets)
    if args.option == "classify":
        return classify_settings(args)
    if args.option == "export":
        return export_settings(args)
    trained = trained_model(args) if args.option in ("generate", "perplexity") and args.filepath else None
    model = model_files(args) if trained is None else ModelFiles(args.pretrained_model_path, args.tokenizer)
    inputs = [("--pretrained-model-path", model.model), ("--tokenizer", model.tokenizer),
              ("--filepath", trained and trained.path)]
    in_run_dir = lambda path: os.path.join(args.output_dir, path) if args.output_dir else path
    if args.option == "generate":
        prompt = ASSIGNMENT_PREFIX if args.prompt is None else args.prompt
        generation = GenerationSettings(prompt, args.max_new_tokens, args.top_k, args.top_p, args.quantize,
                                        not args.ignore_eos, generation_runs(args, in_run_dir), trained, args.input,
                                        args.output and in_run_dir(args.output), args.batch_size or 8)
        outputs = [("--output", generation.output)] if args.input else [(run.flag, run.output) for run in generation.runs]
        inputs.append(("--input", args.input))
    elif args.option == "perplexity":
        perplexity = PerplexitySettings(args.input, args.stride, args.output and in_run_dir(args.output), trained,
                                        args.batch_size or 8)
        outputs = [("--output", perplexity.output)] if args.output else []
        inputs.append(("--input", args.input))
    else:
        data = data_settings(args, in_run_dir)
        outputs = [("--dev_out", data.dev_out), ("--test_out", data.test_out)] if args.task == "classify" else []
        inputs += [(flag, getattr(data, flag[2:].replace("-", "_"))) for flag in CFIMDB]
    if args.option in TRAINING:
        name = dataset_name(data.dev) if args.task == "classify" else os.path.splitext(os.path.basename(data.train))[0]
        files = RunFiles.beside(in_run_dir(args.filepath or f"{name}-{args.option}-{args.lr}.pt"))
        lora = LoRASettings(args.lora_rank, args.lora_alpha, args.lora_dropout, lora_targets, args.quantize) \
            if args.option == "lora" else None
        # The one place the micro-batch default is decided. None: a CPU cuts each step by its padding
        # (data.micro_batches), since its compute grows with the padded tokens. A GPU is fastest on the whole batch,
        # and so is a quantized base, where each micro-batch dequantizes every matrix twice.
        whole_batch = args.use_gpu or bool(lora and lora.quantize)
        micro_batch_size = args.micro_batch_size or (data.batch_size if whole_batch else None)
        training = TrainingSettings(args.option, args.epochs, args.lr, args.hidden_dropout_prob, lora, files,
                                    args.resume, args.overwrite, micro_batch_size, args.gradient_checkpointing,
                                    args.fsdp, args.task, args.lr_scheduler, args.warmup_steps, args.weight_decay,
                                    args.max_grad_norm, args.train_on_prompt, args.block_size)
        outputs = files.outputs() + outputs  # the checkpoint first: the file that a clash names
    run_record = in_run_dir("run.json") if args.output_dir else None
    if run_record:
        outputs.append(("--output_dir (run.json)", run_record))
    check_outputs(outputs, [(flag, path) for flag, path in inputs if path])
    if trained is not None:
        stored = (trained.saved["training"]["--dtype"], f"--filepath {trained.path} was trained in")
    else:
        stored = (stored_dtype(model.model) if is_hf_folder(model.model) else "fp32", f"{model.model} is stored in")
    settings = Settings(args.option, args.use_gpu, args.dtype, args.seed, model, tuple(outputs), stored_dtype=stored,
                        command=tuple(argv), run_record=run_record)
    if args.option == "generate":
        return dataclasses.replace(settings, generation=generation)
    if args.option == "perplexity":
        return dataclasses.replace(settings, perplexity=perplexity)
    if args.option == "prompt":
        return dataclasses.replace(settings, data=data)
    return dataclasses.replace(settings, data=data, training=training)


def trained_model(args: argparse.Namespace) -> TrainedModel:
    """The --filepath of generate and perplexity: a language model that finetune or lora trained (--task lm)."""
    saved = read_saved(args.filepath, "--filepath", CHECKPOINT_FORMAT)
    if saved.get("task", "classify") != "lm":
        raise UsageError(f"--filepath {args.filepath}: a classifier, not a language model; {args.option} needs a "
                         f"checkpoint of --task lm (label sentences with --option classify)")
    return TrainedModel(args.filepath, saved, args.pretrained_model_path, args.tokenizer)


def check_values(args: argparse.Namespace) -> None:
    checks = [
        (args.lr > 0, "--lr must be > 0"),
        (args.batch_size is None or args.batch_size > 0, "--batch_size must be > 0"),
        (args.micro_batch_size is None or args.micro_batch_size > 0, "--micro_batch_size must be > 0"),
        (args.option in TRAINING or args.task == "classify", "--task goes with --option finetune or lora"),
        (args.task == "lm" or not args.train_on_prompt and args.block_size is None,
         "--train_on_prompt and --block_size go with --task lm"),
        (args.block_size is None or args.block_size >= 2, "--block_size must be >= 2 (a token and the next)"),
        (args.option == "perplexity" or args.stride is None, "--stride goes with --option perplexity"),
        (args.stride is None or args.stride > 0, "--stride must be > 0"),
        (args.warmup_steps >= 0, "--warmup_steps must be >= 0"),
        (args.weight_decay >= 0, "--weight_decay must be >= 0"),
        (args.max_grad_norm >= 0, "--max_grad_norm must be >= 0 (0: no clipping)"),
        (args.option in TRAINING or (args.lr_scheduler, args.warmup_steps, args.weight_decay, args.max_grad_norm)
         == ("constant", 0, 0.0, 0.0), "--lr_scheduler, --warmup_steps, --weight_decay and --max_grad_norm go with "
                                       "--option finetune or lora"),
        (args.option != "perplexity" or args.input, "--option perplexity needs --input FILE (the text to score)"),
        (args.option != "generate" or bool(args.input) == bool(args.output),
         "--option generate: --input prompts.jsonl and --output out.jsonl go together"),
        (args.option != "generate" or not (args.input and args.prompt is not None),
         "--option generate: --prompt or --input, not both"),
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
        (args.option in ("classify", "generate", "perplexity") or not args.input,
         "--input goes with --option classify, generate or perplexity"),
        (args.option in ("classify", "export", "generate", "perplexity") or not args.output,
         "--output goes with --option classify, generate, perplexity or export"),
        (args.option == "export" or not args.lm_only, "--lm-only goes with --option export"),
        (args.option == "export" or not args.adapter, "--adapter goes with --option export"),
        (not (args.adapter and args.lm_only), "--adapter and --lm-only exclude each other: an adapter is not a "
                                               "language model"),
        (args.option in ("finetune", "lora") or not args.resume, "--resume goes with --option finetune or lora"),
        (args.option not in ("classify", "export", "perplexity") or not args.output_dir,
         "--output_dir goes with --option generate, prompt, finetune or lora; classify, perplexity and export write "
         "--output"),
        (args.option == "generate" or not args.ignore_eos, "--ignore_eos goes with --option generate"),
        (args.option == "finetune" or not args.fsdp,
         "--fsdp goes with --option finetune (LoRA trains a few MB, which every process holds whole at no cost)"),
        (not args.fsdp or int(os.environ.get("WORLD_SIZE", "1")) > 1,
         "--fsdp shards the model across processes: start the run with torchrun --nproc_per_node N (N >= 2)"),
        (args.option in ("generate", "lora") or not args.quantize,
         "--quantize goes with --option generate (int8, fp16) or lora (nf4, int8: QLoRA); full fine-tuning trains "
         "every weight, scoring uses the float weights"),
        (args.option != "generate" or not args.quantize or not args.input and args.quantize != "nf4",
         "--option generate --quantize decodes one --prompt with int8 or fp16 weights (nf4 is for --option lora)"),
        (args.option != "lora" or args.quantize != "fp16",
         "--option lora --quantize holds the frozen base in nf4 or int8 (fp16 is for --option generate)"),
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


def generation_runs(args: argparse.Namespace, in_run_dir: Callable[[str], str]) -> tuple[GenerationRun, ...]:
    """The assignment's pair (greedy and T = 1), or one --temperature to the low (T = 0) or high output flag."""
    low = GenerationRun("--generated_sentence_low_temp_out", 0.0,
                        in_run_dir(args.generated_sentence_low_temp_out or "generated-sentence-temp-0.txt"))
    high_flag, high_out = "--generated_sentence_high_temp_out", args.generated_sentence_high_temp_out
    if args.temperature is None:
        return low, GenerationRun(high_flag, 1.0, in_run_dir(high_out or "generated-sentence-temp-1.txt"))
    if args.temperature == 0:
        return (low,)
    return (GenerationRun(high_flag, args.temperature,
                          in_run_dir(high_out or f"generated-sentence-temp-{args.temperature:g}.txt")),)


def data_settings(args: argparse.Namespace, in_run_dir: Callable[[str], str]) -> DataSettings:
    """The data flags come all together or not at all: CFIMDB's files fill in only when none is given, so
    that an SST run never trains on CFIMDB because --train was forgotten. The language model needs --train alone."""
    if args.task == "lm":
        for flag in ("--label-names", "--dev_out", "--test_out"):
            if getattr(args, flag[2:].replace("-", "_")) is not None:
                raise UsageError(f"{flag} goes with --task classify: a language model has no labels to predict")
        if args.train is None:
            raise UsageError("--task lm needs --train FILE (prompt/completion or Alpaca JSONL, or raw text .txt); "
                             "--dev and --test are optional")
        return DataSettings(args.train, args.dev, args.test, None, None, None, False, args.batch_size or 8, None)
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
                        in_run_dir(args.dev_out or f"{dataset}-dev-{mode}-output.txt"),
                        in_run_dir(args.test_out or f"{dataset}-test-{mode}-output.txt"), args.eval_train,
                        args.batch_size or 8, args.max_sentence_len, Fields(args.text_field, args.label_field))


def model_files(args: argparse.Namespace) -> ModelFiles:
    model = args.pretrained_model_path or DEFAULT_MODEL
    return ModelFiles(model, args.tokenizer or (default_tokenizer(model) if is_hf_folder(model) else TOKENIZER_MODEL))


def dataset_name(dev_path: str) -> str:
    """What the assignment's file names call the dataset: "sst" of data/sst-dev.txt (or .jsonl, .csv, ...)."""
    return os.path.splitext(os.path.basename(dev_path))[0].split("-dev")[0]


def classify_settings(args: argparse.Namespace) -> Settings:
    """classify's batch size, precision and sentence cut default to the training run's, read from its checkpoint."""
    if not args.filepath or not args.input:
        raise UsageError("--option classify needs --filepath CHECKPOINT (from finetune or lora) and --input FILE "
                         "(- for standard input)")
    if args.input != "-":
        require_file("--input", args.input, "fix the path, or pass - to read standard input")
    outputs = [("--output", args.output)] if args.output and args.output != "-" else []
    check_outputs(outputs, [("--filepath", args.filepath), ("--input", args.input),
                            ("--pretrained-model-path", args.pretrained_model_path), ("--tokenizer", args.tokenizer)])
    saved = read_saved(args.filepath, "--filepath", CHECKPOINT_FORMAT)
    if saved.get("task", "classify") != "classify":
        raise UsageError(f"--filepath {args.filepath}: a language model (--task lm), not a classifier; use it with "
                         f"--option generate or perplexity")
    classify = ClassifySettings(args.filepath, saved, args.input, args.output, args.pretrained_model_path,
                                args.tokenizer, args.batch_size or saved["training"]["--batch_size"],
                                args.max_sentence_len or saved["max_sentence_len"],
                                Fields(args.text_field, args.label_field))
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


