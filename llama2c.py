"""llama2.c's model files, read and checked: train.py's .pt checkpoint ({"model", "model_args", ...}) and the legacy
.bin export. A file that is neither, or whose sizes no llama2.c model has, is a UsageError naming it; nothing
is allocated for a model until its sizes have passed. llama.load_pretrained builds the model from what this
module reads."""
import os
import struct
from typing import Any

import numpy as np
import torch

from config import LlamaConfig
from settings import STATE_FORMAT
from utils import UsageError, load_tensors, require_file, state_file_message

# The assignment's names for the attention projections.
_ASSIGNMENT_NAMES = {"compute_query": "wq", "compute_key": "wk", "compute_value": "wv", "compute_output": "wo"}
_LEGACY_HEADER = struct.Struct("7i")  # dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, max_seq_len
_LARGEST = 1 << 20  # no llama2.c model has a size beyond this; a hostile file could ask for terabytes


class StoredTensors(dict):
    """A file's tensors under our names: a .pt's memory-mapped (a tensor's rows are read only when used), a legacy
    .bin's read whole. rows() and shape() answer as hf.SafetensorsWeights' do (a sharded model reads its own rows:
    sharded.py)."""

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self[name][start:stop]

    def shape(self, name: str) -> torch.Size:
        return self[name].shape


def read_llama2c(path: str) -> tuple[LlamaConfig, StoredTensors, bool]:
    """(config, state dict under our parameter names, whether embeddings and output are tied) of a .pt or .bin."""
    require_file("checkpoint", path, "run ./setup.sh to fetch the models, or pass --pretrained-model-path")
    if os.path.getsize(path) == 0:
        raise UsageError(f"checkpoint {path}: the file is empty; fetch it again (./setup.sh)")
    with open(path, "rb") as f:
        magic = f.read(2)
    # torch.save writes a zip archive ("PK"), or a bare pickle (0x80) in its old format
    if magic == b"PK" or magic[:1] == b"\x80":
        return _read_train_checkpoint(path)
    return _read_legacy_export(path)


def _config(model_args: dict[str, Any], path: str, otherwise: str) -> LlamaConfig:
    """The config that model_args describe, if it is a valid one of a plausible size; `otherwise` says what the
    file then must be."""
    try:
        config = LlamaConfig.from_model_args(model_args)
    except (TypeError, ValueError) as e:
        raise UsageError(f"checkpoint {path}: model_args are not a valid Llama config ({e}); {otherwise}") from e
    for name in ("dim", "hidden_dim", "n_layers", "n_heads", "vocab_size", "max_seq_len"):
        if getattr(config, name) > _LARGEST:
            raise UsageError(f"checkpoint {path}: model_args {name} = {getattr(config, name)!r} is not a plausible "
                             f"model size; {otherwise}")
    return config


def _read_train_checkpoint(path: str) -> tuple[LlamaConfig, dict, bool]:
    ckpt = load_tensors(path, "checkpoint", "fetch it again (./setup.sh)")
    if isinstance(ckpt, dict) and ckpt.get("format") == STATE_FORMAT:
        raise UsageError(state_file_message("--pretrained-model-path", path))
    if isinstance(ckpt, dict) and "trainable" in ckpt:
        raise UsageError(f"checkpoint {path}: written by run_llama.py --option {ckpt.get('option', 'finetune/lora')} "
                         f"(a trained classifier, not a base model); use it with --option classify --filepath {path}")
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict) \
            or not isinstance(ckpt.get("model_args"), dict):
        keys = sorted(map(str, ckpt)) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise UsageError(f"checkpoint {path}: expected llama2.c train.py's dict with 'model' and 'model_args', "
                         f"found {keys}")
    config = _config(ckpt["model_args"], path, "the file is corrupt or not a llama2.c checkpoint")
    state_dict = StoredTensors((_canonical_name(str(k)), v) for k, v in ckpt["model"].items())
    if not all(isinstance(v, torch.Tensor) and v.is_floating_point() for v in state_dict.values()):
        raise UsageError(f"checkpoint {path}: 'model' holds something other than float tensors; fetch it again")
    embeddings, output = state_dict.get("tok_embeddings.weight"), state_dict.get("output.weight")
    tied = embeddings is None or output is None or (embeddings.shape == output.shape and torch.equal(embeddings, output))
    if tied and (embeddings is None) != (output is None):  # the one matrix answers to both names, as in the model
        state_dict["tok_embeddings.weight"] = state_dict["output.weight"] = embeddings if output is None else output
    return config, state_dict, tied


def _canonical_name(name: str) -> str:
    name = name.removeprefix("_orig_mod.")  # torch.compile's wrapper
    return ".".join(_ASSIGNMENT_NAMES.get(part, part) for part in name.split("."))


def _read_legacy_export(path: str) -> tuple[LlamaConfig, dict, bool]:
    """llama2.c's legacy .bin: a header of 7 int32, then float32 weights in a fixed order, tensors of one kind
    for all layers together. A negative vocab_size says the output matrix is stored separately (untied)."""
    not_ours = "neither a PyTorch checkpoint nor a llama2.c legacy .bin export; pass a llama2.c .pt or .bin file"
    with open(path, "rb") as f:
        header = f.read(_LEGACY_HEADER.size)
    if len(header) < _LEGACY_HEADER.size:
        raise UsageError(f"checkpoint {path}: {not_ours}")
    dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, max_seq_len = _LEGACY_HEADER.unpack(header)
    config = _config(dict(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
                          vocab_size=abs(vocab_size), hidden_dim=hidden_dim, max_seq_len=max_seq_len), path, not_ours)
    tied = vocab_size > 0
    layout = _legacy_layout(config, tied)
    expected_size = _LEGACY_HEADER.size + 4 * sum(int(np.prod(shape)) for _, shape in layout)
    if os.path.getsize(path) != expected_size:
        raise UsageError(f"checkpoint {path}: not a complete llama2.c .bin export ({os.path.getsize(path)} bytes "
                         f"where its header implies {expected_size}); fetch it again, or pass a .pt checkpoint")
    data = torch.from_numpy(np.fromfile(path, dtype=np.float32, offset=_LEGACY_HEADER.size))
    state_dict, offset = StoredTensors(), 0
    for name, shape in layout:
        n = int(np.prod(shape))
        if not name.startswith("<"):  # the rope tables are recomputed, not loaded
            state_dict[name] = data[offset:offset + n].view(shape)
        offset += n
    if tied:
        state_dict["output.weight"] = state_dict["tok_embeddings.weight"]
    return config, state_dict, tied


def _legacy_layout(config: LlamaConfig, tied: bool) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of each tensor of a legacy .bin, in file order."""
    dim, hidden_dim, kv_dim = config.dim, config.hidden_dim, config.n_kv_heads * config.head_dim
    per_layer = [("attention_norm.weight", (dim,)), ("attention.wq.weight", (dim, dim)),
                 ("attention.wk.weight", (kv_dim, dim)), ("attention.wv.weight", (kv_dim, dim)),
                 ("attention.wo.weight", (dim, dim)), ("ffn_norm.weight", (dim,)),
                 ("feed_forward.w1.weight", (hidden_dim, dim)), ("feed_forward.w2.weight", (dim, hidden_dim)),
                 ("feed_forward.w3.weight", (hidden_dim, dim))]
    layout = [("tok_embeddings.weight", (config.vocab_size, dim))]
    layout += [(f"layers.{i}.{name}", shape) for name, shape in per_layer for i in range(config.n_layers)]
    layout += [("norm.weight", (dim,)), ("<rope cos>", (config.max_seq_len, config.head_dim // 2)),
               ("<rope sin>", (config.max_seq_len, config.head_dim // 2))]
    if not tied:
        layout.append(("output.weight", (config.vocab_size, dim)))
    return layout
