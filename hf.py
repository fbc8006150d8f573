"""Hugging Face's Llama format, read and written: a folder with config.json, safetensors weights (one
model.safetensors, or shards listed in model.safetensors.index.json) and a tokenizer (sentencepiece's
tokenizer.model, or the tokenizer.json that transformers 5 saves).

Reading maps the config field by field as transformers reads it and refuses, naming the field, anything this model
cannot represent (rope scaling, biases, another activation or model type); weights are memory-mapped and converted
one tensor at a time, so a model is never held twice. The way out (config.json's fields, the tensors under
transformers' names, LoRA adapters in PEFT's layout) is here too; export.py writes the folder.

transformers orders each query/key head as [even components, odd components] ("rotate half") where llama2.c
and this project interleave the pairs; the rows of wq and wk are permuted on the way in and out.
"""
import json
import math
import mmap
import os
import struct
import sys
from collections.abc import Mapping
from contextlib import contextmanager
from typing import Any, Iterator, Optional

import torch

from config import LlamaConfig
from utils import UsageError

CONFIG_FILE, WEIGHTS_FILE, INDEX_FILE = "config.json", "model.safetensors", "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")  # the sentencepiece model first, as transformers prefers

# Our parameter names -> transformers' (LlamaForCausalLM), within a layer and at the top.
_LAYER_NAMES = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
                "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
                "feed_forward.w1": "mlp.gate_proj", "feed_forward.w3": "mlp.up_proj",
                "feed_forward.w2": "mlp.down_proj", "attention_norm": "input_layernorm",
                "ffn_norm": "post_attention_layernorm"}
_TOP_NAMES = {"tok_embeddings": "model.embed_tokens", "norm": "model.norm", "output": "lm_head"}
_OUR_NAMES = {theirs: ours for ours, theirs in {**_LAYER_NAMES, **_TOP_NAMES}.items()}


def hf_name(name: str) -> str:
    """Our parameter name -> transformers' (layers.0.attention.wq.weight -> model.layers.0.self_attn.q_proj.weight)."""
    module, param = name.rsplit(".", 1)
    if module.startswith("layers."):
        _, index, inner = module.split(".", 2)
        return f"model.layers.{index}.{_LAYER_NAMES[inner]}.{param}"
    return f"{_TOP_NAMES[module]}.{param}"


def our_name(name: str) -> Optional[str]:
    """transformers' name -> ours; None for a tensor that a Llama does not have."""
    module, _, param = name.rpartition(".")
    if module.startswith("model.layers."):
        _, _, index, inner = module.split(".", 3)
        return f"layers.{index}.{_OUR_NAMES[inner]}.{param}" if inner in _OUR_NAMES and index.isdigit() else None
    return f"{_OUR_NAMES[module]}.{param}" if module in _OUR_NAMES else None


def to_rotate_half(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """wq/wk rows, interleaved pairs -> transformers' order: within each head the even components, then the odd."""
    rows, cols = weight.shape
    return weight.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def from_rotate_half(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    rows, cols = weight.shape
    return weight.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def _heads(name: str, shape: torch.Size, config: LlamaConfig) -> Optional[int]:
    """The heads whose rows a tensor of that shape holds if they are rotated (wq, wk), else None; None too for a
    tensor of the wrong shape, which the shape check of llama.load_pretrained then names."""
    heads = {"attention.wq.weight": config.n_heads, "attention.wk.weight": config.n_kv_heads}.get(
        name.split(".", 2)[-1] if name.startswith("layers.") else "")
    return heads if heads and tuple(shape) == (heads * config.head_dim, config.dim) else None


# ---------------------------------------------------------------------------------------------------------
# In

def is_hf_folder(path: str) -> bool:
    return os.path.isdir(path)


def default_tokenizer(folder: str) -> str:
    """The tokenizer that comes with a folder."""
    if not os.path.isfile(os.path.join(folder, CONFIG_FILE)):
        raise UsageError(f"--pretrained-model-path {folder}: a folder without {CONFIG_FILE}, so no Hugging Face model "
                         f"folder; pass one, or a llama2.c .pt/.bin file")
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    raise UsageError(f"--pretrained-model-path {folder}: the model folder has no tokenizer ({' or '.join(TOKENIZER_FILES)}); "
                     f"put the model's tokenizer there, or pass it with --tokenizer")


def read_config(folder: str) -> tuple[LlamaConfig, bool]:
    """(config, whether the output is tied to the embeddings) of a folder's config.json."""
    path = os.path.join(folder, CONFIG_FILE)
    if not os.path.isfile(path):
        raise UsageError(f"--pretrained-model-path {folder}: a folder without {CONFIG_FILE}; pass a Hugging Face model "
                         f"folder or a llama2.c .pt/.bin file")
    try:
        with open(path, encoding="utf-8") as f:
            hf = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"--pretrained-model-path {path}: not readable JSON ({e})") from e
    if not isinstance(hf, dict):
        raise UsageError(f"--pretrained-model-path {path}: not a JSON object")

    def refuse(field: str, value: Any, why: str) -> UsageError:
        return UsageError(f"--pretrained-model-path {path}: {field} = {json.dumps(value)}: {why}; this project "
                          f"cannot represent it, so it does not load the model")

    if hf.get("model_type") != "llama":
        raise refuse("model_type", hf.get("model_type"), "not a Llama")
    for field, allowed in (("hidden_act", ("silu", None)), ("attention_bias", (False, None)),
                           ("mlp_bias", (False, None))):
        if hf.get(field) not in allowed:
            raise refuse(field, hf[field], "only Llama-2's silu feed-forward without biases is built here")
    # transformers 5 takes rope_scaling over rope_parameters, and the theta from the dict it took, else from the top
    rope_field = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
    rope = hf.get(rope_field) or {}
    if not isinstance(rope, dict) or rope.get("rope_type", rope.get("type", "default")) != "default":
        raise refuse(rope_field, rope, "rotary scaling is not implemented")
    try:
        config = LlamaConfig(dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
                             n_heads=hf["num_attention_heads"],
                             n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
                             vocab_size=hf["vocab_size"], hidden_dim=hf["intermediate_size"],
                             max_seq_len=hf.get("max_position_embeddings", 2048),
                             norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                             rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))))
    except KeyError as e:
        raise UsageError(f"--pretrained-model-path {path}: no {e.args[0]}; a Llama config.json names it") from e
    except (TypeError, ValueError) as e:
        raise UsageError(f"--pretrained-model-path {path}: not a valid Llama config ({e})") from e
    if hf.get("head_dim") not in (None, config.head_dim):
        raise refuse("head_dim", hf["head_dim"], f"not hidden_size / num_attention_heads = {config.head_dim}")
    return config, bool(hf.get("tie_word_embeddings", False))


def weight_files(folder: str) -> list[str]:
    """The safetensors files of a folder: the single file, or the shards its index names."""
    single, index = os.path.join(folder, WEIGHTS_FILE), os.path.join(folder, INDEX_FILE)
    if os.path.isfile(single):
        return [single]
    if not os.path.isfile(index):
        raise UsageError(f"--pretrained-model-path {folder}: no {WEIGHTS_FILE} or {INDEX_FILE}; only safetensors "
                         f"weights are read (save them with save_pretrained(..., safe_serialization=True))")
    try:
        with open(index, encoding="utf-8") as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise UsageError(f"--pretrained-model-path {index}: not a safetensors index ({e})") from e
    paths = [os.path.join(folder, shard) for shard in shards]
    for path in paths:
        if not os.path.isfile(path):
            raise UsageError(f"--pretrained-model-path {folder}: {INDEX_FILE} names {os.path.basename(path)}, which "
                             f"is not there; download the model again")
    return paths


# What a safetensors header may hold before any of it is used: the dtypes a Llama checkpoint stores, and the size of a
# header worth reading (the format allows 100 MB).
_ITEM_SIZES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8}
_MAX_HEADER = 100_000_000


def check_safetensors(path: str) -> dict[str, tuple[str, list[int], int]]:
    """Each tensor's (dtype, shape, offset of its bytes in the file) from a safetensors file's header. Refuse, naming
    the file, one whose header does not describe its own bytes: a header longer than the file, a tensor whose offsets
    lie outside the data, overlap another's or disagree with its shape and dtype, or a dtype no Llama checkpoint
    stores; before anything is allocated for it."""
    def refuse(why: str) -> UsageError:
        return UsageError(f"--pretrained-model-path {path}: not a valid safetensors file ({why}); download it again")

    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise refuse("shorter than its 8-byte header length")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > min(size - 8, _MAX_HEADER):
            raise refuse(f"its header claims {header_len} bytes, the file has {size}")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, ValueError) as e:
            raise refuse(f"its header is not JSON: {e}") from e
    if not isinstance(header, dict):
        raise refuse("its header is not a JSON object")
    spans, data_size, layout = [], size - 8 - header_len, {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            count = math.prod(shape) if all(isinstance(d, int) and d >= 0 for d in shape) else -1
        except (TypeError, KeyError, ValueError) as e:
            raise refuse(f"tensor {name}'s entry is malformed ({e!r})") from e
        if dtype not in _ITEM_SIZES:
            raise refuse(f"tensor {name} is {dtype}; a Llama checkpoint stores {', '.join(_ITEM_SIZES)}")
        if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end <= data_size) \
                or count < 0 or end - begin != count * _ITEM_SIZES[dtype]:
            raise refuse(f"tensor {name}'s bytes {begin}..{end} are not its shape {shape} of {dtype} within the "
                         f"{data_size} bytes of data")
        spans.append((begin, end, name))
        layout[name] = (dtype, shape, 8 + header_len + begin)
    spans.sort()
    for (_, end, name), (begin, _, other) in zip(spans, spans[1:]):
        if begin < end:
            raise refuse(f"tensors {name} and {other} share bytes")
    return layout


_TORCH_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def mapped_tensor(path: str, dtype: str, shape: list[int], offset: int) -> torch.Tensor:
    """A tensor over its bytes in the file, mapped copy-on-write: reading it copies nothing (as transformers' loading
    does), a write changes only this process's copy, and its pages leave memory when it goes."""
    count = math.prod(shape)
    if count == 0:
        return torch.empty(shape, dtype=_TORCH_DTYPES[dtype])
    start = offset - offset % mmap.ALLOCATIONGRANULARITY
    with open(path, "rb") as f:
        pages = mmap.mmap(f.fileno(), offset - start + count * _ITEM_SIZES[dtype], offset=start,
                          access=mmap.ACCESS_COPY)
    return torch.frombuffer(pages, dtype=_TORCH_DTYPES[dtype], count=count, offset=offset - start).view(shape)


class SafetensorsWeights(Mapping):
    """A folder's weights under our names, each read from its file (memory-mapped) only when asked for, in its
    stored dtype and our rotary layout: a model built from it never holds a second copy of the weights. With tied
    embeddings, the one stored matrix answers to both names, as the model holds it."""

    def __init__(self, folder: str, config: LlamaConfig, tied: bool):
        self.config = config
        self.where: dict[str, tuple[str, str]] = {}  # our name -> (file, transformers' name)
        self.layout: dict[tuple[str, str], tuple[str, list[int], int]] = {}  # (file, name) -> (dtype, shape, offset)
        for path in weight_files(folder):
            for key, entry in check_safetensors(path).items():
                if key.endswith("rotary_emb.inv_freq"):  # older exports store the rotary table; it is recomputed
                    continue
                name = our_name(key)
                if name is None:
                    raise UsageError(f"--pretrained-model-path {path}: tensor {key} is not part of a "
                                     f"LlamaForCausalLM; pass the folder of a base model")
                self.where[name] = (path, key)
                self.layout[path, key] = entry
        if tied:
            for name, other in (("output.weight", "tok_embeddings.weight"), ("tok_embeddings.weight", "output.weight")):
                if name not in self.where and other in self.where:
                    self.where[name] = self.where[other]

    def __getitem__(self, name: str) -> torch.Tensor:
        shape = self.shape(name)
        if not shape:  # a scalar, which the shape check of llama.load_pretrained then names
            path, key = self.where[name]
            with _readable(path):
                return mapped_tensor(path, *self.layout[path, key])
        return self.rows(name, 0, shape[0])

    def shape(self, name: str) -> torch.Size:
        return torch.Size(self.layout[self.where[name]][1])

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows start:stop of a tensor, reading only those: of wq and wk, whose rows the file holds in another order
        within each head, the heads that hold them."""
        path, key = self.where[name]
        dtype, shape, offset = self.layout[path, key]
        heads = _heads(name, shape, self.config)
        per_head = shape[0] // heads if heads else 1
        first, last = start // per_head * per_head, -(-stop // per_head) * per_head
        with _readable(path):
            tensor = mapped_tensor(path, dtype, [last - first, *shape[1:]],
                                   offset + first * math.prod(shape[1:]) * _ITEM_SIZES[dtype])
        if heads:
            tensor = from_rotate_half(tensor, (last - first) // per_head)
        return tensor[start - first:stop - first]

    def __contains__(self, name: object) -> bool:  # without reading the tensor, as Mapping's own would
        return name in self.where

    def __iter__(self) -> Iterator[str]:
        return iter(self.where)

    def __len__(self) -> int:
        return len(self.where)


@contextmanager
def _readable(path: str) -> Iterator[None]:
    try:
        yield
    except (OSError, ValueError) as e:
        raise UsageError(f"--pretrained-model-path {path}: not a readable safetensors file ({e})") from e


def read_hf(folder: str) -> tuple[LlamaConfig, SafetensorsWeights, bool]:
    """(config, the weights under our names with our rotary layout, read when asked for, tied) of a folder."""
    config, tied = read_config(folder)
    weights = SafetensorsWeights(folder, config, tied)
    where = weights.where
    if tied and {"tok_embeddings.weight", "output.weight"} <= where.keys() \
            and where["tok_embeddings.weight"] != where["output.weight"] \
            and not torch.equal(weights["tok_embeddings.weight"], weights["output.weight"]):
        print(f"note: {folder}: tie_word_embeddings is true but the file holds a different lm_head; as transformers "
              f"does, both are kept, untied", file=sys.stderr)
        tied = False
    return config, weights, tied


def stored_dtype(folder: str) -> Optional[str]:
    """The dtype config.json says the weights are stored in, as --dtype names it (bf16, fp16, fp32), if it says
    (None too for a config that cannot be read: reading the model then says why)."""
    try:
        with open(os.path.join(folder, CONFIG_FILE), encoding="utf-8") as f:
            hf = json.load(f)
        return {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}.get(hf.get("dtype") or hf.get("torch_dtype"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError, TypeError):
        return None


# ---------------------------------------------------------------------------------------------------------
# Out

def hf_config(config: LlamaConfig, tied: bool, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """config.json's fields for a LlamaForCausalLM of this config, its weights stored in dtype."""
    return {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": config.dim,
            "num_hidden_layers": config.n_layers, "num_attention_heads": config.n_heads,
            "num_key_value_heads": config.n_kv_heads, "intermediate_size": config.hidden_dim,
            "vocab_size": config.vocab_size, "max_position_embeddings": config.max_seq_len,
            "rms_norm_eps": config.norm_eps, "rope_theta": config.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
            "tie_word_embeddings": tied, "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
            "head_dim": config.head_dim, "torch_dtype": str(dtype).removeprefix("torch.")}


def hf_weights(state_dict: dict[str, torch.Tensor], config: LlamaConfig, tied: bool) -> dict[str, torch.Tensor]:
    """A Llama's state dict under transformers' names and rotary layout (contiguous, one copy per tensor, in its own
    dtype: fp32, or bf16 for the export of a QLoRA run)."""
    out = {}
    for name, tensor in state_dict.items():
        if tied and name == "output.weight":
            continue  # transformers ties lm_head to embed_tokens itself
        heads = _heads(name, tensor.shape, config)
        out[hf_name(name)] = (to_rotate_half(tensor, heads) if heads else tensor).detach().contiguous()
    return out


def hf_tokenizer_config(pad_piece: str, max_length: int, bos: bool, eos: bool) -> dict[str, Any]:
    """tokenizer_config.json that makes transformers' tokenizer give our ids: <s> first and </s> last as we put them
    (a tokenizer.json's post-processor says the same), special tokens' text read as text, as sentencepiece reads it,
    and with truncation=True the sentence cut so that the ids, <s> and </s> included, are at most max_length."""
    return {"tokenizer_class": "LlamaTokenizer", "add_bos_token": bos, "add_eos_token": eos,
            "pad_token": pad_piece, "padding_side": "right", "truncation_side": "right",
            "model_max_length": max_length, "split_special_tokens": True}


def peft_adapter(trainable: dict[str, torch.Tensor], config: LlamaConfig, lora: dict[str, Any],
                 base: Optional[str]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(adapter_config.json, adapter tensors) of a LoRA classifier's trainable tensors ("llama." adapters and the
    head) as PEFT saves a LlamaForSequenceClassification's, or of a language model's adapters alone as it saves a
    LlamaForCausalLM's: lora_A/lora_B under transformers' module names (lora_B's rows of wq and wk in the rotate-half
    order, as their weights' rows), a head as the saved module `score`."""
    short = {ours.rsplit(".", 1)[-1]: theirs.rsplit(".", 1)[-1] for ours, theirs in _LAYER_NAMES.items()}  # wq: q_proj
    rotated = {"wq": config.n_heads, "wk": config.n_kv_heads}
    classifier = "classifier_head.weight" in trainable
    tensors = {"base_model.model.score.weight": trainable["classifier_head.weight"]} if classifier else {}
    for name, tensor in trainable.items():
        if name.startswith("llama."):
            module, param = name.removeprefix("llama.").rsplit(".", 1)  # layers.0.attention.wq, lora_A
            heads = rotated.get(module.rsplit(".", 1)[-1]) if param == "lora_B" else None
            hf_module = hf_name(f"{module}.weight").removesuffix(".weight")
            tensors[f"base_model.model.{hf_module}.{param}.weight"] = to_rotate_half(tensor, heads) if heads else tensor
    adapter_config = {"peft_type": "LORA", "task_type": "SEQ_CLS" if classifier else "CAUSAL_LM",
                      "base_model_name_or_path": base,
                      "r": lora["rank"], "lora_alpha": lora["alpha"], "lora_dropout": lora["dropout"],
                      "target_modules": sorted(short[target] for target in lora["targets"]),
                      "modules_to_save": ["score"] if classifier else None, "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
                      "use_dora": False, "init_lora_weights": True, "inference_mode": True}
    return adapter_config, {name: t.detach().float().contiguous() for name, t in tensors.items()}
