"""run_llama.py's flags (flags.py) made into typed settings once: defaults filled in, values and paths checked before
any work. With flags.py, the one module besides the entry scripts that sees an argparse Namespace.
"""
import argparse
import dataclasses
import os
import sys
from typing import Callable, Optional

from checkpoint import CHECKPOINT_FORMAT, read_saved
from export import check_export_folder
from hf import default_tokenizer, is_hf_folder, stored_dtype
from lora import ALL_TARGETS, ATTENTION_TARGETS
from flags import ASSIGNMENT_PREFIX, CFIMDB, MODE_NAMES, TRAINING, build_parser
from settings import (DEFAULT_MODEL, ClassifySettings, DataSettings, ExportSettings, Fields, GenerationRun,
                      GenerationSettings, LoRASettings, ModelFiles, PerplexitySettings, RunFiles, Settings,
                      TrainedModel, TrainingSettings)
from tokenizer import TOKENIZER_MODEL
from utils import UsageError, check_outputs, require_file


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


