import os
import random

import numpy as np
import pytest
import torch
from torch import nn

from checkpoint import (differences, load_trainable, resume_differences, rng_state, set_rng_state,
                        trainable_state, weights_fingerprint)
from conftest import STORIES260K, asset
from llama import load_pretrained
from test_cli import fails
from test_export import exported  # noqa: F401 (a fixture)
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


def test_the_saved_state_is_the_parameters_themselves_and_a_view_is_saved_alone(tmp_path):
    model = nn.Sequential(nn.Linear(64, 64, bias=False), nn.Linear(64, 64, bias=False), nn.Linear(64, 2))
    model[0].requires_grad_(False)
    fused = torch.randn(2, 64, 64)  # a view into a larger storage, as a mapped file's or a fused matrix's rows are
    model[1].weight = nn.Parameter(fused[1])
    state = trainable_state(model)
    assert list(state) == ["1.weight", "2.weight", "2.bias"]
    assert state["2.weight"].data_ptr() == model[2].weight.data_ptr()  # no copy of every weight at each save
    assert state["1.weight"].data_ptr() != fused.data_ptr() and torch.equal(state["1.weight"], fused[1])
    torch.save(state, tmp_path / "state.pt")
    assert os.path.getsize(tmp_path / "state.pt") < fused.numel() * 4  # not the whole storage of the view


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


def test_a_resumed_run_may_change_its_processes_only_with_the_global_batch():
    saved = {"--lr": 0.01, "--batch_size": 8, "processes": 2, "--epochs": 3}
    assert resume_differences(saved, {**saved, "--epochs": 5}) == []
    assert resume_differences(saved, {**saved, "--batch_size": 4, "processes": 4}) == []
    assert resume_differences(saved, {**saved, "--batch_size": 4}) == [
        "the global batch (--batch_size x processes) 16 there, 8 here"]
    assert resume_differences(saved, {**saved, "--lr": 0.02}) == ["--lr 0.01 there, 0.02 here"]


def test_random_states_survive_a_weights_only_round_trip(tmp_path):
    generator = torch.Generator().manual_seed(5)
    state = rng_state(generator, torch.device("cpu"))
    torch.save(state, tmp_path / "rng")
    expected = (random.random(), np.random.rand(), torch.rand(1), torch.rand(1, generator=generator))
    set_rng_state(torch.load(tmp_path / "rng", weights_only=True), generator, torch.device("cpu"), "x")
    assert (random.random(), np.random.rand(), torch.rand(1), torch.rand(1, generator=generator)) == expected
    with pytest.raises(UsageError, match="damaged"):
        set_rng_state({**state, "torch": torch.zeros(3)}, generator, torch.device("cpu"), "x")


def without(record: dict, field: str) -> dict:
    outer, _, inner = field.partition(".")
    if not inner:
        return {key: value for key, value in record.items() if key != field}
    return {**record, outer: {key: value for key, value in record[outer].items() if key != inner}}


def changed(record: dict, field: str, value) -> dict:
    outer, _, inner = field.partition(".")
    return {**record, outer: {**record[outer], inner: value}}


DAMAGES = [  # (how the record is damaged, the field the message must name)
    (lambda r: without(r, "lora"), "lora"), (lambda r: without(r, "base_model.relpath"), "base_model.relpath"),
    (lambda r: without(r, "max_sentence_len"), "max_sentence_len"),
    (lambda r: without(r, "training.--batch_size"), "training.--batch_size"),
    (lambda r: without(r, "training.--dtype"), "training.--dtype"),
    (lambda r: changed(r, "lora.rank", "4"), "lora.rank"), (lambda r: changed(r, "lora.targets", ["wz"]), "lora.targets"),
    (lambda r: changed(r, "tokenizer.fingerprint", None), "tokenizer.fingerprint"),
    (lambda r: {**r, "label_names": ["a", 3]}, "label_names"), (lambda r: {**r, "base_model": "x.pt"}, "base_model"),
]


@pytest.mark.parametrize("damage, field", DAMAGES, ids=[field for _, field in DAMAGES])
def test_a_damaged_record_is_one_line_naming_the_field_in_classify_and_export(exported, tmp_path, capsys, damage,
                                                                              field):
    torch.save(damage(torch.load(exported / "lora.pt")), tmp_path / "damaged.pt")
    for command in (["--option", "classify", "--input", str(exported / "sst-dev.txt")],
                    ["--option", "export", "--output", "out"], ["--option", "export", "--output", "out", "--adapter"]):
        line = fails([*command, "--filepath", str(tmp_path / "damaged.pt")], tmp_path, capsys)
        assert f"damaged ({field} missing or of the wrong type)" in line, line
    assert sorted(os.listdir(tmp_path)) == ["damaged.pt"]
