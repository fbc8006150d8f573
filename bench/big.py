"""bench/run.py --big: real model sizes. A random model of TinyLlama's shape (1.1B parameters: hidden 2048, 22 layers,
32 query / 4 key-value heads, feed-forward 5632, vocab 32000, untied), saved by transformers in bf16 into a
temporary folder (2.2 GB, never kept unless --big-dir names one), then, one process at a time so that each peak
resident memory is its own: generate with each precision of ours beside transformers' bf16 model, and a LoRA epoch
beside PEFT's on a bf16 base, for classification and for the language model (SFT: prompt/completion pairs whose
prompts the loss masks). Each row gives tokens per second (or seconds) and peak memory, and the decoding rows the
bytes of weights a token reads times tokens per second beside the machine's read bandwidth (one large sum).

bench/run.py --fsdp: full fine-tuning of a random 348M-parameter model (hidden 1024, 22 layers, fp32; --shape 1b: the
1.1B one) by one process, and by 2 processes under torchrun, replicated (DistributedDataParallel, 348M only) and
sharded (--fsdp): what each process keeps for weights, gradients and AdamW moments, and each process's peak resident
memory.
"""
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Iterator

import torch

from kernels import cpu_has_bf16_matmul

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
             num_key_value_heads=4, max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False,
             pad_token_id=0)
SHAPES = {"1b": SHAPE,  # TinyLlama-1.1B
          "7b": {**SHAPE, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,  # Llama-2-7B
                 "num_key_value_heads": 32, "max_position_embeddings": 4096}}

# transformers' side, run as a child process: generate, then print the decode line and the peak as ours do.
TRANSFORMERS_GENERATE = r"""
import sys, time, torch, transformers
from runtime import peak_rss
torch.set_num_threads(int(sys.argv[3]))
model = transformers.LlamaForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16).eval()
ids = torch.tensor([[1, 9038, 2501, 263, 931]])  # <s> Once upon a time
new = int(sys.argv[2])
with torch.no_grad():
    model.generate(ids, max_new_tokens=1, do_sample=False)
    start = time.perf_counter()
    model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)
    seconds = time.perf_counter() - start
print(f"decode: {new} new tokens in {seconds:.2f} s, {new / seconds:.2f} tok/s")
print(f"peak memory {peak_rss() / 1e9:.2f} GB")
"""

# PEFT's side: the LoRA recipe of run_llama.py --option lora (rank 4, alpha 1, wq and wv, AdamW, one epoch, dev).
PEFT_LORA = r"""
import sys, time, torch, transformers, peft
from runtime import peak_rss
torch.set_num_threads(int(sys.argv[3]))
folder, batch_size = sys.argv[1], int(sys.argv[2])
def read(path):
    rows = [line.split(" ||| ", 1) for line in open(path, encoding="utf-8") if line.strip()]
    return [int(label) for label, _ in rows], [text.strip() for _, text in rows]
tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
tokenizer.pad_token_id = 0
model = transformers.LlamaForSequenceClassification.from_pretrained(folder, dtype=torch.bfloat16, num_labels=5,
                                                                    pad_token_id=0)
model = peft.get_peft_model(model, peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=1,
                                                   target_modules=["q_proj", "v_proj"]))
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
labels, texts = read(sys.argv[4])
start = time.perf_counter()
model.train()
for i in range(0, len(texts), batch_size):
    batch = tokenizer(texts[i:i + batch_size], padding=True, return_tensors="pt")
    loss = torch.nn.functional.cross_entropy(model(**batch).logits.float(), torch.tensor(labels[i:i + batch_size]))
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
model.eval()
labels, texts = read(sys.argv[5])
with torch.no_grad():
    for i in range(0, len(texts), batch_size):
        model(**tokenizer(texts[i:i + batch_size], padding=True, return_tensors="pt"))
print(f"epoch 0: {time.perf_counter() - start:.0f} s, peak memory {peak_rss() / 1e9:.2f} GB")  # with dev, as ours
"""

# PEFT's side of the SFT row: the same ids and masks as ours (lmdata.py), labels -100 on prompts and padding.
PEFT_SFT = r"""
import sys, time, torch, transformers, peft
from runtime import peak_rss
from lmdata import read_lm_rows, tokenize_lm
from tokenizer import Tokenizer
torch.set_num_threads(int(sys.argv[3]))
folder, batch_size = sys.argv[1], int(sys.argv[2])
tokenizer = Tokenizer(folder + "/tokenizer.model")
def batches(path):
    data = tokenize_lm(*read_lm_rows(path, "--train"), tokenizer, 2048, False)
    for i in range(0, len(data.token_ids), batch_size):
        ids, starts = data.token_ids[i:i + batch_size], data.trained_from[i:i + batch_size]
        longest = max(map(len, ids))
        tokens = torch.tensor([t + [0] * (longest - len(t)) for t in ids])
        labels = torch.tensor([[-100] * s + t[s:] + [-100] * (longest - len(t)) for t, s in zip(ids, starts)])
        yield tokens, (torch.arange(longest)[None] < torch.tensor([len(t) for t in ids])[:, None]).long(), labels
model = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
model = peft.get_peft_model(model, peft.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=1,
                                                   target_modules=["q_proj", "v_proj"]))
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
start = time.perf_counter()
model.train()
for tokens, mask, labels in batches(sys.argv[4]):
    model(input_ids=tokens, attention_mask=mask, labels=labels).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
model.eval()
with torch.no_grad():
    for tokens, mask, labels in batches(sys.argv[5]):
        model(input_ids=tokens, attention_mask=mask, labels=labels)
print(f"epoch 0: {time.perf_counter() - start:.0f} s, peak memory {peak_rss() / 1e9:.2f} GB")  # with dev, as ours
"""


FSDP_SHAPE = {**SHAPE, "hidden_size": 1024, "intermediate_size": 2816, "num_attention_heads": 16,
              "num_key_value_heads": 16}


def make_folder(folder: str, shape: dict = SHAPE, dtype: torch.dtype = torch.bfloat16) -> None:
    """A random model of that shape, saved by transformers (the 1.1B one in bf16), with Llama 2's tokenizer."""
    import transformers

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM._from_config(transformers.LlamaConfig(**shape), dtype=dtype)
    model.save_pretrained(folder)
    shutil.copyfile(os.path.join(ROOT, "tokenizer.model"), os.path.join(folder, "tokenizer.model"))


def read_bandwidth() -> float:
    """GB/s of one large sum over 1 GB, which reads it once: about what a decoding step can reach."""
    data = torch.ones(1 << 28)
    data.sum()
    start = time.perf_counter()
    for _ in range(3):
        data.sum()
    return 3 * data.numel() * 4 / (time.perf_counter() - start) / 1e9


def run(command: list[str]) -> str:
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT,
                            env={**os.environ, "TQDM_DISABLE": "1", "PYTHONPATH": ROOT})
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:4])}... failed: {result.stderr.strip()[-500:]}")
    return result.stdout + result.stderr


def layer_weights(shape: dict) -> int:
    """The weights of a shape's layers' matrices (attention and feed-forward)."""
    dim, hidden = shape["hidden_size"], shape["intermediate_size"]
    kv_dim = shape["num_key_value_heads"] * dim // shape["num_attention_heads"]
    return shape["num_hidden_layers"] * (dim * (2 * dim + 2 * kv_dim) + 3 * dim * hidden)


def matrix_weights(shape: dict) -> int:
    """The weights a decoding step reads: every layer's matrices and the output (of the embedding, one row)."""
    return layer_weights(shape) + shape["vocab_size"] * shape["hidden_size"]


def read_files(folder: str) -> None:
    for name in os.listdir(folder):
        with open(os.path.join(folder, name), "rb") as f:
            while f.read(1 << 26):
                pass


def generate_rows(folder: str, new: int, threads: int, shape: dict) -> list[str]:
    """One row per way of generating: tok/s, peak memory, bytes read per token x tok/s."""
    matrices = matrix_weights(shape)
    ours = [sys.executable, "run_llama.py", "--option", "generate", "--pretrained-model-path", folder, "--temperature",
            "0", "--prompt", "Once upon a time", "--max_new_tokens", str(new + 1), "--ignore_eos",
            "--generated_sentence_low_temp_out",
            os.path.join(folder, "out.txt")]
    products = "bf16 products" if cpu_has_bf16_matmul() else "fp16 products"
    ways = [("transformers, bf16", 2, [sys.executable, "-c", TRANSFORMERS_GENERATE, folder, str(new), str(threads)]),
            (f"ours, --dtype bf16 ({products})", 2, ours + ["--dtype", "bf16"]),
            ("ours, --dtype auto", None, ours),
            ("ours, --dtype bf16 --quantize int8", 1, ours + ["--dtype", "bf16", "--quantize", "int8"]),
            ("ours, --dtype bf16 --quantize fp16", 2, ours + ["--dtype", "bf16", "--quantize", "fp16"])]
    read_files(folder)  # every command then reads the weights from the page cache, the first one too
    rows = []
    for name, bytes_per_weight, command in ways:
        start = time.perf_counter()
        out = run(command)
        wall = time.perf_counter() - start  # the whole command: loading, converting, the prompt and the decode
        speed = float(re.findall(r"([\d.]+) tok/s", out)[-1])
        peak = float(re.findall(r"peak memory ([\d.]+) GB", out)[-1])
        if bytes_per_weight is None:  # auto: the precision the run chose
            bytes_per_weight = 2 if "bfloat16)" in out else 4
        rows.append(f"| generate: {name} | {speed:.2f} tok/s | {peak:.2f} GB | "
                    f"{matrices * bytes_per_weight * speed / 1e9:.1f} GB/s | {wall:.0f} s |")
    return rows


def sst_head(folder: str, sentences: int) -> dict[str, str]:
    """The first SST training and dev sentences, as files in folder."""
    data = {}
    for split in ("train", "dev"):
        with open(os.path.join(ROOT, f"data/sst-{split}.txt"), encoding="utf-8") as f:
            data[split] = os.path.join(folder, f"{split}.txt")
            with open(data[split], "w", encoding="utf-8") as out:
                out.writelines(f.readlines()[:sentences])
    return data


def sft_head(folder: str, sentences: int) -> dict[str, str]:
    """The first SST sentences as prompt/completion pairs: the review in a prompt, its label's name the completion."""
    names = ["terrible", "bad", "neutral", "good", "excellent"]
    data = {}
    for split, path in sst_head(folder, sentences).items():
        with open(path, encoding="utf-8") as f:
            rows = [line.split(" ||| ", 1) for line in f if line.strip()]
        data[split] = os.path.join(folder, f"sft-{split}.jsonl")
        with open(data[split], "w", encoding="utf-8") as out:
            out.writelines(json.dumps({"prompt": f"Review: {text.strip()}\nRating:", "completion": f" {names[int(label)]}."})
                           + "\n" for label, text in rows)
    return data


def lora_rows(folder: str, sentences: int, threads: int) -> Iterator[str]:
    """One LoRA epoch on the first SST training sentences, batch 8, then as many dev sentences, ours (on a bf16
    base, and on an nf4 one: QLoRA) and PEFT's (bf16): a classifier, and the language model taught to answer a
    review with its rating (SFT)."""
    common = ["--pretrained-model-path", folder, "--epochs", "1", "--batch_size", "8", "--lr", "1e-4", "--dtype",
              "bf16", "--filepath", os.path.join(folder, "lora.pt"), "--overwrite"]
    sst, sft = sst_head(folder, sentences), sft_head(folder, sentences)
    classify = [sys.executable, "run_llama.py", "--option", "lora", *common, "--train", sst["train"], "--dev",
                sst["dev"], "--test", sst["dev"], "--label-names", "data/sst-label-mapping.json",
                "--hidden_dropout_prob", "0"]
    lm = [sys.executable, "run_llama.py", "--option", "lora", "--task", "lm", *common, "--train", sft["train"],
          "--dev", sft["dev"]]
    runs = [("LoRA", "PEFT, bf16 base", [sys.executable, "-c", PEFT_LORA, folder, "8", str(threads), sst["train"],
                                         sst["dev"]]),
            ("LoRA", "ours, --dtype bf16", classify),
            ("LoRA", "ours, --dtype bf16 --quantize nf4", classify + ["--quantize", "nf4"]),
            ("SFT LoRA", "PEFT, bf16 base", [sys.executable, "-c", PEFT_SFT, folder, "8", str(threads), sft["train"],
                                             sft["dev"]]),
            ("SFT LoRA", "ours, --dtype bf16", lm),
            ("SFT LoRA", "ours, --dtype bf16 --quantize nf4", lm + ["--quantize", "nf4"])]
    for task, name, command in runs:  # each row as soon as it is measured: at 7B a row takes minutes
        out = run(command)
        epoch = re.findall(r"epoch 0: .*?(\d+) s,", out)[-1]
        peak = float(re.findall(r"peak memory ([\d.]+) GB", out)[-1])
        yield f"| {task}, {sentences} sentences + as many dev: {name} | epoch {epoch} s | {peak:.2f} GB | | |"


def bench_fsdp(sentences: int, shape: str) -> None:
    """One epoch of full fine-tuning, one run after the other: by one process (2 threads), and by 2 processes (one
    thread each) replicated (at 348M only: two replicas of 1.1B do not fit 24 GB) and sharded."""
    folder = tempfile.mkdtemp(prefix="minllama2-fsdp-")
    try:
        model_shape = FSDP_SHAPE if shape == "348m" else SHAPES[shape]
        make_folder(folder, model_shape, torch.float32)
        data = sst_head(folder, sentences)
        params = layer_weights(model_shape) + 2 * model_shape["vocab_size"] * model_shape["hidden_size"]  # untied
        print(f"| full fine-tuning of {params / 1e6:.0f}M parameters (fp32) | kept per process: weights + gradients "
              f"+ AdamW moments | peak resident memory per process | epoch |\n| --- | ---: | ---: | ---: |", flush=True)
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
        runs = {"one process": ([sys.executable], ["--batch_size", "4"]),
                "2 processes, DistributedDataParallel": (torchrun, ["--batch_size", "2"]),
                "2 processes, --fsdp": (torchrun, ["--batch_size", "2", "--fsdp"])}
        if shape != "348m":
            del runs["2 processes, DistributedDataParallel"]
        for name, (launch, extra) in runs.items():
            out = run([*launch, "run_llama.py", "--option", "finetune", "--pretrained-model-path", folder, "--train",
                       data["train"], "--dev", data["dev"], "--test", data["dev"], "--label-names",
                       "data/sst-label-mapping.json", "--epochs", "1", "--lr", "1e-5",
                       "--filepath", os.path.join(folder, "model.pt"), "--overwrite", *extra])
            kept = re.findall(r"process \d ([\d.]+) \+ ([\d.]+) \+ ([\d.]+) = ([\d.]+) MB", out)
            peaks = re.findall(r"peak memory ([\d., ]+) GB", out)[-1]
            seconds = re.findall(r"epoch 0: .*?(\d+) s,", out)[-1]
            print(f"| {name} | {' / '.join(f'{float(k[3]) / 1e3:.2f} GB' for k in kept)} | {peaks} GB | {seconds} s |",
                  flush=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def bench_big(folder: str, new: int, sentences: int, threads: int, shape: str = "1b") -> None:
    made = folder is None
    folder = folder or tempfile.mkdtemp(prefix="minllama2-big-")
    try:
        if not os.path.isfile(os.path.join(folder, "config.json")):
            print(f"building the {shape} random bf16 folder in {folder} ...", flush=True)
            make_folder(folder, SHAPES[shape])
        print(f"read bandwidth (one 1 GB sum): {read_bandwidth():.1f} GB/s; {threads} threads; "
              f"CPU bf16 products native: {cpu_has_bf16_matmul()}")
        print("\n| run | speed | peak memory | weights read per second | whole command |\n"
              "| --- | ---: | ---: | ---: | ---: |", flush=True)
        for row in itertools.chain(generate_rows(folder, new, threads, SHAPES[shape]),
                                   lora_rows(folder, sentences, threads) if sentences else []):
            print(row, flush=True)
    finally:
        if made:
            shutil.rmtree(folder, ignore_errors=True)
