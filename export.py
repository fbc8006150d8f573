"""--option export: a Hugging Face folder that transformers loads, written whole or not at all. A trained classifier
becomes a LlamaForSequenceClassification (adapters merged, our head as its `score`), a language model (a base model,
or a --task lm checkpoint) a LlamaForCausalLM, and with --adapter a LoRA checkpoint becomes a PEFT adapter for its
base model's folder; hf.py knows the names, the row order and the config files' fields."""
import json
import os
import shutil
import tempfile
from typing import Any, Optional

import torch
from safetensors.torch import save_file

from checkpoint import load_base_model, load_trained, locate
from hf import CONFIG_FILE, WEIGHTS_FILE, hf_config, hf_tokenizer_config, hf_weights, is_hf_folder, peft_adapter
from llama import Llama
from lora import is_adapter
from settings import Settings
from tokenizer import Tokenizer
from utils import UsageError, fsync_folder, nearest_existing, signals_deferred

EXPORT_MARK = "minllama2-export.json"  # what an export holds; a folder with it may be replaced by the next export
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"  # PEFT's names


def check_export_folder(out_dir: str, overwrite: bool) -> None:
    """Before any work: out_dir may be written (absent, empty, an earlier export, or overwrite) in a folder that
    takes new files, or under the nearest one that exists (a probe, since os.access says yes to root everywhere)."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UsageError(f"--output {out_dir}: a file, not a folder; choose another --output")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite \
            and not os.path.isfile(os.path.join(out_dir, EXPORT_MARK)):
        raise UsageError(f"--output {out_dir}: a folder with files that no export wrote; pass --overwrite to "
                         f"replace it, or choose another --output")
    parent = nearest_existing(os.path.dirname(os.path.abspath(out_dir)))  # the rest is made at the start (held_outputs)
    if not os.path.isdir(parent):
        raise UsageError(f"--output {out_dir}: {parent} is a file, so no folder can be made there; choose another "
                         f"--output")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".probe.", dir=parent))
    except OSError as e:
        raise UsageError(f"--output {out_dir}: cannot write in {parent} ({e.strerror}); choose another --output") from e


def write_folder(out_dir: str, llama: Llama, tokenizer: Tokenizer, source: dict[str, Any], overwrite: bool,
                 head: Optional[torch.Tensor] = None, label_names: Optional[list[str]] = None,
                 max_sentence_len: Optional[int] = None) -> None:
    """Write a Hugging Face folder: the language model (LlamaForCausalLM), or with a classifier head and its
    label names a LlamaForSequenceClassification that reads, as ours does, the hidden state of the last real
    token (</s>: the exported tokenizer adds it). `source` says what was exported (kept in EXPORT_MARK)."""
    check_export_folder(out_dir, overwrite)
    base = {name: t for name, t in llama.state_dict().items() if not is_adapter(name)}  # adapters come merged
    weights = hf_weights(base, llama.config, llama.tied_embeddings)
    config = {**hf_config(llama.config, llama.tied_embeddings, llama.output.weight.dtype),
              "pad_token_id": tokenizer.pad_id, "bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id}
    tokenizer_config, text_suffix = tokenizer_setup(tokenizer, llama.config.max_seq_len, head is not None,
                                                    max_sentence_len)
    if head is not None:
        weights.pop("lm_head.weight", None)  # a classifier's output is `score`
        weights["score.weight"] = head.detach().float().contiguous()
        config.update(architectures=["LlamaForSequenceClassification"], problem_type="single_label_classification",
                      id2label={str(i): name for i, name in enumerate(label_names)},
                      label2id={name: i for i, name in enumerate(label_names)})
    _write_files(os.path.abspath(out_dir), WEIGHTS_FILE, weights, {CONFIG_FILE: config, EXPORT_MARK: source,
                                                                   "tokenizer_config.json": tokenizer_config},
                 tokenizer, text_suffix)


def tokenizer_setup(tokenizer: Tokenizer, max_seq_len: int, classifier: bool,
                    max_sentence_len: Optional[int]) -> tuple[dict, list[int]]:
    """tokenizer_config.json, and the ids the exported tokenizer puts after a text. A language model's tokenizer
    puts around a text what ours does; a classifier's ends it with </s> (its head reads it) and cuts as classify
    does: the sentence to max_sentence_len tokens and to the window, the prefix (<s>) and </s> kept around it."""
    suffix = [tokenizer.eos_id] if classifier else tokenizer.suffix
    longest = max_seq_len
    if classifier and max_sentence_len is not None:
        longest = min(max_seq_len, max_sentence_len + len(tokenizer.prefix) + 1)
    config = hf_tokenizer_config(tokenizer.piece(tokenizer.pad_id), longest, bool(tokenizer.prefix), bool(suffix))
    return config, suffix


def write_adapter(out_dir: str, saved: dict, llama: Llama, tokenizer: Tokenizer, source: dict[str, Any],
                  overwrite: bool, base: Optional[str]) -> None:
    """Write a LoRA checkpoint (its contents: saved) as PEFT writes a LlamaForSequenceClassification's adapter, with
    the classifier's tokenizer, or a LlamaForCausalLM's; `base` (a Hugging Face folder, or None) is named as its
    base model."""
    check_export_folder(out_dir, overwrite)
    adapter_config, tensors = peft_adapter(saved["trainable"], llama.config, saved["lora"], base)
    tokenizer_config, text_suffix = tokenizer_setup(tokenizer, llama.config.max_seq_len, saved["task"] != "lm",
                                                    saved["max_sentence_len"])
    _write_files(os.path.abspath(out_dir), ADAPTER_WEIGHTS, tensors,
                 {ADAPTER_CONFIG: adapter_config, "tokenizer_config.json": tokenizer_config,
                  EXPORT_MARK: {**source, "label_names": saved["label_names"]}}, tokenizer, text_suffix)


def _write_files(out_dir: str, weights_name: str, weights: dict[str, torch.Tensor], json_files: dict[str, dict],
                 tokenizer: Tokenizer, text_suffix: list[int]) -> None:
    """Write the folder beside out_dir and rename it into place: out_dir holds the old folder or the new one,
    never part of one; its tokenizer ends a text with text_suffix. An interruption leaves no temporary folder
    behind."""
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.", dir=os.path.dirname(out_dir))
    try:
        save_file(weights, os.path.join(staging, weights_name), metadata={"format": "pt"})
        for name, content in json_files.items():
            with open(os.path.join(staging, name), "w", encoding="utf-8") as f:
                json.dump(content, f, indent=2)
        tokenizer.write_file(os.path.join(staging, tokenizer.file_name), text_suffix)
        for name in os.listdir(staging):
            os.chmod(os.path.join(staging, name), 0o644)  # safetensors and mkdtemp make private files
            with open(os.path.join(staging, name), "rb") as f:
                os.fsync(f.fileno())
        os.chmod(staging, 0o755)
        with signals_deferred():
            _swap_into_place(staging, out_dir)
    except OSError as e:  # a full disk, a file-size limit: the folder stays as it was
        raise UsageError(f"--output {out_dir}: could not write it ({e.strerror or e}); it is left as it was") from e
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(staging + ".old", ignore_errors=True)


def _swap_into_place(staging: str, out_dir: str) -> None:
    """Rename staging to out_dir; a non-empty out_dir is first moved aside (and removed by the caller)."""
    old = None
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        old = staging + ".old"
        os.rename(out_dir, old)
    try:
        os.replace(staging, out_dir)  # replaces an empty folder
    except OSError:
        if old:
            os.rename(old, out_dir)
        raise
    fsync_folder(os.path.dirname(out_dir))


def run_export(settings: Settings) -> None:
    """--option export: the classifier of --filepath (merged, or with --adapter its adapters alone) or, with
    --lm-only, its language model or the base model alone."""
    export, cpu = settings.export, torch.device("cpu")
    if export.saved:
        base = locate(export.saved["base_model"], export.checkpoint, "--pretrained-model-path", export.model)
        quantized = (export.saved["lora"] or {}).get("quantize")
        if quantized and not export.adapter:
            print(f"note: --filepath {export.checkpoint} trained above a {quantized} base: the export holds that base "
                  f"dequantized, in bf16, with the adapters merged")
        dtype = torch.bfloat16 if quantized else torch.float32  # a QLoRA base is big: fp32 would hold it twice over
        trained, tokenizer = load_trained(export.checkpoint, export.saved, base, export.tokenizer, cpu, dtype)
        llama, source = trained.llama, {"--filepath": os.path.abspath(export.checkpoint)}
    else:
        llama, tokenizer = load_base_model(settings.model.model, settings.model.tokenizer, cpu)
        source = {"--pretrained-model-path": os.path.abspath(settings.model.model)}
    lm = not export.saved or export.saved["task"] == "lm"
    head = "LlamaForCausalLM" if lm else f"LlamaForSequenceClassification.from_pretrained(BASE, num_labels=" \
                                          f"{len(export.saved['label_names'])})"
    if export.lm_only or lm and not export.adapter:
        write_folder(export.output, llama, tokenizer, source, export.overwrite)
        loads = f"LlamaForCausalLM.from_pretrained({export.output!r})"
    elif export.adapter:
        write_adapter(export.output, export.saved, llama, tokenizer, source, export.overwrite,
                      os.path.abspath(base) if is_hf_folder(base) else None)
        where = base if is_hf_folder(base) else (f"the folder that `run_llama.py --option export --lm-only "
                                                 f"--pretrained-model-path {base} --output BASE` writes")
        base_model = "LlamaForCausalLM.from_pretrained(BASE)" if lm else head
        loads = f"PeftModel.from_pretrained({base_model}, {export.output!r}), BASE being {where}"
    else:
        write_folder(export.output, llama, tokenizer, source, export.overwrite, trained.classifier_head.weight,
                     export.saved["label_names"], export.saved["max_sentence_len"])
        loads = f"LlamaForSequenceClassification.from_pretrained({export.output!r})"
    print(f"wrote {export.output}: transformers loads it with {loads}")
