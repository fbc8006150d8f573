"""run_llama.py's flags: each one, its group, its help and its type, and the --help text around them. flag_settings.py
makes typed settings of what they parse.
"""
import argparse
import math

from lora import ALL_TARGETS, DEFAULT_TARGETS
from optimizer import SCHEDULES
from runtime import DTYPES
from settings import DEFAULT_MODEL
from tokenizer import TOKENIZER_MODEL
from utils import ArgumentParser

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
