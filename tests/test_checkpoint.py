import random

import numpy as np
import pytest
import torch
from torch import nn

from checkpoint import differences, load_trainable, rng_state, set_rng_state, weights_fingerprint
from conftest import STORIES260K, asset
from llama import load_pretrained
from utils import UsageError


def test_load_trainable_refuses_any_key_mismatch():
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2))
    model[0].requires_grad_(False)
    good = {"1.weight": torch.ones(2, 2), "1.bias": torch.zeros(2)}
    load_trainable(model, good, "ckpt.pt")
    assert torch.equal(model[1].weight, torch.ones(2, 2))
    for bad in ({"1.weight": torch.ones(2, 2)}, {**good, "2.weight": torch.ones(1)}, {"0.weight": torch.ones(2, 3)}):
        with pytest.raises(UsageError, match="ckpt.pt"):
            load_trainable(model, bad, "ckpt.pt")
    with pytest.raises(UsageError, match="do not fit"):
        load_trainable(model, {"1.weight": torch.ones(3, 3), "1.bias": torch.zeros(2)}, "ckpt.pt")


def test_the_fingerprint_is_of_the_weights_not_the_file():
    pt, bin_ = load_pretrained(asset(STORIES260K)), load_pretrained(asset("stories260K.bin"))
    assert weights_fingerprint(pt.state_dict()) == weights_fingerprint(bin_.state_dict())
    with torch.no_grad():
        pt.norm.weight[0] += 1e-6
    assert weights_fingerprint(pt.state_dict()) != weights_fingerprint(bin_.state_dict())


def test_differences_name_the_flags_and_compare_files_by_content():
    saved = {"--lr": 0.001, "--train": {"path": "/a/sst-train.txt", "fingerprint": "f1"}, "--epochs": 3}
    same_file_elsewhere = {"--lr": 0.001, "--train": {"path": "/b/copy.txt", "fingerprint": "f1"}, "--epochs": 5}
    assert differences(saved, same_file_elsewhere, may_differ=("--epochs",)) == []
    other = {"--lr": 0.002, "--train": {"path": "/a/cfimdb-train.txt", "fingerprint": "f2"}, "--epochs": 3}
    assert differences(saved, other) == ["--lr 0.001 there, 0.002 here",
                                         "--train /a/sst-train.txt there, /a/cfimdb-train.txt here"]


def test_random_states_survive_a_weights_only_round_trip(tmp_path):
    generator = torch.Generator().manual_seed(5)
    state = rng_state(generator, torch.device("cpu"))
    torch.save(state, tmp_path / "rng")
    expected = (random.random(), np.random.rand(), torch.rand(1), torch.rand(1, generator=generator))
    set_rng_state(torch.load(tmp_path / "rng", weights_only=True), generator, torch.device("cpu"), "x")
    assert (random.random(), np.random.rand(), torch.rand(1), torch.rand(1, generator=generator)) == expected
    with pytest.raises(UsageError, match="damaged"):
        set_rng_state({**state, "torch": torch.zeros(3)}, generator, torch.device("cpu"), "x")
