"""--option export: a Hugging Face folder that transformers loads, written whole or not at all. A trained classifier
becomes a LlamaForSequenceClassification (adapters merged, our head as its `score`), a language model a
LlamaForCausalLM; hf.py knows the names, the row order and config.json's fields."""
import json
import os
import shutil
import tempfile
from typing import Any, Optional

import torch
from safetensors.torch import save_file

from hf import CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE, hf_config, hf_weights
from llama import Llama
from lora import is_adapter
from tokenizer import Tokenizer
from utils import UsageError, fsync_folder, signals_deferred

EXPORT_MARK = "minllama2-export.json"  # what an export holds; a folder with it may be replaced by the next export


def check_export_folder(out_dir: str, overwrite: bool) -> None:
    """Before any work: out_dir may be written (absent, empty, an earlier export, or overwrite) in a folder that
    exists and takes new files (a probe, since os.access says yes to root everywhere)."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UsageError(f"--output {out_dir}: a file, not a folder; choose another --output")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite \
            and not os.path.isfile(os.path.join(out_dir, EXPORT_MARK)):
        raise UsageError(f"--output {out_dir}: a folder with files that no export wrote; pass --overwrite to "
                         f"replace it, or choose another --output")
    parent = os.path.dirname(os.path.abspath(out_dir))
    if not os.path.isdir(parent):
        raise UsageError(f"--output {out_dir}: folder {parent} does not exist; create it or choose another --output")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".probe.", dir=parent))
    except OSError as e:
        raise UsageError(f"--output {out_dir}: cannot write in {parent} ({e.strerror}); choose another --output") from e


def write_folder(out_dir: str, llama: Llama, tokenizer: Tokenizer, source: dict[str, Any], overwrite: bool,
                 head: Optional[torch.Tensor] = None, label_names: Optional[list[str]] = None) -> None:
    """Write a Hugging Face folder: the language model (LlamaForCausalLM), or with a classifier head and its
    label names a LlamaForSequenceClassification that reads, as ours does, the hidden state of the last real
    token (</s>: the exported tokenizer adds it). `source` says what was exported (kept in EXPORT_MARK)."""
    check_export_folder(out_dir, overwrite)
    base = {name: t for name, t in llama.state_dict().items() if not is_adapter(name)}  # adapters come merged
    weights = hf_weights(base, llama.config, llama.tied_embeddings)
    config = {**hf_config(llama.config, llama.tied_embeddings), "pad_token_id": tokenizer.pad_id,
              "bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id}
    tokenizer_config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
                        "pad_token": tokenizer.sp_model.id_to_piece(tokenizer.pad_id), "padding_side": "right"}
    if head is not None:
        weights.pop("lm_head.weight", None)  # a classifier's output is `score`
        weights["score.weight"] = head.detach().float().contiguous()
        config.update(architectures=["LlamaForSequenceClassification"], problem_type="single_label_classification",
                      id2label={str(i): name for i, name in enumerate(label_names)},
                      label2id={name: i for i, name in enumerate(label_names)})
        tokenizer_config["add_eos_token"] = True
    _write_files(os.path.abspath(out_dir), weights, {CONFIG_FILE: config, "tokenizer_config.json": tokenizer_config,
                                                      EXPORT_MARK: source}, tokenizer.model_path)


def _write_files(out_dir: str, weights: dict[str, torch.Tensor], json_files: dict[str, dict], tokenizer: str) -> None:
    """Write the folder beside out_dir and rename it into place: out_dir holds the old folder or the new one,
    never part of one. An interruption leaves no temporary folder behind."""
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.", dir=os.path.dirname(out_dir))
    try:
        save_file(weights, os.path.join(staging, WEIGHTS_FILE), metadata={"format": "pt"})
        for name, content in json_files.items():
            with open(os.path.join(staging, name), "w", encoding="utf-8") as f:
                json.dump(content, f, indent=2)
        shutil.copyfile(tokenizer, os.path.join(staging, TOKENIZER_FILE))
        for name in os.listdir(staging):
            os.chmod(os.path.join(staging, name), 0o644)  # safetensors and mkdtemp make private files
            with open(os.path.join(staging, name), "rb") as f:
                os.fsync(f.fileno())
        os.chmod(staging, 0o755)
        with signals_deferred():
            _swap_into_place(staging, out_dir)
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
