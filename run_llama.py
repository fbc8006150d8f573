"""minLlama2's one entry point.

  --option generate   continue a prompt (greedy and T=1), write generated-sentence-temp-{0,1}.txt
  --option prompt     zero-shot classification: score each label name as the prompt's continuation
  --option finetune   train the whole model with a classification head
  --option lora       train LoRA adapters and the head; the base model stays frozen

Flags and output files follow the CS11-711 minllama assignment. Bad input ends with one line on stderr and
exit status 2 (see utils.UsageError).
"""
import argparse
import dataclasses
import os
import random
import sys
import time
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import accuracy_score, f1_score
from tqdm import tqdm

from classifier import LlamaEmbeddingClassifier, LlamaZeroShotClassifier
from llama import Llama, load_pretrained
from lora import ALL_TARGETS, ATTENTION_TARGETS, DEFAULT_TARGETS, inject_lora, merge_lora
from optimizer import AdamW
from tokenizer import Tokenizer
from utils import (DTYPES, Runtime, UsageError, check_labels, make_batches, pad_batch, read_label_names,
                   read_labeled_data, save_atomic, seed_everything, shard, start_runtime, write_text_atomic)

ASSIGNMENT_PREFIX = ("I have wanted to see this thriller for a while, and it didn't disappoint. "
                     "Keanu Reeves, playing the hero John Wick, is")
MODE_NAMES = {"prompt": "prompting", "finetune": "finetuning", "lora": "lora"}


def get_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--option", choices=("generate", "prompt", "finetune", "lora"), default="generate")
    parser.add_argument("--train", default="data/cfimdb-train.txt")
    parser.add_argument("--dev", default="data/cfimdb-dev.txt")
    parser.add_argument("--test", default="data/cfimdb-test.txt")
    parser.add_argument("--label-names", default="data/cfimdb-label-mapping.json")
    parser.add_argument("--pretrained-model-path", default="stories42M.pt",
                        help="llama2.c checkpoint: train.py .pt or legacy .bin export")
    parser.add_argument("--tokenizer", default="tokenizer.model",
                        help="sentencepiece model matching the checkpoint (tok512.model for stories260K)")
    parser.add_argument("--max_sentence_len", type=int, default=None, help="cut each sentence to this many tokens")
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--use_gpu", action="store_true", help="run on CUDA (or Apple MPS)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp32",
                        help="autocast precision; bf16/fp16 speed up GPUs, fp32 matches the reference outputs")

    gen = parser.add_argument_group("generate")
    gen.add_argument("--prompt", default=None, help="text to continue (default: the assignment's John Wick prefix)")
    gen.add_argument("--max_new_tokens", type=int, default=75)
    gen.add_argument("--temperature", type=float, default=None,
                     help="sample once at this temperature instead of the assignment's pair (0 and 1)")
    gen.add_argument("--top_k", type=int, default=None)
    gen.add_argument("--top_p", type=float, default=None)
    gen.add_argument("--generated_sentence_low_temp_out", default="generated-sentence-temp-0.txt")
    gen.add_argument("--generated_sentence_high_temp_out", default="generated-sentence-temp-1.txt")

    cls = parser.add_argument_group("classification")
    cls.add_argument("--dev_out", default=None, help="default: <dataset>-dev-<prompting|finetuning|lora>-output.txt")
    cls.add_argument("--test_out", default=None, help="default: <dataset>-test-<prompting|finetuning|lora>-output.txt")
    cls.add_argument("--eval_train", action="store_true", help="also report accuracy on the training set")
    cls.add_argument("--epochs", type=int, default=10)
    cls.add_argument("--batch_size", type=int, default=8)
    cls.add_argument("--lr", type=float, default=1e-5)
    cls.add_argument("--hidden_dropout_prob", type=float, default=0.3)
    cls.add_argument("--filepath", default=None, help="best-dev checkpoint (default: <option>-<epochs>-<lr>.pt)")
    cls.add_argument("--resume", action="store_true", help="continue training from <filepath>.state")
    cls.add_argument("--lora_rank", type=int, default=4)
    cls.add_argument("--lora_alpha", type=float, default=1.0)
    cls.add_argument("--lora_dropout", type=float, default=0.0)
    cls.add_argument("--lora_targets", default=",".join(DEFAULT_TARGETS),
                     help=f"comma-separated among {','.join(ALL_TARGETS)}, or 'attention', or 'all'")
    args = parser.parse_args(argv)
    validate_args(args)
    return args


def validate_args(args: argparse.Namespace) -> None:
    checks = [
        (args.lr > 0, "--lr must be > 0"),
        (args.batch_size > 0, "--batch_size must be > 0"),
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
    ]
    for ok, message in checks:
        if not ok:
            raise UsageError(message)
    args.lora_targets = parse_lora_targets(args.lora_targets)
    if args.option in MODE_NAMES:
        dataset = os.path.basename(args.dev).split("-dev")[0].removesuffix(".txt")
        mode = MODE_NAMES[args.option]
        args.dev_out = args.dev_out or f"{dataset}-dev-{mode}-output.txt"
        args.test_out = args.test_out or f"{dataset}-test-{mode}-output.txt"
        outputs = [("--dev_out", args.dev_out), ("--test_out", args.test_out)]
        if args.option != "prompt":
            args.filepath = args.filepath or f"{args.option}-{args.epochs}-{args.lr}.pt"
            outputs.append(("--filepath", args.filepath))
    else:
        outputs = [("--generated_sentence_low_temp_out", args.generated_sentence_low_temp_out),
                   ("--generated_sentence_high_temp_out", args.generated_sentence_high_temp_out)]
    for flag, path in outputs:
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise UsageError(f"{flag} {path}: folder {folder} does not exist; create it or pick another path")
        if not os.access(folder, os.W_OK):
            raise UsageError(f"{flag} {path}: folder {folder} is not writable; pick another path")


def parse_lora_targets(spec: str) -> tuple[str, ...]:
    named = {"attention": ATTENTION_TARGETS, "all": ALL_TARGETS}
    targets = []
    for name in (part.strip() for part in spec.split(",")):
        if name not in ALL_TARGETS and name not in named:
            raise UsageError(f"--lora_targets: unknown target {name!r}; choose among "
                             f"{', '.join(ALL_TARGETS)}, 'attention' or 'all'")
        targets += named.get(name, (name,))
    return tuple(dict.fromkeys(targets))


def load_model(args: argparse.Namespace, device: torch.device) -> tuple[Llama, Tokenizer]:
    llama = load_pretrained(args.pretrained_model_path)
    tokenizer = Tokenizer(args.max_sentence_len, args.tokenizer)
    tokenizer.check_vocab(llama.config.vocab_size, args.pretrained_model_path)
    print(f"loaded {args.pretrained_model_path} ({llama.num_parameters() / 1e6:.2f}M parameters) on {device}")
    return llama.to(device), tokenizer


# ---------------------------------------------------------------------------------------------------------
# generate

def generate(args: argparse.Namespace, runtime: Runtime) -> None:
    llama, tokenizer = load_model(args, runtime.device)
    llama.eval()
    prompt_ids = tokenizer.encode(args.prompt or ASSIGNMENT_PREFIX, bos=True, eos=False)
    room = llama.config.max_seq_len - 1
    if len(prompt_ids) > room:
        print(f"warning: the prompt has {len(prompt_ids)} tokens; keeping its last {room} "
              f"(max_seq_len is {llama.config.max_seq_len})", file=sys.stderr)
        prompt_ids = prompt_ids[-room:]
    idx = torch.tensor([prompt_ids], device=runtime.device)
    if args.temperature is None:
        runs = [(0.0, args.generated_sentence_low_temp_out), (1.0, args.generated_sentence_high_temp_out)]
    else:
        runs = [(args.temperature, f"generated-sentence-temp-{args.temperature:g}.txt")]
    for temperature, outfile in runs:
        with runtime.autocast():
            out = llama.generate(idx, args.max_new_tokens, temperature, top_k=args.top_k, top_p=args.top_p)
        if out.shape[1] - idx.shape[1] < args.max_new_tokens:
            print(f"note: stopped at the model's max_seq_len ({llama.config.max_seq_len} tokens)", file=sys.stderr)
        sentence = tokenizer.decode(out[0].tolist())
        print(f"Temperature is {temperature:g}")
        print(sentence)
        print("---------------")
        write_text_atomic(outfile, sentence)
        print(f"Wrote generated sentence to {outfile}.")


# ---------------------------------------------------------------------------------------------------------
# classification data

@dataclasses.dataclass
class Split:
    name: str  # train, dev or test
    path: str
    labels: list[int]
    sentences: list[str]
    token_ids: list[list[int]]  # what the model reads, already cut to its window


def load_split(name: str, path: str, n_labels: int, tokenizer: Tokenizer, max_seq_len: int,
               prompt_suffix: Optional[list[int]] = None, label_room: int = 0) -> Split:
    """Read and tokenize one data file. With prompt_suffix (zero-shot), each input is bos + sentence + suffix
    and the label is appended later; otherwise bos + sentence + eos. Sentences too long for the model's
    window are cut at the end, keeping the suffix and the label whole."""
    flag = f"--{name}"
    examples = read_labeled_data(path, flag)
    check_labels(examples, n_labels, flag, path)
    tail = prompt_suffix if prompt_suffix is not None else [tokenizer.eos_id]
    room = max_seq_len - 1 - len(tail) - label_room
    if room <= 0:
        raise UsageError(f"the prompt and labels need {max_seq_len - room} tokens, more than the model's "
                         f"max_seq_len {max_seq_len}; use shorter --label-names")
    token_ids, n_cut = [], 0
    for _, sentence in examples:
        body = tokenizer.encode(sentence, bos=False, eos=False)
        n_cut += len(body) > room
        token_ids.append([tokenizer.bos_id] + body[:room] + tail)
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
def predict(model: torch.nn.Module, split: Split, batch_size: int, pad_id: int, runtime: Runtime) -> list[int]:
    """Predicted labels in input order; batches are formed by length so little padding is computed, and under
    torchrun each process predicts every world_size-th batch."""
    model.eval()
    lengths = [len(t) for t in split.token_ids]
    batches = make_batches(lengths, batch_size, shuffle=False)[runtime.rank::runtime.world_size]
    predicted = {}
    for indices in progress(batches, f"eval {split.name}", runtime, leave=False):
        tokens, batch_lengths = pad_batch([split.token_ids[i] for i in indices], pad_id)
        with runtime.autocast():
            log_probs = model(tokens.to(runtime.device), batch_lengths.to(runtime.device))
        predicted.update(zip(indices, log_probs.argmax(dim=-1).tolist()))
    merged = {i: label for part in runtime.gather(predicted) for i, label in part.items()}
    return [merged[i] for i in range(len(lengths))]


def report(model: torch.nn.Module, split: Split, args: argparse.Namespace, pad_id: int, runtime: Runtime,
           outfile: Optional[str]) -> None:
    predictions = predict(model, split, args.batch_size, pad_id, runtime)
    acc = accuracy_score(split.labels, predictions)
    f1 = f1_score(split.labels, predictions, average="macro")
    print(f"{split.name} acc :: {acc:.3f}  macro-F1 :: {f1:.3f}")
    if outfile and runtime.is_main:
        write_text_atomic(outfile, "".join(f"{p} ||| {s}\n" for p, s in zip(predictions, split.sentences)))
        print(f"wrote {len(predictions)} predictions to {outfile}")


def classify(args: argparse.Namespace, runtime: Runtime) -> None:
    label_names = read_label_names(args.label_names)
    llama, tokenizer = load_model(args, runtime.device)
    max_seq_len = llama.config.max_seq_len

    if args.option == "prompt":
        suffix = tokenizer.encode(prompt_suffix_text(label_names), bos=False, eos=False)
        label_ids = [tokenizer.encode(name, bos=False, eos=False) for name in label_names]
        model = LlamaZeroShotClassifier(llama, label_ids)
        room = dict(prompt_suffix=suffix, label_room=max(len(ids) for ids in label_ids))
    else:
        model = LlamaEmbeddingClassifier(llama, len(label_names), args.hidden_dropout_prob).to(runtime.device)
        if args.option == "lora":
            adapted = inject_lora(llama, args.lora_targets, args.lora_rank, args.lora_alpha, args.lora_dropout)
            for name, param in model.named_parameters():
                param.requires_grad = "lora_" in name or name.startswith("classifier_head.")
            print(f"LoRA rank {args.lora_rank} on {len(adapted)} layers ({', '.join(args.lora_targets)})")
        room = {}
    load = lambda name, path: load_split(name, path, len(label_names), tokenizer, max_seq_len, **room)
    dev, test = load("dev", args.dev), load("test", args.test)
    train = load("train", args.train) if args.option != "prompt" or args.eval_train else None

    if args.option != "prompt":
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        print(f"training {trainable:,} of {total:,} parameters ({100 * trainable / total:.2f}%)")
        fit(model, train, dev, args, tokenizer.pad_id, runtime)
        model.load_state_dict(torch.load(args.filepath, map_location=runtime.device)["trainable"], strict=False)
        merge_lora(model)  # no-op without adapters; with them, inference costs what the base model costs
        print(f"loaded the best-dev checkpoint {args.filepath}")

    if args.eval_train:
        report(model, train, args, tokenizer.pad_id, runtime, None)
    report(model, dev, args, tokenizer.pad_id, runtime, args.dev_out)
    report(model, test, args, tokenizer.pad_id, runtime, args.test_out)


# ---------------------------------------------------------------------------------------------------------
# training: one loop for full fine-tuning and LoRA; they differ only in which parameters require grad

def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint holds: the whole model for full fine-tuning, adapters + head for LoRA."""
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def rng_states(generator: torch.Generator) -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "batches": generator.get_state()}


def set_rng_states(states: dict, generator: torch.Generator) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    generator.set_state(states["batches"])


def fit(model: torch.nn.Module, train: Split, dev: Split, args: argparse.Namespace, pad_id: int,
        runtime: Runtime) -> None:
    """Train for args.epochs; keep the best-dev checkpoint at args.filepath and, after every epoch, the
    whole training state at args.filepath + '.state' for --resume.

    Under torchrun every process draws the same global batches of batch_size * world_size examples (one
    shared generator) and trains on its own share; DistributedDataParallel averages the gradients."""
    trainer = model
    if runtime.world_size > 1:
        trainer = torch.nn.parallel.DistributedDataParallel(model, device_ids=[runtime.device.index]
                                                            if runtime.device.type == "cuda" else None)
    optimizer = AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.amp_dtype == torch.float16)
    generator = torch.Generator().manual_seed(args.seed)
    state_path = args.filepath + ".state"
    first_epoch, best_dev_acc = 0, -1.0
    if args.resume:
        if not os.path.isfile(state_path):
            raise UsageError(f"--resume: no training state {state_path}; run once without --resume first")
        state = torch.load(state_path, map_location=runtime.device, weights_only=False)
        model.load_state_dict(state["trainable"], strict=False)
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        set_rng_states(state["rng"], generator)
        first_epoch, best_dev_acc = state["epoch"] + 1, state["best_dev_acc"]
        print(f"resumed from {state_path} after epoch {state['epoch']}")

    global_batch = args.batch_size * runtime.world_size
    if runtime.world_size > 1:
        print(f"{runtime.world_size} processes x batch {args.batch_size} = effective batch size {global_batch}")
    lengths = [len(t) for t in train.token_ids]
    for epoch in range(first_epoch, args.epochs):
        trainer.train()
        batches = make_batches(lengths, global_batch, shuffle=True, generator=generator)
        bar = progress(batches, f"train-{epoch}", runtime)
        total_loss, n_seen, start = 0.0, 0, time.perf_counter()
        for step, indices in enumerate(bar):
            mine = shard(indices, runtime.rank, runtime.world_size)
            tokens, batch_lengths = pad_batch([train.token_ids[i] for i in mine], pad_id)
            labels = torch.tensor([train.labels[i] for i in mine], device=runtime.device)
            with runtime.autocast():
                loss = F.nll_loss(trainer(tokens.to(runtime.device), batch_lengths.to(runtime.device)), labels)
            loss_value = loss.item()
            if not runtime.all_finite(loss_value):
                raise UsageError(f"training loss became {loss_value} at epoch {epoch}, step {step}; lower --lr "
                                 f"(the best checkpoint so far is kept in {args.filepath})")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            total_loss += loss_value * len(mine)
            n_seen += len(mine)
            bar.set_postfix(loss=f"{total_loss / n_seen:.3f}",
                            ex_per_s=f"{n_seen * runtime.world_size / (time.perf_counter() - start):.1f}")

        dev_acc = accuracy_score(dev.labels, predict(model, dev, args.batch_size, pad_id, runtime))
        print(f"epoch {epoch}: train loss :: {total_loss / max(n_seen, 1):.3f}, dev acc :: {dev_acc:.3f}, "
              f"{time.perf_counter() - start:.0f} s")
        if dev_acc > best_dev_acc:
            best_dev_acc = dev_acc
            save_checkpoint(model, args, runtime)
        if runtime.is_main:
            save_atomic({"trainable": trainable_state(model), "optimizer": optimizer.state_dict(),
                         "scaler": scaler.state_dict(), "rng": rng_states(generator), "epoch": epoch,
                         "best_dev_acc": best_dev_acc}, state_path)
    if best_dev_acc < 0:  # zero epochs: the untrained model is the best there is
        save_checkpoint(model, args, runtime)
    runtime.barrier()  # the checkpoint is on disk before any process reads it back


def save_checkpoint(model: torch.nn.Module, args: argparse.Namespace, runtime: Runtime) -> None:
    if runtime.is_main:
        save_atomic({"option": args.option, "trainable": trainable_state(model)}, args.filepath)
        print(f"saved the best model so far to {args.filepath}")


# ---------------------------------------------------------------------------------------------------------

def main(argv: Optional[list[str]] = None) -> int:
    start = time.perf_counter()
    runtime = None
    try:
        args = get_args(argv)
        runtime = start_runtime(args.use_gpu, args.dtype)
        if not runtime.is_main:
            sys.stdout = open(os.devnull, "w")  # one log: rank 0's
        seed_everything(args.seed + runtime.rank)  # own dropout masks; shared batches come from args.seed
        if args.option == "generate":
            generate(args, runtime)
        else:
            classify(args, runtime)
            print(f"wall time {time.perf_counter() - start:.0f} s")
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if runtime is not None and runtime.world_size > 1:
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
