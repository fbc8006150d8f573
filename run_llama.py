"""minLlama2's one entry point: flags (flags.py) -> typed settings (flag_settings.py) -> one function per option -> exit
status.

Bad input ends with one line on stderr and exit status 2 (utils.UsageError); Ctrl-C or SIGTERM end with one line
saying what was saved, and status 130 or 143. `python run_llama.py --help` lists the options and every flag.
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
import contextlib
import json
import math
import shlex
import time
from typing import Any, NoReturn, Optional

import torch

from causal_lm import LlamaLanguageModel, sliding_windows
from checkpoint import (CHECKPOINT_FORMAT, base_fingerprint, build_model, check_run_files, describe_run,
                        load_base_model, load_trainable, load_trained, read_saved, write_run_record)
from classifier import zero_shot_classifier
from data import Split, load_lm_split, load_split, make_batches, warn_if_labels_unused
from datafiles import line_by_line, read_label_names
from decoding import complete_batch, prepare_for_decoding, timed_generation, weight_megabytes
from evaluate import lm_loss, predict, print_metrics, report, write_predictions
from lmdata import ALPACA_TEMPLATE, read_prompts, read_text
from export import run_export
from flag_settings import get_args
from lora import merge_lora
from quantized import quantized_weights
from runtime import DTYPES, Interrupted, Runtime, seed_everything, signals_interrupt, start_runtime
from settings import Settings, TrainedModel
from train import fit
from utils import UsageError, held_outputs, write_text_atomic


# ---------------------------------------------------------------------------------------------------------
# one function per option

def language_model(settings: Settings, runtime: Runtime, trained: Optional[TrainedModel], held: torch.dtype,
                   quantize: Optional[str] = None) -> tuple[Any, Any, dict]:
    """The language model to generate from or score, held in `held` (a base model's layers in `quantize`, as read):
    the base model, or a --task lm checkpoint's (its adapters merged in fp32 first, where they are exact); and the
    Alpaca template it was trained with."""
    if trained is None:
        llama, tokenizer = load_base_model(settings.model.model, settings.model.tokenizer, runtime.device, held,
                                           quantize)
        return llama.eval(), tokenizer, ALPACA_TEMPLATE
    model, tokenizer = load_trained(trained.path, trained.saved, trained.model, trained.tokenizer, runtime.device)
    return model.llama.to(held).eval(), tokenizer, trained.saved["template"]


def generate(settings: Settings, runtime: Runtime) -> None:
    generation = settings.generation
    # quantized weights are made from the stored ones as they are read: an fp32 copy of a bf16 file would add nothing
    held = (DTYPES.get(settings.stored_dtype[0]) or torch.float32) if generation.quantize else runtime.weights_dtype
    # int8 rows are decoding's own: loading makes them one matrix at a time, never the whole model in `held` first
    llama, tokenizer, template = language_model(settings, runtime, generation.trained, held,
                                                "int8" if generation.quantize == "int8" else None)
    # llama2.c's models start each story with <s> and never saw </s>: either token ends the story
    stop_ids = {tokenizer.bos_id, tokenizer.eos_id} if generation.stop_at_eos else set()
    if generation.input:
        return complete_file(llama, tokenizer, template, generation, stop_ids, runtime)
    llama = prepare_for_decoding(llama, generation.quantize)
    if generation.quantize:
        print(f"quantized the weights to {generation.quantize} ({weight_megabytes(llama):.1f} MB)")
    prompt_ids = tokenizer.encode_text(generation.prompt)
    room = llama.config.max_seq_len - 1
    if len(prompt_ids) > room:
        print(f"warning: the prompt has {len(prompt_ids)} tokens; keeping its last {room - len(tokenizer.prefix)} "
              f"after the start token (max_seq_len is {llama.config.max_seq_len})", file=sys.stderr)
        prompt_ids = keep_end(prompt_ids, room, len(tokenizer.prefix))
    idx = torch.tensor([prompt_ids], device=runtime.device)
    for run in generation.runs:
        with runtime.autocast(linear_layers=False):
            out, n_decoded, seconds, ended = timed_generation(llama, idx, generation.max_new_tokens, run.temperature,
                                                              generation.top_k, generation.top_p, stop_ids)
        n_new = out.shape[1] - idx.shape[1]
        if ended:
            print(f"note: the model ended the story after {n_new} new tokens; --ignore_eos goes on to "
                  f"--max_new_tokens {generation.max_new_tokens}", file=sys.stderr)
        elif n_new < generation.max_new_tokens:
            print(f"note: stopped at the model's max_seq_len ({llama.config.max_seq_len} tokens)", file=sys.stderr)
        sentence = tokenizer.decode(out[0].tolist())
        print(f"Temperature is {run.temperature:g}")
        print(sentence)
        print("---------------")
        if n_decoded:
            rate = n_decoded / seconds
            digits = 2 if rate < 10 else 1  # a big model's few tokens a second need their second decimal
            print(f"decode: {n_new} new tokens; after the prompt's forward pass, which makes the first, {n_decoded} "
                  f"decoding steps in {seconds:.2f} s, {rate:.{digits}f} tok/s")
        write_text_atomic(run.output, sentence)
        print(f"Wrote generated sentence to {run.output}.")


def keep_end(ids: list[int], room: int, n_prefix: int) -> list[int]:
    """A prompt's ids in at most room tokens: the tokenizer's prefix (<s>) and the prompt's end."""
    return ids if len(ids) <= room else ids[:n_prefix] + ids[len(ids) - (room - n_prefix):]


def complete_file(llama: Any, tokenizer: Any, template: dict, generation: Any, stop_ids: set[int],
                  runtime: Runtime) -> None:
    """--input prompts.jsonl --output out.jsonl: each line with its "completion", prompts of similar lengths
    completed together (a prompt longer than the window keeps its end)."""
    records = read_prompts(generation.input, "--input", template)
    room = llama.config.max_seq_len - 1
    prompts = [tokenizer.encode_text(prompt) for _, prompt in records]
    n_cut = sum(len(ids) > room for ids in prompts)
    if n_cut:
        print(f"warning: {n_cut} prompts are longer than {room} tokens; each keeps its last "
              f"{room - len(tokenizer.prefix)} after the start token (max_seq_len is {llama.config.max_seq_len})",
              file=sys.stderr)
    prompts = [keep_end(ids, room, len(tokenizer.prefix)) for ids in prompts]
    temperature = generation.runs[0].temperature if len(generation.runs) == 1 else 0.0
    completions = {}
    start = time.perf_counter()
    for batch in runtime.progress(make_batches([len(p) for p in prompts], generation.batch_size, shuffle=False),
                                  "generate"):
        with runtime.autocast(linear_layers=False):
            new = complete_batch(llama, [prompts[i] for i in batch], generation.max_new_tokens, temperature,
                                 tokenizer.pad_id, generation.top_k, generation.top_p, stop_ids)
        completions.update(zip(batch, new))
    n_new = sum(map(len, completions.values()))
    print(f"completed {len(prompts)} prompts (temperature {temperature:g}): {n_new} new tokens in "
          f"{time.perf_counter() - start:.1f} s")
    write_text_atomic(generation.output, "".join(
        json.dumps({**record, "completion": tokenizer.decode(completions[i])}, ensure_ascii=False) + "\n"
        for i, (record, _) in enumerate(records)))
    print(f"Wrote {len(records)} completions to {generation.output}.")


def perplexity(settings: Settings, runtime: Runtime) -> None:
    """--input's text as one stream (between the tokenizer's special tokens: <s> first with Llama's), each token
    after the first scored once with the context of a window of max_seq_len tokens that moves by --stride."""
    options = settings.perplexity
    llama, tokenizer, _ = language_model(settings, runtime, options.trained, runtime.weights_dtype)
    ids = tokenizer.encode_text(read_text(options.input, "--input"))
    window = llama.config.max_seq_len
    stride = options.stride or window // 2
    if stride >= window:
        raise UsageError(f"--stride {stride}: a window of {window} tokens moved by that much leaves the next one's "
                         f"first token without context; give at most {window - 1}")
    if len(ids) < 2:
        raise UsageError(f"--input {options.input}: holds no text to score; give it at least one word")
    windows = sliding_windows(len(ids), window, stride)
    split = Split("input", [], [], [ids[begin:end] for begin, end, _ in windows],
                  trained_from=[first - begin for begin, _, first in windows])
    loss_sum, count = lm_loss(LlamaLanguageModel(llama), split, options.batch_size, tokenizer.pad_id, runtime)
    loss = loss_sum / count
    result = {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": count}
    print(f"perplexity {result['perplexity']:.4f} (loss {loss:.4f} over {count} tokens, {len(windows)} windows of "
          f"at most {window}, stride {stride})")
    if options.output:
        write_text_atomic(options.output, json.dumps(result) + "\n")
        print(f"Wrote {options.output}.")


def load_splits(settings: Settings, label_names: list[str], tokenizer: Any, max_seq_len: int,
                **room: Any) -> tuple[Optional[Split], Split, Split]:
    """train (None when prompt does not need it), dev and test, tokenized to fit the model beside `room`."""
    data = settings.data
    load = lambda name, path: load_split(name, path, label_names, tokenizer, max_seq_len, data.max_sentence_len,
                                         fields=data.fields, **room)
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
    lm = training.task == "lm"
    label_names = None if lm else read_label_names(settings.data.label_names)
    held = runtime.weights_dtype if training.lora else torch.float32  # full fine-tuning trains fp32 masters
    # --fsdp: the base waits on the meta device until it is sharded, then each process reads its own rows (train.py)
    llama, tokenizer = load_base_model(settings.model.model, settings.model.tokenizer, runtime.device, held,
                                       training.lora and training.lora.quantize, on_meta=runtime.shard)
    llama.gradient_checkpointing = training.gradient_checkpointing
    model = build_model(llama, training.task, label_names, training.hidden_dropout_prob, training.lora)
    splits = load_lm_splits(settings, tokenizer, llama.config.max_seq_len) if lm else \
        load_splits(settings, label_names, tokenizer, llama.config.max_seq_len)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters()) + quantized_weights(model)
    print(f"training {trainable:,} of {total:,} parameters ({100 * trainable / total:.2f}%)")
    # rank 0 alone reads the whole base once more to fingerprint it
    fingerprint = runtime.gather(base_fingerprint(settings.model.model) if runtime.is_main else None)[0]
    described = describe_run(settings, llama, fingerprint, label_names, runtime)
    state = check_run_files(settings, described["training"])
    fit(model, splits[0], splits[1], settings, tokenizer.pad_id, runtime, described, state)
    path = training.files.checkpoint
    saved = read_saved(path, "--filepath", CHECKPOINT_FORMAT)
    load_trainable(model, saved["trainable"], path, saved)
    merge_lora(model)  # no-op without adapters; with them, inference costs what the base model costs
    print(f"loaded the best-dev checkpoint {path}" if splits[1] else f"loaded the last epoch's checkpoint {path}")
    if not lm:
        return report_splits(model, splits, label_names, settings, tokenizer.pad_id, runtime)
    for split in splits[1:]:
        if split is not None:
            loss_sum, count = lm_loss(model, split, settings.data.batch_size, tokenizer.pad_id, runtime)
            print(f"{split.name} loss :: {loss_sum / count:.3f}, {split.name} perplexity :: "
                  f"{math.exp(min(loss_sum / count, 700.0)):.3f} ({count} tokens)")


def load_lm_splits(settings: Settings, tokenizer: Any, max_seq_len: int) -> tuple[Split, Optional[Split],
                                                                                   Optional[Split]]:
    """--task lm's train, dev and test (the last two where given), in windows of --block_size tokens."""
    data, training = settings.data, settings.training
    window = training.block_size or max_seq_len
    if window > max_seq_len:
        raise UsageError(f"--block_size {window}: more than the model's max_seq_len {max_seq_len}; give at most that")
    return tuple(path and load_lm_split(name, path, tokenizer, window, training.train_on_prompt)
                 for name, path in (("train", data.train), ("dev", data.dev), ("test", data.test)))


def classify(settings: Settings, runtime: Runtime) -> None:
    """Label --input with the --filepath checkpoint, rebuilt from its base model and tokenizer. Results go to
    --output, or as '<label name>\t<probability>\t<sentence>' lines to stdout (and the log to stderr); either
    way one line per input line, blank where the input line is blank."""
    classify, results = settings.classify, sys.stdout
    to_file = classify.output and classify.output != "-"
    with contextlib.redirect_stdout(sys.stdout if to_file else sys.stderr):
        model, tokenizer = load_trained(classify.checkpoint, classify.saved, classify.model, classify.tokenizer,
                                        runtime.device, runtime.weights_dtype)
        label_names = classify.saved["label_names"]
        split = load_split("input", classify.input, label_names, tokenizer, model.llama.config.max_seq_len,
                           classify.max_sentence_len, labels_optional=True, fields=classify.fields)
        probs = predict(model, split, classify.batch_size, tokenizer.pad_id, runtime).exp()
        predictions = probs.argmax(dim=-1).tolist()
        if split.labels[0] is not None:
            print_metrics(split, predictions, label_names, confusion=True)
        if to_file:
            write_predictions(classify.output, predictions, split, label_names)
            return
    rows = [f"{label_names[p]}\t{row[p].item():.4f}\t{sentence}"
            for p, row, sentence in zip(predictions, probs, split.sentences)]
    results.write(line_by_line(rows, split.lines, split.n_lines))


OPTIONS = {"generate": generate, "prompt": prompt, "finetune": train, "lora": train, "classify": classify,
           "perplexity": perplexity, "export": lambda settings, runtime: run_export(settings)}


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
            runtime = start_runtime(settings.use_gpu, settings.dtype, *settings.stored_dtype,
                                    shard=bool(settings.training and settings.training.fsdp))
            if not runtime.is_main:
                sys.stdout = open(os.devnull, "w")  # one log: rank 0's
            seed_everything(settings.seed + runtime.rank)  # own dropout masks; shared batches come from --seed
            with held_outputs(list(settings.outputs) if runtime.is_main else []):  # rank 0 alone writes
                if settings.run_record and runtime.is_main:
                    write_run_record(settings, "running")
                OPTIONS[settings.option](settings, runtime)
                if settings.run_record and runtime.is_main:
                    write_run_record(settings, "finished", wall_seconds=round(time.perf_counter() - start, 1))
            if settings.option != "export":  # classify's stdout holds its results alone
                print(f"wall time {time.perf_counter() - start:.0f} s, {runtime.peak_memory()}",
                      file=sys.stderr if settings.option == "classify" else sys.stdout)
            runtime.barrier()  # no process tears its connections down while another still uses them
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


def exit_with(status: int) -> NoReturn:
    """End the process once main() has returned: the run is over and its status settled, so signals are ignored.
    A torchrun process ends at once, without the interpreter's teardown: FSDP's modules and meshes keep the process
    group's C++ objects (gloo's threads) alive past destroy_process_group, and destroying them during the teardown
    aborted a process now and then ("terminate called without an active exception", exit -6) after a run had
    finished. Every file is written, synced and renamed into place by then; only stdout and stderr need flushing."""
    for stop_signal in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop_signal, signal.SIG_IGN)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)


if __name__ == "__main__":
    exit_with(main())
