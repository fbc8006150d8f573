"""bench/run.py's measuring: the timers and memory readings every row uses, the model a run measures, and the
decoding rows (each side at its best thread count; what a step spends besides its weight products; llama2.c's
run.c and runq.c on the same weights)."""
import argparse
import gc
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable

import threadpoolctl
import torch

from config import LlamaConfig
from decoding import Decoder, prepare_for_decoding, timed_generation, weight_megabytes
from llama import KVCache, Llama, load_pretrained


def median_seconds(fn: Callable[[], object], repeats: int, result: bool = False) -> float:
    """The median time of fn over repeats runs after a warm-up; with result, the median of what fn returns."""
    fn()  # warm-up
    values = []
    for _ in range(repeats):
        start = time.perf_counter()
        value = fn()
        values.append(value if result else time.perf_counter() - start)
    return statistics.median(values)


def peak_rss_mb() -> float:
    """This process's peak resident memory. Not ru_maxrss alone on Linux: a child started by fork and exec keeps
    its parent's peak there, so every child would report bench/run.py's own."""
    if os.path.exists("/proc/self/status"):
        with open("/proc/self/status") as f:
            return int(f.read().split("VmHWM:")[1].split()[0]) / 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB elsewhere


def seconds_once(fn: Callable[[], object]) -> float:
    """For runs of minutes: warm-up is a rounding error, a second run doubles the wait."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def base_model(args: argparse.Namespace) -> Llama:
    if args.checkpoint:
        return load_pretrained(args.checkpoint)
    torch.manual_seed(0)
    shape = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=4, vocab_size=32000, max_seq_len=1024) if args.quick else {}
    return Llama(LlamaConfig(**shape))


def decode_tokens_per_second(model: Decoder, prompt: torch.Tensor, new: int) -> float:
    """Greedy decoding speed as `--option generate` reports it: the clock starts at the first new token."""
    _, n_decoded, seconds, _ = timed_generation(model, prompt, new, temperature=0.0)
    return n_decoded / seconds


def at(speed: tuple[float, int]) -> str:
    """The thread count of a (speed, threads) pair, for a row's note."""
    return f"{speed[1]} thread{'s' if speed[1] > 1 else ''}"


def best_thread_count(speed: Callable[[int], float], args: argparse.Namespace) -> tuple[float, int]:
    """(the highest speed, its thread count) over 1..--threads threads: each side at its best, as one would run
    it (on 2 cores a decoding step is often faster on one thread than split across two)."""
    results = []
    for threads in range(1, args.threads + 1):
        set_threads(threads)
        results.append((speed(threads), threads))
    set_threads(args.threads)
    return max(results)


def set_threads(n: int) -> None:
    """PyTorch's threads and numpy's BLAS's (where fp32 decoding's products run): a thread count is both."""
    torch.set_num_threads(n)
    threadpoolctl.threadpool_limits(n, user_api="blas")


def step_budget(model: Decoder, prompt: torch.Tensor, new: int, args: argparse.Namespace) -> tuple[float, int]:
    """What a decoding step spends besides its weight products, in ms (the step timed with every product
    replaced by a ready-made output of its shape), and its operator calls (top-level, views included)."""
    products = model.products()
    for product in products:
        product.forward = lambda x, out=torch.zeros(1, 1, product.out_features): out
    try:
        tokens_per_s = median_seconds(lambda: decode_tokens_per_second(model, prompt, new), args.repeats, result=True)
    finally:
        for product in products:
            del product.forward
    caches = [KVCache(8) for _ in model.layers]
    model(torch.tensor([[1, 2]]), kv_caches=caches)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        model(torch.tensor([[3]]), kv_caches=caches, start_pos=2)
    calls = sum(1 for event in profile.events() if event.cpu_parent is None and event.name.startswith("aten::"))
    return 1e3 / tokens_per_s, calls


def products_ms(model: Decoder, args: argparse.Namespace) -> float:
    """A decoding step's weight products alone, in ms: each on an input of its shape, in the step's thread setting.
    Beside llama2.c's whole token, the floor of what this library's kernels allow."""
    products = model.products()
    inputs = [torch.randn(1, 1, product.in_features) for product in products]
    rounds = 20  # a step's products take milliseconds: each timing spans 20 of them

    def steps() -> None:
        with model.step_context(inputs[0]):
            for _ in range(rounds):
                for product, x in zip(products, inputs):
                    product(x)
    return 1e3 * median_seconds(steps, args.repeats) / rounds


def decode_child(spec: dict, args: argparse.Namespace) -> dict:
    """Runs in a child process: load (or make) the model in one decoding mode; its speed at its best thread count,
    what a step spends besides its products, and its memory."""
    model = prepare_for_decoding(base_model(args).eval(), None if spec["quantize"] == "fp32" else spec["quantize"])
    gc.collect()
    prompt = torch.tensor([[1]])
    with torch.inference_mode():
        tokens_per_s, threads = best_thread_count(lambda _: median_seconds(
            lambda: decode_tokens_per_second(model, prompt, spec["new"]), args.repeats, result=True), args)
        set_threads(threads)
        products = products_ms(model, args)
        besides_ms, calls = step_budget(model, prompt, spec["new"], args)
    with open("/proc/self/statm") as f:
        resident_mb = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    return {"tokens_per_s": tokens_per_s, "threads": threads, "besides_ms": besides_ms, "calls": calls,
            "products_ms": products, "peak_mb": peak_rss_mb(), "resident_mb": resident_mb,
            "weight_mb": weight_megabytes(model)}


def llama2c_rows(ours: Llama, speeds: dict[str, tuple[float, int]], products_ms: dict[str, float], new: int,
                 args: argparse.Namespace) -> list[tuple]:
    """llama2.c's run.c (fp32) and runq.c (int8, Q8_0 groups of 64) on the same weights, built here with
    -Ofast -fopenmp -march=native and exported by its own export.py; both print the speed they achieved, the
    median of --repeats runs at their best thread count. Beside each of our modes' speeds, its products alone
    against llama2.c's whole token: where they take longer, no cut in the rest of our step can catch up."""
    source = os.path.abspath(args.llama2c)
    with tempfile.TemporaryDirectory() as work:
        for program in ("run", "runq"):
            subprocess.run(["gcc", "-Ofast", "-fopenmp", "-march=native", os.path.join(source, program + ".c"), "-lm",
                            "-o", os.path.join(work, program)], check=True)
        checkpoint = os.path.join(work, "model.pt")
        c = ours.config
        model_args = dict(dim=c.dim, n_layers=c.n_layers, n_heads=c.n_heads, n_kv_heads=c.n_kv_heads,
                          vocab_size=c.vocab_size, hidden_dim=c.hidden_dim, multiple_of=c.multiple_of,
                          norm_eps=c.norm_eps, max_seq_len=c.max_seq_len, dropout=0.0)
        torch.save({"model": ours.state_dict(), "model_args": model_args}, checkpoint)
        export = ("import sys, torch; from model import ModelArgs, Transformer; "
                  "from export import legacy_export, version2_export; "
                  "ck = torch.load(sys.argv[1]); m = Transformer(ModelArgs(**ck['model_args'])); "
                  "m.load_state_dict(ck['model'], strict=False); "
                  "legacy_export(m, sys.argv[2]); version2_export(m, sys.argv[3])")
        v0, q80 = os.path.join(work, "v0.bin"), os.path.join(work, "q80.bin")
        subprocess.run([sys.executable, "-c", export, checkpoint, v0, q80], cwd=source, check=True,
                       capture_output=True)
        theirs = {program: best_thread_count(lambda threads: statistics.median(
                      llama2c_speed(os.path.join(work, program), weights, source, new, threads)
                      for _ in range(args.repeats)), args)
                  for program, weights in (("run", v0), ("runq", q80))}
    peers = (("fp32", "run", "run.c"), ("int8", "runq", "runq.c Q8_0"), ("fp16", "run", "run.c fp32"))
    rows = [(f"greedy decode {q}, tok/s (vs llama2.c {name})", speeds[q][0], theirs[program][0],
             f"{at(speeds[q])} vs {at(theirs[program])}; llama2.c: achieved tok/s")
            for q, program, name in peers]
    return rows + [(f"decode {q}: our products alone, ms per token (vs llama2.c {name}'s whole token; lower is better)",
                    products_ms[q], 1e3 / theirs[program][0], f"at {at(speeds[q])}")
                   for q, program, name in peers]


def llama2c_speed(program: str, weights: str, source: str, new: int, threads: int) -> float:
    result = subprocess.run([program, weights, "-z", os.path.join(source, "tokenizer.bin"), "-t", "0", "-n",
                             str(new + 1), "-i", "Once upon a time"], capture_output=True, text=True, check=True,
                            env=dict(os.environ, OMP_NUM_THREADS=str(threads)))
    found = re.search(r"achieved tok/s: ([\d.]+)", result.stderr)
    if not found:
        raise RuntimeError(f"{program} printed no speed: {result.stdout[-300:]!r} {result.stderr[-300:]!r}")
    return float(found.group(1))
