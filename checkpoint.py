"""What training leaves behind and reads back: the classifier checkpoint at --filepath, which describes itself
(base model, tokenizer, labels, LoRA settings, training flags, history) so that `--option classify` can rebuild
it, and the training state at <filepath>.state for --resume.

Both hold tensors and plain values only and load with weights_only=True: no code runs from a file.
"""
import hashlib
import os
import random
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from utils import UsageError, load_tensors

CHECKPOINT_FORMAT = "minllama2-classifier"
STATE_FORMAT = "minllama2-training-state"


# What each file must hold, and of which type, before any of it is used.
_FIELDS = {
    CHECKPOINT_FORMAT: {"training": dict, "trainable": dict, "base_model": dict, "tokenizer": dict,
                        "label_names": list, "history": list, "hidden_dropout_prob": float},
    STATE_FORMAT: {"training": dict, "trainable": dict, "optimizer": dict, "scaler": dict, "rng": list,
                   "epoch": int, "best_dev_acc": float, "history": list},
}


def weights_fingerprint(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 over the tensors themselves (names, shapes, dtypes, bytes), so that the same weights match
    whether they came from a .pt or a .bin file."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
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
    saved = load_tensors(path, flag)
    found = saved.get("format") if isinstance(saved, dict) else None
    if found == expected_format:
        damaged = [key for key, kind in _FIELDS[expected_format].items() if not isinstance(saved.get(key), kind)]
        if damaged:
            raise UsageError(f"{flag} {path}: damaged ({', '.join(damaged)} missing or of the wrong type); "
                             f"delete it and train again")
        return saved
    if isinstance(saved, dict) and "trainable" in saved and found is None:
        raise UsageError(f"{flag} {path}: written by an earlier minLlama2 that did not record the base model, "
                         f"tokenizer and labels; train it again to use it here")
    what = {CHECKPOINT_FORMAT: "a classifier checkpoint (--filepath)", STATE_FORMAT: "a training state (.state)"}
    raise UsageError(f"{flag} {path}: not {what[expected_format]} written by run_llama.py; pass the right file")


def load_trainable(model: nn.Module, tensors: Any, path: str) -> None:
    """Load a checkpoint's trainable tensors, which must be exactly the model's trainable parameters: a key
    mismatch must not leave weights untrained without a word."""
    expected = {name for name, p in model.named_parameters() if p.requires_grad}
    if not isinstance(tensors, dict) or set(tensors) != expected:
        found = set(tensors) if isinstance(tensors, dict) else set()
        odd = sorted(found ^ expected)[:3]
        raise UsageError(f"{path}: its tensors are not this model's trainable parameters (differing: {odd}); "
                         f"was it written with other flags or another base model?")
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
        if os.path.isfile(candidate):
            return candidate
    raise UsageError(f"--filepath {checkpoint} needs {stored['path']} (fingerprint {stored['fingerprint'][:12]}), "
                     f"which is not there; pass its location with {flag}")


def stored_file(path: str, fingerprint: str, checkpoint: str) -> dict:
    """How a checkpoint names a file it depends on."""
    folder = os.path.dirname(os.path.abspath(checkpoint))
    return {"path": os.path.abspath(path), "relpath": os.path.relpath(os.path.abspath(path), folder),
            "fingerprint": fingerprint}


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
