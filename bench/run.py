"""Side-by-side timings of minLlama2 and transformers (+ PEFT) on the same weights and inputs.

  .venv/bin/python -m bench                 # stories42M's shape, random weights, 2 threads (minutes)
  .venv/bin/python -m bench --quick         # tiny sizes: a smoke run, the numbers mean nothing
  .venv/bin/python -m bench --checkpoint stories260K.pt --tokenizer tok512.model
  .venv/bin/python -m bench --dtype bf16 --llama2c ../shared/llama2c   # bf16 training; llama2.c decode rows
  .venv/bin/python -m bench --decode --llama2c ../shared/llama2c        # the decoding rows alone (minutes)
  .venv/bin/python -m bench --training                                  # the training step rows alone
  .venv/bin/python -m bench --big       # 1.1B parameters (TinyLlama's shape): generate and LoRA vs transformers/PEFT
  .venv/bin/python -m bench --fsdp      # 348M parameters, full fine-tuning by 1 and 2 processes: DDP's memory, FSDP's

Prints one table: greedy decode (fp32, int8 and fp16, each side at its best thread count up to --threads) and what a
decoding step spends besides its products, prefill throughput, decoding memory, full fine-tuning and LoRA step time
and peak memory (each in its own child process, so that speed and peak RSS are its own), optionally llama2.c's run.c
and runq.c on the same weights (--llama2c DIR), and end-to-end time of one SST training epoch (full fine-tuning and
LoRA) and of zero-shot scoring of SST dev on the real data files. Each timing is the median of --repeats runs after a
warm-up, except the SST epoch and the zero-shot scoring, which run once (minutes each).
transformers and PEFT are needed only here and in the tests (./setup.sh --test).
"""
import argparse
import copy
import json
import os
import shutil
import subprocess
import sys
from typing import Callable

import torch
import torch.nn.functional as F

from bench.big import ROOT, bench_big, bench_fsdp
from bench.decode import (at, base_model, best_thread_count, decode_child, llama2c_rows, median_seconds, peak_rss_mb,
                          seconds_once, set_threads)
from classifier import build_classifier, zero_shot_classifier
from config import LlamaConfig
from data import Split, load_split, make_batches, pad_batch
from datafiles import read_label_names
from decoding import prepare_for_decoding
from evaluate import predict
from lora import ATTENTION_TARGETS
from optimizer import AdamW
from runtime import DTYPES, Runtime
from settings import LoRASettings
from train import accumulate_gradients
from tokenizer import Tokenizer
from bench.oracle import to_transformers, transformers_config, transformers_weights
from utils import ArgumentParser, UsageError, require_extra, require_file, require_positive


# ---------------------------------------------------------------------------------------------------------
# Measuring

def precision(args: argparse.Namespace) -> Runtime:
    return Runtime(torch.device("cpu"), DTYPES[args.dtype])


def optimize(optimizer: torch.optim.Optimizer, loss_fn: Callable[[], torch.Tensor], args: argparse.Namespace) -> None:
    """One training step; the forward pass under --dtype's autocast, the backward pass outside, as torch advises."""
    optimizer.zero_grad(set_to_none=True)
    with precision(args).autocast():
        loss = loss_fn()
    loss.backward()
    optimizer.step()


@torch.inference_mode()
def bench_inference(args: argparse.Namespace) -> list[tuple]:
    ours = base_model(args).eval()
    theirs = to_transformers(ours, attn_implementation="sdpa")
    vocab = ours.config.vocab_size
    prompt = torch.tensor([[1]])  # <s>: the decoding steps are the whole run
    new = 16 if args.quick else 256
    their_generate = lambda: theirs.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                             pad_token_id=0)
    our_tokens = prepare_for_decoding(copy.deepcopy(ours)).generate(prompt, new, temperature=0.0)
    agree = int((our_tokens == their_generate()).all(dim=0).long().cumprod(0).sum()) - prompt.shape[1]
    their_speed, their_threads = best_thread_count(lambda _: new / median_seconds(their_generate, args.repeats), args)
    # each of our modes in a fresh process: one mode's kernels leave another's measurably slower (fbgemm's fp16
    # before int8: 10-15% here), and a process decodes in one mode
    decoding = {q: child_result({"mode": "decode", "quantize": q, "new": new}, args) for q in ("fp32", "int8", "fp16")}
    speeds = {q: (result["tokens_per_s"], result["threads"]) for q, result in decoding.items()}
    rows = [("greedy decode fp32, tok/s", speeds["fp32"][0], their_speed,
             f"{agree}/{new} greedy tokens identical; {at(speeds['fp32'])} vs {their_threads}")]
    rows += [(f"greedy decode {q}, tok/s (vs transformers fp32)", speeds[q][0], their_speed, at(speeds[q]))
             for q in ("int8", "fp16")]
    rows += [(f"decode {q}: everything but the products, ms per token (vs a 1.5 ms budget; lower is better)",
              result["besides_ms"], 1.5,
              f"{result['calls']} operator calls a step, {result['calls'] / ours.config.n_layers:.0f} per layer; "
              f"the products alone {result['products_ms']:.1f} ms")
             for q, result in decoding.items()]
    if args.llama2c:
        rows += llama2c_rows(ours, speeds, {q: result["products_ms"] for q, result in decoding.items()}, new, args)
    if args.decode:
        return rows
    weights = f"weights {decoding['int8']['weight_mb']:.0f} vs {decoding['fp32']['weight_mb']:.0f} MB"
    rows += [("greedy decode, resident MB while decoding: int8 (vs our fp32; lower is better)",
              decoding["int8"]["resident_mb"], decoding["fp32"]["resident_mb"], weights),
             ("greedy decode, peak RSS MB with loading: int8 (vs our fp32; lower is better)",
              decoding["int8"]["peak_mb"], decoding["fp32"]["peak_mb"], "the float weights exist until quantized")]
    batch = torch.randint(3, vocab, (10, 64))
    rows.append(("prefill 10 x 64, tok/s", batch.numel() / median_seconds(lambda: ours(batch), args.repeats),
                 batch.numel() / median_seconds(lambda: theirs(batch, logits_to_keep=1), args.repeats), ""))
    return rows


LORA = LoRASettings(rank=4, alpha=1.0, dropout=0.0, targets=ATTENTION_TARGETS)  # ours; with_peft_lora is PEFT's


def with_peft_lora(model: torch.nn.Module) -> torch.nn.Module:
    """transformers' classifier with PEFT adapters of the recipe of LORA."""
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=LORA.rank, lora_alpha=LORA.alpha, lora_dropout=0.0,
                                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))


def training_step_child(spec: dict, args: argparse.Namespace) -> dict:
    """Runs in a child process: time training steps of one implementation and mode, report peak RSS."""
    torch.manual_seed(0)
    ours = base_model(args)
    n_labels = 5
    tokens = torch.randint(3, ours.config.vocab_size, (spec["batch"], spec["seqlen"]))
    lengths = torch.full((spec["batch"],), spec["seqlen"])
    labels = torch.randint(0, n_labels, (spec["batch"],))
    if spec["impl"] == "ours":
        model = build_classifier(ours, n_labels, hidden_dropout_prob=0.0, lora=LORA if spec["mode"] == "lora" else None)
        optimizer = AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
        forward = lambda: F.nll_loss(model(tokens, lengths), labels)
    else:
        from transformers import LlamaForSequenceClassification

        model = LlamaForSequenceClassification(transformers_config(ours.config, num_labels=n_labels, pad_token_id=0))
        model.model.load_state_dict(transformers_weights(ours))
        del ours
        if spec["mode"] == "lora":
            model = with_peft_lora(model)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
        forward = lambda: F.cross_entropy(model(input_ids=tokens).logits, labels)
    model.train()
    seconds = median_seconds(lambda: optimize(optimizer, forward, args), args.repeats)
    return {"step_s": seconds, "ex_per_s": spec["batch"] / seconds, "peak_mb": peak_rss_mb()}


def child_result(spec: dict, args: argparse.Namespace) -> dict:
    """Run one measurement in its own process, so that its peak RSS is its own."""
    child = subprocess.run([sys.executable, "-m", "bench", "--child", json.dumps(spec), *forwarded_flags(args)],
                           capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(child.stdout.strip().splitlines()[-1])


def step_gflop(config: LlamaConfig, batch: int, seqlen: int, trains_weights: bool) -> float:
    """A classifier's training step in model GFLOP, counted as a whole padded pass does the work (ours skips some:
    the last layer computes the last token alone): the layers' products forward (2 flops per weight per token) and
    backward (as much again for the inputs' gradients, and once more for the weights' when they train), attention's
    two products per head over half the positions on average (causal), likewise."""
    c = config
    weights = c.dim * c.head_dim * (2 * c.n_heads + 2 * c.n_kv_heads) + 3 * c.dim * c.hidden_dim
    forward = 2 * batch * seqlen * c.n_layers * (weights + seqlen * c.n_heads * c.head_dim)
    return forward * (3 if trains_weights else 2) / 1e9


def gemm_gflops(rows: int, config: LlamaConfig, args: argparse.Namespace) -> float:
    """This machine's fp32 product rate on a step's widest forward shape, (rows, dim) @ (dim, hidden_dim)."""
    x, weight = torch.randn(rows, config.dim), torch.randn(config.dim, config.hidden_dim)
    return 2 * rows * config.dim * config.hidden_dim / median_seconds(lambda: x @ weight, 5 * args.repeats) / 1e9


def bench_training(args: argparse.Namespace) -> list[tuple]:
    sizes = [(8, 16)] if args.quick else [(80, 32), (10, 512)]
    config = base_model(args).config
    rows = []
    for batch, seqlen in sizes:
        gemm = gemm_gflops(batch * seqlen, config, args)  # one reference for both modes' rows
        for mode in ("finetune", "lora"):
            result = {}
            for impl in ("ours", "transformers"):
                spec = {"impl": impl, "mode": mode, "batch": batch, "seqlen": seqlen}
                result[impl] = child_result(spec, args)
            ours_s, their_s = result["ours"]["step_s"], result["transformers"]["step_s"]
            name = f"{'full fine-tuning' if mode == 'finetune' else 'LoRA r=4 q/k/v/o'} {batch} x {seqlen}"
            rows.append((f"{name}, examples/s", result["ours"]["ex_per_s"], result["transformers"]["ex_per_s"],
                         f"step {ours_s:.2f} s vs {their_s:.2f} s"))
            gflop = step_gflop(config, batch, seqlen, trains_weights=mode == "finetune")
            rows.append((f"{name}, model GFLOP/s (peer: this machine's fp32 GEMM of the step's widest shape)",
                         gflop / ours_s, gemm,
                         f"transformers {gflop / their_s:.1f}; {gflop:.1f} GFLOP a step"))
            rows.append((f"{name}, peak RSS MB (lower is better)", result["ours"]["peak_mb"],
                         result["transformers"]["peak_mb"], ""))
    return rows


def bench_sst(args: argparse.Namespace) -> list[tuple]:
    """One epoch of SST fine-tuning (full and LoRA) and zero-shot scoring of SST dev, end to end from the data files:
    our training step (the batch in micro-batches of similar lengths) against a plain loop that pads each batch to its
    longest."""
    tokenizer = Tokenizer(tokenizer_model=args.tokenizer)
    ours = base_model(args)
    tokenizer.check_vocab(ours.config.vocab_size, args.checkpoint or "the benchmark model")
    label_names = read_label_names("data/sst-label-mapping.json")
    n = 80 if args.quick else None  # one batch: the plain zero-shot loop is slow
    cpu = Runtime(torch.device("cpu"), DTYPES[args.dtype])

    train = load_split("train", "data/sst-train.txt", label_names, tokenizer, ours.config.max_seq_len)
    n_train = args.sst_epoch or n
    train = Split(train.name, train.labels[:n_train], train.sentences[:n_train], train.token_ids[:n_train])
    theirs = to_transformers(ours, attn_implementation="sdpa")
    generator = torch.Generator().manual_seed(0)
    lengths = [len(t) for t in train.token_ids]
    labels = lambda indices: torch.tensor([train.labels[i] for i in indices])

    def our_epoch(mode: str) -> None:
        # a copy: LoRA rewires the model it adapts, and the zero-shot rows below need the base model
        model = build_classifier(copy.deepcopy(ours), 5, hidden_dropout_prob=0.0,  # transformers' head has none
                                 lora=LORA if mode == "lora" else None).train()
        opt = AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
        for indices in make_batches(lengths, 80, shuffle=True, generator=generator):
            opt.zero_grad(set_to_none=True)
            accumulate_gradients(model, train, indices, [1.0] * len(indices), 1 / len(indices), tokenizer.pad_id,
                                 args.micro_batch_size, cpu)
            opt.step()

    def their_epoch(mode: str) -> None:
        from transformers import LlamaForSequenceClassification

        model = LlamaForSequenceClassification(transformers_config(ours.config, num_labels=5, pad_token_id=0,
                                                                   attn_implementation="sdpa"))
        model.model.load_state_dict(transformers_weights(ours))
        model = (with_peft_lora(model) if mode == "lora" else model).train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
        for batch in torch.randperm(len(lengths), generator=generator).split(80):
            tokens, batch_lengths = pad_batch([train.token_ids[i] for i in batch.tolist()], 0)
            mask = (torch.arange(tokens.shape[1])[None] < batch_lengths[:, None]).long()
            optimize(opt, lambda: F.cross_entropy(model(input_ids=tokens, attention_mask=mask).logits,
                                                  labels(batch.tolist())), args)

    rows = []
    for mode, name in (("finetune", "full fine-tuning"), ("lora", "LoRA r=4 q/k/v/o")):
        ours_s, hf_s = seconds_once(lambda: our_epoch(mode)), seconds_once(lambda: their_epoch(mode))
        rows.append((f"one SST train epoch, {name} ({len(lengths)} ex), s (lower is better)", ours_s, hf_s, "once"))
    if args.sst_epoch:
        return rows

    zero_shot = zero_shot_classifier(ours, tokenizer, label_names, "data/sst-label-mapping.json")
    label_ids = zero_shot.label_token_ids
    dev = load_split("dev", "data/sst-dev.txt", label_names, tokenizer, ours.config.max_seq_len,
                     prompt_suffix=zero_shot.prompt_suffix, label_room=zero_shot.label_room)
    dev = Split(dev.name, dev.labels[:n], dev.sentences[:n], dev.token_ids[:n])
    ours_s = seconds_once(lambda: predict(zero_shot, dev, 80, tokenizer.pad_id, cpu))
    with precision(args).autocast():
        theirs_s = seconds_once(lambda: transformers_zero_shot(theirs, dev, label_ids))
    rows.append((f"zero-shot SST dev ({len(dev.labels)} ex), s (lower is better)", ours_s, theirs_s, "once"))
    return rows


@torch.inference_mode()
def transformers_zero_shot(hf, split: Split, label_ids: list[list[int]]) -> list[int]:
    """The plain way: batches in file order, each prompt + label padded to the longest, full logits."""
    predictions = []
    for start in range(0, len(split.token_ids), 80):
        prompts = split.token_ids[start:start + 80]
        scores = []
        for label in label_ids:
            tokens, lengths = pad_batch([p + label for p in prompts], 0)
            mask = (torch.arange(tokens.shape[1])[None] < lengths[:, None]).long()
            log_probs = hf(input_ids=tokens, attention_mask=mask).logits.log_softmax(-1)
            scores.append(torch.stack([log_probs[row, len(p) - 1 + torch.arange(len(label)), label].sum()
                                       for row, p in enumerate(prompts)]))
        predictions += torch.stack(scores, 1).argmax(1).tolist()
    return predictions


# ---------------------------------------------------------------------------------------------------------

def forwarded_flags(args: argparse.Namespace) -> list[str]:
    flags = ["--threads", str(args.threads), "--repeats", str(args.repeats), "--dtype", args.dtype]
    flags += ["--quick"] if args.quick else []
    flags += ["--checkpoint", args.checkpoint] if args.checkpoint else []
    return flags


def check_flags(args: argparse.Namespace) -> None:
    """Everything the chosen rows need, before minutes of measuring: a UsageError names what is missing."""
    require_positive({"--threads": args.threads, "--repeats": args.repeats, "--sst-epoch": args.sst_epoch,
                      "--micro-batch-size": args.micro_batch_size})
    require_extra("transformers", "bench/run.py's comparisons")
    allowed = ("348m", "1b") if args.fsdp else ("1b", "7b") if args.big else ()
    if args.shape and args.shape not in allowed:
        raise UsageError(f"--shape {args.shape}: {'--fsdp takes 348m or 1b' if args.fsdp else '--big takes 1b or 7b'}"
                         if allowed else "--shape: it shapes the model of --big or --fsdp; pass one of them")
    if args.big:
        require_positive({"--big-tokens": args.big_tokens})
        require_file("--big's tokenizer", "tokenizer.model", "run ./setup.sh (the 1.1B folder takes Llama 2's)")
    if args.checkpoint and not os.path.isdir(args.checkpoint):  # a folder is a Hugging Face model
        require_file("--checkpoint", args.checkpoint, "pass a llama2.c .pt or .bin file or a Hugging Face folder")
    if not args.decode:
        require_extra("peft", "bench/run.py's LoRA rows (or time --decode alone)")
    if not (args.decode or args.training):
        require_file("--tokenizer", args.tokenizer, "run ./setup.sh, or pass the tokenizer of --checkpoint")
        for path in ("data/sst-train.txt", "data/sst-dev.txt", "data/sst-label-mapping.json"):
            require_file("SST data", path, "run ./setup.sh to fetch the data (the SST rows read it)")
    if args.llama2c:
        for name in ("run.c", "runq.c", "export.py", "model.py", "tokenizer.bin"):
            require_file("--llama2c", os.path.join(args.llama2c, name), "pass a llama2.c checkout")
        if shutil.which("gcc") is None:
            raise UsageError("--llama2c: gcc is not on PATH; install it to build run.c and runq.c, or leave out "
                             "--llama2c")


def main() -> None:
    parser = ArgumentParser(prog="python -m bench", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=None, help="time a real checkpoint instead of random weights")
    parser.add_argument("--tokenizer", default="tokenizer.model", help="for the SST rows; must match the model")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, a smoke run; no meaningful numbers")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                        help="training and scoring precision, ours and transformers' alike (bf16: autocast)")
    parser.add_argument("--llama2c", metavar="DIR", default=None,
                        help="a llama2.c checkout (run.c, runq.c, export.py, model.py, tokenizer.bin): build it and "
                             "time its fp32 and int8 decoding beside ours on the same weights")
    parser.add_argument("--decode", action="store_true",
                        help="only the decoding speeds and their per-token budget (with --llama2c: minutes, not 45)")
    parser.add_argument("--training", action="store_true",
                        help="only the training steps' rows: speed, model GFLOP/s, memory (minutes)")
    parser.add_argument("--sst-epoch", type=int, metavar="N", default=None,
                        help="only the SST training epochs (full fine-tuning, LoRA), on the first N training sentences")
    parser.add_argument("--micro-batch-size", type=int, default=None,
                        help="the SST epoch's micro-batches (default: run_llama.py's, cut by padding on a CPU)")
    parser.add_argument("--big", action="store_true", help="only real model sizes: big.py's rows (see there)")
    parser.add_argument("--fsdp", action="store_true",
                        help="only the memory of full fine-tuning by 2 processes, replicated and sharded (big.py)")
    parser.add_argument("--shape", choices=("348m", "1b", "7b"), default=None,
                        help="the random model's shape: --big's TinyLlama-1.1B (the default) or Llama-2-7B (13.5 GB in "
                             "bf16); --fsdp's 348M (the default) or 1.1B")
    parser.add_argument("--big-dir", default=None, help="--big: keep the model folder here, and reuse it next time")
    parser.add_argument("--big-tokens", type=int, default=32, help="--big: new tokens a generate row decodes")
    parser.add_argument("--big-sentences", type=int, default=8,
                        help="--big: SST sentences of the LoRA epoch (0: no LoRA rows; without bf16 units PEFT's takes 6 "
                             "minutes a sentence)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not args.child:
        check_flags(args)
    set_threads(args.threads)
    if args.fsdp:
        require_extra("transformers", "--fsdp (it saves the random model)")
        bench_fsdp(8, args.shape or "348m")
        return
    if args.big:
        bench_big(args.big_dir, args.big_tokens, args.big_sentences, args.threads, args.shape or "1b")
        return
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps((decode_child if spec["mode"] == "decode" else training_step_child)(spec, args)))
        return

    shape = "checkpoint " + args.checkpoint if args.checkpoint else ("tiny random" if args.quick else "stories42M shape, random weights")
    print(f"minLlama2 vs transformers: {shape}, {args.dtype} training and scoring, {args.threads} threads, "
          f"median of {args.repeats}")
    if args.decode:
        rows = bench_inference(args)
    elif args.training:
        rows = bench_training(args)
    elif args.sst_epoch:
        rows = bench_sst(args)
    else:
        rows = bench_inference(args) + bench_training(args) + bench_sst(args)
    print("\n| measure | minLlama2 | peer | ratio | note |\n| --- | ---: | ---: | ---: | --- |")
    for name, ours, theirs, note in rows:
        better_when_lower = "lower is better" in name
        ratio = theirs / ours if better_when_lower else ours / theirs
        print(f"| {name} | {ours:,.1f} | {theirs:,.1f} | {ratio:.2f}x | {note} |")
    print("\nThe peer is transformers (+ PEFT for LoRA) unless the measure names another. "
          "ratio > 1 means minLlama2 is better (faster, or less memory).")
