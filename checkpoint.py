"""What training leaves behind and reads back: the checkpoint at --filepath, which describes itself (task, base model,
tokenizer, labels or prompt template, LoRA settings, training flags, history) so that `--option classify` (or
generate, perplexity and export, of a language model) can rebuild it, and the training state at <filepath>.state for --resume; the record of a run that tells its files from
another run's.

Both files hold tensors and plain values only and load with weights_only=True: no code runs from a file.
"""
import dataclasses
import hashlib
import json
import os
import random
import shlex
from collections.abc import Mapping
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import nn

from causal_lm import build_language_model
from classifier import build_classifier
from llama import Llama, check_finite, load_pretrained, read_checkpoint, stored_weights
from lmdata import ALPACA_TEMPLATE
from lora import ALL_TARGETS, dequantize_base, merge_lora
from runtime import DTYPES, Runtime
from sharded import check_shards, fill_shards, is_sharded, load_shards, save_shards
from settings import CHECKPOINT_FORMAT, DEFAULT_MODEL, STATE_FORMAT, LoRASettings, Settings
from tokenizer import Tokenizer
from utils import UsageError, file_sha256, load_tensors, require_file, save_atomic, state_file_message, write_text_atomic



# What each file must hold before any of it is used: a field (dotted: within a field) and what its value must be.
def _kind(*kinds: type) -> Callable[[Any], bool]:
    return lambda value: isinstance(value, kinds) and not isinstance(value, bool)


def _positive_int(value: Any) -> bool:
    return _kind(int)(value) and value > 0


def _strings(allowed: Optional[tuple[str, ...]] = None) -> Callable[[Any], bool]:
    return lambda value: isinstance(value, list) and len(value) > 0 and all(
        isinstance(item, str) and (allowed is None or item in allowed) for item in value)


_MISSING = object()
_FILE = {"path": _kind(str), "relpath": _kind(str), "fingerprint": _kind(str)}
_FIELDS = {
    CHECKPOINT_FORMAT: {
        "training": _kind(dict), "training.--batch_size": _positive_int, "training.--dtype": lambda v: v in DTYPES,
        "trainable": lambda v: isinstance(v, dict) and all(isinstance(t, torch.Tensor) for t in v.values()),
        **{f"base_model.{key}": check for key, check in _FILE.items()}, "base_model.model_args": _kind(dict),
        **{f"tokenizer.{key}": check for key, check in _FILE.items()},
        "task": lambda v: v in ("classify", "lm"),  # checkpoints written before the language model: classify
        "label_names": lambda v: v is None or _strings()(v), "history": _kind(list),
        "hidden_dropout_prob": lambda v: v is None or _kind(float, int)(v) and 0 <= v < 1,
        "max_sentence_len": lambda v: v is None or _positive_int(v),
        "lora": lambda v: v is None or isinstance(v, dict),
        "lora.rank": _positive_int, "lora.alpha": lambda v: _kind(float, int)(v) and v > 0,
        "lora.dropout": lambda v: _kind(float, int)(v) and 0 <= v < 1, "lora.targets": _strings(ALL_TARGETS),
    },
    STATE_FORMAT: {"training": _kind(dict), "trainable": _kind(dict), "optimizer": _kind(dict), "scaler": _kind(dict),
                   "rng": _kind(list), "epoch": _kind(int), "best_dev_score": _kind(float), "history": _kind(list),
                   "best_epoch": lambda v: v is None or _kind(int)(v)},
}


def _damaged_fields(saved: dict, fields: dict[str, Callable[[Any], bool]]) -> list[str]:
    """The fields that are missing or not what they must be; a field within None (no LoRA) is not checked."""
    damaged = []
    for field, valid in fields.items():
        outer, _, inner = field.partition(".")
        value = saved.get(outer, _MISSING)
        if inner:
            if not isinstance(value, dict):
                if value is not None and outer not in damaged:
                    damaged.append(outer)
                continue
            value = value.get(inner, _MISSING)
        if value is _MISSING or not valid(value):
            damaged.append(field)
    return damaged


def weights_fingerprint(state_dict: Mapping[str, torch.Tensor]) -> str:
    """sha256 over the tensors themselves (names, shapes, bytes as float32), so that the same weights match
    whether they came from a .pt, a .bin or a Hugging Face folder, stored in fp32 or bf16."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().float().contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        digest.update(tensor.view(torch.uint8).numpy())
    return digest.hexdigest()


def differences(saved: dict[str, Any], current: dict[str, Any], may_differ: tuple[str, ...] = ()) -> list[str]:
    """The flags of two training records that differ, as "--lr 0.001 there, 0.002 here". Files compare by their
    fingerprint, not their path."""
    def identity(value: Any) -> Any:
        return value["fingerprint"] if isinstance(value, dict) else value

    def show(value: Any) -> str:
        return value["path"] if isinstance(value, dict) else str(value)

    return [f"{flag} {show(saved.get(flag))} there, {show(current.get(flag))} here"
            for flag in sorted(saved.keys() | current.keys())
            if flag not in may_differ and identity(saved.get(flag)) != identity(current.get(flag))]


def read_saved(path: str, flag: str, expected_format: str) -> dict:
    """A checkpoint or training state written by run_llama.py, checked for its format."""
    require_file(flag, path, "pass the checkpoint that --option finetune or lora wrote (its --filepath)"
                 if expected_format == CHECKPOINT_FORMAT else "pass the state that training wrote beside --filepath")
    saved = load_tensors(path, flag)
    found = saved.get("format") if isinstance(saved, dict) else None
    if found == STATE_FORMAT != expected_format:
        raise UsageError(state_file_message(flag, path))
    if found == expected_format:
        saved.setdefault("task", "classify")
        damaged = _damaged_fields(saved, _FIELDS[expected_format])
        if damaged:
            raise UsageError(f"{flag} {path}: damaged ({', '.join(damaged)} missing or of the wrong type); "
                             f"delete it and train again")
        if "shards" in saved:  # a sharded run's: its tensors' values are in that folder
            check_shards(path, saved, flag)
        return saved
    if isinstance(saved, dict) and "trainable" in saved and found is None:
        raise UsageError(f"{flag} {path}: written by an earlier minLlama2 that did not record the base model, "
                         f"tokenizer and labels; train it again to use it here")
    what = {CHECKPOINT_FORMAT: "a classifier checkpoint (--filepath)", STATE_FORMAT: "a training state (.state)"}
    raise UsageError(f"{flag} {path}: not {what[expected_format]} written by run_llama.py; pass the right file")


def load_trainable(model: nn.Module, tensors: Any, path: str, saved: Optional[dict] = None) -> None:
    """Load a checkpoint's trainable tensors, which must be exactly the model's trainable parameters: a key
    mismatch must not leave weights untrained without a word. saved: the file's whole record; where it names shards
    (a sharded run wrote it, its tensors on the meta device), a sharded model reads its own shards from them and
    another the whole tensors."""
    expected = {name for name, p in model.named_parameters() if p.requires_grad}
    if not isinstance(tensors, dict) or set(tensors) != expected:
        found = set(tensors) if isinstance(tensors, dict) else set()
        odd = sorted(found ^ expected)[:3]
        raise UsageError(f"{path}: its tensors are not this model's trainable parameters (differing: {odd}); "
                         f"was it written with other flags or another base model?")
    if saved and "shards" in saved:
        return load_shards(path, saved, {"model": {name: p.detach() for name, p in model.named_parameters()
                                                    if name in expected}}, "--filepath")
    try:
        model.load_state_dict(tensors, strict=False)
    except RuntimeError as e:
        raise UsageError(f"{path}: its tensors do not fit this model ({str(e).splitlines()[-1].strip()})") from e


def locate(stored: dict, checkpoint: str, flag: str, override: Optional[str]) -> str:
    """Where the base model or tokenizer of a checkpoint is: the path given by `flag`, else the stored path
    relative to the checkpoint's folder, else the stored absolute path."""
    if override:
        return override
    candidates = [os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(checkpoint)), stored["relpath"])),
                  stored["path"]]
    for candidate in candidates:
        if os.path.exists(candidate):  # a file, or a Hugging Face folder
            return candidate
    raise UsageError(f"--filepath {checkpoint} needs {stored['path']} (fingerprint {stored['fingerprint'][:12]}), "
                     f"which is not there; pass its location with {flag}")


def stored_file(path: str, fingerprint: str, checkpoint: str) -> dict:
    """How a checkpoint names a file it depends on."""
    folder = os.path.dirname(os.path.abspath(checkpoint))
    return {"path": os.path.abspath(path), "relpath": os.path.relpath(os.path.abspath(path), folder),
            "fingerprint": fingerprint}


# ---------------------------------------------------------------------------------------------------------
# Models: the base a run starts from, the classifier a run made

def base_fingerprint(model_path: str) -> str:
    """The fingerprint of a base model's weights as its file stores them (read once more, one tensor at a time),
    whatever precision a run holds them in."""
    return weights_fingerprint(stored_weights(model_path))


def load_base_model(model_path: str, tokenizer_path: str, device: torch.device, dtype: torch.dtype = torch.float32,
                    quantize: Optional[str] = None, on_meta: bool = False) -> tuple[Llama, Tokenizer]:
    """A llama2.c model or Hugging Face folder, its weights held in dtype (its layers' matrices in quantize, if
    given), and its tokenizer, checked to share one vocabulary. on_meta: the model is checked against the file but
    left on the meta device, for read_base_shards once it is sharded."""
    if model_path == DEFAULT_MODEL and not os.path.exists(model_path):
        raise UsageError(f"--pretrained-model-path {DEFAULT_MODEL}: no such file; run ./setup.sh to download it, or "
                         f"use the tiny model: --pretrained-model-path stories260K.pt --tokenizer tok512.model")
    llama = load_pretrained(model_path, dtype, quantize, on_meta)
    tokenizer = Tokenizer(tokenizer_path)
    tokenizer.check_vocab(llama.config.vocab_size, model_path)
    held = str(dtype).removeprefix("torch.")
    print(f"{'checked' if on_meta else 'loaded'} {model_path} ({llama.num_parameters() / 1e6:.2f}M parameters, "
          f"{f'layers in {quantize}, products and the rest in {held}' if quantize else held})"
          f"{'; each process reads its own rows of it once it is sharded, on' if on_meta else ' on'} {device}")
    return (llama if on_meta else llama.to(device)), tokenizer


def read_base_shards(llama: Llama, model_path: str) -> None:
    """Each process's own rows of the base model's weights, read from the file into a llama that load_base_model
    left on the meta device and FSDP has sharded (runtime.Runtime.parallel)."""
    weights = read_checkpoint(model_path)[1]

    def read_rows(name: str, start: int, stop: int) -> torch.Tensor:
        rows = weights.rows(name, start, stop)
        check_finite(model_path, name, rows)
        return rows

    fill_shards(llama, read_rows)


def load_trained(path: str, saved: dict, model_path: Optional[str], tokenizer_path: Optional[str],
                 device: torch.device, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, Tokenizer]:
    """The classifier or language model that the checkpoint at path (its contents: saved) describes, on the base
    model and tokenizer it was trained with (found beside it, or at model_path / tokenizer_path), adapters merged,
    held in dtype."""
    base = locate(saved["base_model"], path, "--pretrained-model-path", model_path)
    tokenizer_path = locate(saved["tokenizer"], path, "--tokenizer", tokenizer_path)
    require_file("--tokenizer", tokenizer_path, "pass the tokenizer the model was trained with")
    if file_sha256(tokenizer_path) != saved["tokenizer"]["fingerprint"]:
        raise UsageError(f"--tokenizer {tokenizer_path}: not the tokenizer --filepath {path} was trained "
                         f"with ({saved['tokenizer']['path']}); pass that one")
    if base_fingerprint(base) != saved["base_model"]["fingerprint"]:
        raise UsageError(f"--pretrained-model-path {base}: its weights are not those of "
                         f"{saved['base_model']['path']}, the base model --filepath {path} was trained "
                         f"from; pass that model")
    lora = LoRASettings.from_record(saved["lora"]) if saved["lora"] else None
    quantize = lora.quantize if lora else None
    llama, tokenizer = load_base_model(base, tokenizer_path, device, dtype, quantize)
    model = build_model(llama, saved["task"], saved["label_names"], saved["hidden_dropout_prob"], lora,
                        head_bias="classifier_head.bias" in saved["trainable"])
    load_trainable(model, saved["trainable"], path, saved)
    merge_lora(model)
    if quantize:  # the weights it trained above, as plain ones: what decoding and an export read
        dequantize_base(model, dtype)
    return model, tokenizer


def build_model(llama: Llama, task: str, label_names: Optional[list[str]], hidden_dropout_prob: Optional[float],
                lora: Optional[LoRASettings], head_bias: bool = False) -> nn.Module:
    """What finetune and lora train on llama: a classifier of label_names, or the language model itself."""
    if task == "lm":
        return build_language_model(llama, lora)
    return build_classifier(llama, len(label_names), hidden_dropout_prob, lora, head_bias)


# ---------------------------------------------------------------------------------------------------------
# A training run: its record, which files it may replace, what it saves

def describe_run(settings: Settings, llama: Llama, base_fingerprint: str, label_names: Optional[list[str]],
                 runtime: Runtime) -> dict[str, Any]:
    """Everything a checkpoint says about itself besides its tensors. Its "training" record holds the flags
    that shape the result: a resumed run must share them, and they tell one run's checkpoint from another's."""
    data, training, model = settings.data, settings.training, settings.model
    lm = training.task == "lm"
    files = {flag: {"path": os.path.abspath(path), "fingerprint": file_sha256(path)}
             for flag, path in (("--train", data.train), ("--dev", data.dev), ("--tokenizer", model.tokenizer))
             if path is not None}
    files["--pretrained-model-path"] = {"path": os.path.abspath(model.model), "fingerprint": base_fingerprint}
    lora = training.lora.as_record() if training.lora else None
    dropout = None if lm else training.hidden_dropout_prob
    record = {**files, "--option": training.option, "--label-names": label_names, "--epochs": training.epochs,
              "--lr": training.lr, "--batch_size": data.batch_size, "--seed": settings.seed, "--dtype": runtime.dtype,
              "--hidden_dropout_prob": dropout, "--max_sentence_len": data.max_sentence_len,
              "--text_field": data.fields.text, "--label_field": data.fields.label, "processes": runtime.world_size}
    record.update({f"--lora_{key}": value for key, value in (lora or {}).items()})
    record.update({"--fsdp": True} if training.fsdp else {})  # a sharded state resumes sharded
    # flags that records written before them do not hold, recorded where they differ from the old behaviour
    newer = {"--task": training.task, "--lr_scheduler": training.lr_scheduler, "--warmup_steps": training.warmup_steps,
             "--weight_decay": training.weight_decay, "--max_grad_norm": training.max_grad_norm,
             "--train_on_prompt": training.train_on_prompt, "--block_size": training.block_size}
    record.update({flag: value for flag, value in newer.items() if value not in (None, False, 0, "classify", "constant")})
    checkpoint = training.files.checkpoint
    return {"format": CHECKPOINT_FORMAT, "command": shlex.join(["python", "run_llama.py", *settings.command]),
            "option": training.option, "task": training.task, "label_names": label_names,
            "template": ALPACA_TEMPLATE if lm else None,
            "max_sentence_len": data.max_sentence_len, "hidden_dropout_prob": dropout,
            "lora": lora, "base_model": {**stored_file(model.model, base_fingerprint, checkpoint),
                                         "model_args": dataclasses.asdict(llama.config)},
            "tokenizer": stored_file(model.tokenizer, files["--tokenizer"]["fingerprint"], checkpoint),
            "training": record}


def write_run_record(settings: Settings, status: str, **details: Any) -> None:
    """<--output_dir>/run.json: the command that made the folder's files, and how far it got."""
    record = {"command": shlex.join(["python", "run_llama.py", *settings.command]), "cwd": os.getcwd(),
              "status": status, **details, "outputs": {flag: path for flag, path in settings.outputs}}
    write_text_atomic(settings.run_record, json.dumps(record, indent=2) + "\n")


def resume_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """What a resumed run may not change: every flag but --epochs; the number of processes may change where the
    global batch (--batch_size x processes) stays (the same batches, each process's share another)."""
    # a decaying schedule spans the run's steps: more epochs would change the steps already taken
    epochs_may_differ = ("--epochs",) if current.get("--lr_scheduler", "constant") == "constant" else ()
    changed = differences(saved, current, may_differ=(*epochs_may_differ, "--batch_size", "processes"))
    global_batch = [record.get("--batch_size", 0) * record.get("processes", 1) for record in (saved, current)]
    if global_batch[0] != global_batch[1]:
        changed.append(f"the global batch (--batch_size x processes) {global_batch[0]} there, {global_batch[1]} here")
    return changed


def check_run_files(settings: Settings, record: dict) -> Optional[dict]:
    """Before any training: the state to resume (with --resume), checked to come from this run; and a refusal
    to replace a checkpoint or state that another run made, unless --overwrite."""
    training = settings.training
    state_path = training.files.state
    state = None
    if training.resume and not os.path.exists(state_path):
        # a job that a scheduler starts again and again with --resume: its first start has nothing to resume
        print(f"note: --resume: no training state {state_path} yet, so training starts at epoch 0")
    elif training.resume:
        state = read_saved(state_path, "--resume", STATE_FORMAT)
        changed = resume_differences(state["training"], record)
        if changed:
            raise UsageError(f"--resume {state_path}: that run differs from this one ({'; '.join(changed)}); only "
                             f"--epochs (under a constant --lr_scheduler), and the processes with the same global "
                             f"batch, may change on resume: use "
                             f"its flags, or another --filepath")
    if training.overwrite:
        return state
    for path, saved_format in ((training.files.checkpoint, CHECKPOINT_FORMAT), (state_path, STATE_FORMAT)):
        if not os.path.exists(path) or (state is not None and path == state_path):
            continue
        try:
            saved = read_saved(path, "--filepath", saved_format)
        except UsageError:
            raise UsageError(f"--filepath {path}: exists and was not written by a run like this one; pass "
                             f"--overwrite to replace it, or choose another --filepath") from None
        changed = resume_differences(saved["training"], record) if training.resume else differences(saved["training"],
                                                                                                       record)
        if changed:
            hint = " --resume to continue it," if [c.split()[0] for c in changed] == ["--epochs"] else ""
            raise UsageError(f"--filepath {path}: made by another run ({'; '.join(changed)}); pass{hint} "
                             f"--overwrite to replace it, or choose another --filepath")
    return state


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint holds: the whole model for full fine-tuning, adapters + head for LoRA. The parameters
    themselves, not copies (a copy of every weight was 4.4 GB more at the save of a 1.1B full fine-tuning), except
    those that are views into a larger storage (a mapped file's, a fused matrix's): torch.save writes a view's
    whole storage."""
    return {name: own_storage(p.detach()) for name, p in model.named_parameters() if p.requires_grad}


def own_storage(tensor: torch.Tensor) -> torch.Tensor:
    """tensor, or a copy of it where its storage holds more than its elements."""
    if tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size():
        return tensor
    return tensor.clone()


def save_checkpoint(model: nn.Module, described: dict, history: list[dict], best_epoch: Optional[int],
                    path: str) -> None:
    """The trained model (its trainable tensors) after best_epoch (None: untrained, when no epoch ran). Of a sharded
    model, every process writes its shards and the file at path says what they hold (tensors on the meta device: the
    names, shapes and dtypes); the caller's rank 0 alone writes an unsharded model's."""
    record = {**described, "history": list(history), "best_epoch": best_epoch}
    if is_sharded(model):
        trained = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
        save_shards(path, {**record, "trainable": {name: torch.empty(t.shape, dtype=t.dtype, device="meta")
                                                   for name, t in trained.items()}},
                    {"model": trained}, "untrained" if best_epoch is None else str(best_epoch))
        if torch.distributed.get_rank() != 0:
            return
    else:
        save_atomic({**record, "trainable": trainable_state(model)}, path)
    if best_epoch is None:
        what = f"the untrained {'model' if described.get('task') == 'lm' else 'classifier'} (no epoch ran)"
    elif "--dev" in described["training"]:
        what = f"the best model so far (epoch {best_epoch})"
    else:
        what = f"the model of epoch {best_epoch} (no --dev to choose by)"
    print(f"saved {what} to {path}")


# ---------------------------------------------------------------------------------------------------------
# Random-number generators, as tensors and plain values

def rng_state(generator: torch.Generator, device: torch.device) -> dict:
    """This process's generators: Python's, NumPy's, torch's CPU (and CUDA) ones, and the batch order's."""
    kind, key, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [kind, torch.from_numpy(key.astype(np.int64)), pos, has_gauss, gauss],
             "torch": torch.get_rng_state(), "batches": generator.get_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, generator: torch.Generator, device: torch.device, path: str) -> None:
    try:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        kind, key, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, key.numpy().astype(np.uint32), pos, has_gauss, cached))
        torch.set_rng_state(state["torch"])
        generator.set_state(state["batches"])
        if device.type == "cuda" and "cuda" in state:
            torch.cuda.set_rng_state(state["cuda"], device)
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as e:
        raise UsageError(f"--resume {path}: its random-number states are damaged ({e}); delete it and train "
                         f"again without --resume") from e
