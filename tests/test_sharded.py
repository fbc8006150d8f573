"""sharded.py: under torchrun --fsdp, a process reads only its own rows of the base model's weights, into shards
equal to those rows of the whole model; a save of shards that fails leaves the previous one. (Training and resuming
sharded, and one process reading a sharded checkpoint whole: test_ddp.py.)"""
import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import hf
from conftest import ROOT, STORIES260K, TOK512, asset, file_size_limit
from sharded import save_sharded_state
from utils import UsageError

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """transformers' own tiny model: grouped-query attention (wq and wk stored in the rotate-half order), untied."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      tie_word_embeddings=False)
    folder = tmp_path_factory.mktemp("hf") / "model"
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def test_rows_of_a_stored_tensor_are_those_of_the_whole_and_map_only_their_heads(hf_folder, monkeypatch):
    """Row ranges that cut through a head: wq and wk map the heads that hold the rows, every other tensor its rows."""
    mapped = []
    original = hf.mapped_tensor
    monkeypatch.setattr(hf, "mapped_tensor", lambda *args: mapped.append(args[2][0]) or original(*args))
    config, weights, _ = hf.read_hf(str(hf_folder))
    for name in weights:
        whole = weights[name]
        for start, stop in ((0, 3), (5, 13), (9, 16), (len(whole) - 1, len(whole))):
            mapped.clear()
            assert torch.equal(weights.rows(name, start, stop), whole[start:stop]), (name, start, stop)
            per_head = config.head_dim if name.endswith(("wq.weight", "wk.weight")) else 1
            assert mapped == [-(-stop // per_head) * per_head - start // per_head * per_head], (name, start, stop)


# Each process loads the base model sharded as `--option finetune --fsdp` does, counting the bytes of the file it
# maps, and compares its shards with the rows it holds of the whole model (loaded afterwards, unsharded).
SHARDED_LOAD = """
import json, sys
sys.path.insert(0, {root!r})
import torch
import hf
from checkpoint import build_model, load_base_model, read_base_shards
from llama import load_pretrained
from runtime import Runtime
from sharded import own_rows

torch.distributed.init_process_group("gloo")
rank, mapped, original = torch.distributed.get_rank(), [], hf.mapped_tensor
hf.mapped_tensor = lambda *args: mapped.append(original(*args).nbytes) or original(*args)
base, tokenizer = sys.argv[1:3]
llama, _ = load_base_model(base, tokenizer, torch.device("cpu"), on_meta=True)
read_before_sharding = sum(mapped)
model = build_model(llama, "classify", ["negative", "positive"], 0.0, None)
Runtime(torch.device("cpu"), None, rank, 2, shard=True).parallel(model, llama.layers)
read_base_shards(llama, base)
report = {{"read_before_sharding": read_before_sharding, "read": sum(mapped), "tied": llama.tied_embeddings,
          "rows": {{}}, "differing": []}}
whole = load_pretrained(base).state_dict()
for name, parameter in llama.named_parameters():
    start, stop = own_rows(parameter)
    report["rows"][name] = [start, stop]
    if not torch.equal(parameter.to_local(), whole[name][start:stop]):
        report["differing"].append(name)
with open(f"report-{{rank}}.json", "w") as f:
    json.dump(report, f)
"""


@pytest.mark.parametrize("base", ["hf", "llama2c"])
def test_each_process_reads_only_its_own_rows_of_the_base_into_its_shards(hf_folder, tmp_path, base):
    path = str(hf_folder) if base == "hf" else asset(STORIES260K)
    driver = tmp_path / "driver.py"
    driver.write_text(SHARDED_LOAD.format(root=ROOT))
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(driver), path, asset(TOK512)], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    reports = [json.loads((tmp_path / f"report-{rank}.json").read_text()) for rank in range(2)]
    for report in reports:
        assert report["differing"] == [] and report["read_before_sharding"] == 0
        assert report["tied"] == (base == "llama2c")  # stories260K's embeddings and output stay one parameter
    # the two processes' rows of each tensor are its halves
    for name, (start, stop) in reports[0]["rows"].items():
        assert start == 0 and reports[1]["rows"][name][0] == stop and stop >= reports[1]["rows"][name][1] - stop
    if base == "hf":  # the folder's tensors are read once between the two, half by each (its sizes divide evenly)
        stored = sum(t.nbytes for t in hf.read_hf(path)[1].values())
        assert [report["read"] for report in reports] == [stored // 2, stored // 2]


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_a_sharded_state_that_cannot_be_written_is_one_line_and_leaves_the_previous_one(tmp_path, monkeypatch):
    """torch.distributed.checkpoint's save on a full disk: its CheckpointException becomes one line, the partial
    shards go, and the previous epoch's record and shards stay as they were."""
    monkeypatch.chdir(tmp_path)
    model = nn.Linear(64, 64)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 64)).sum().backward()
    optimizer.step()
    save_sharded_state("model.pt.state", {"epoch": 0}, model, optimizer)
    before = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with file_size_limit(4096), pytest.raises(UsageError, match="could not write model.pt.state.shards-1: File too large"):
        save_sharded_state("model.pt.state", {"epoch": 1}, model, optimizer)
    assert {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
