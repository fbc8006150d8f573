"""--option export: transformers loads what we trained and gives the same answers; the folder is written whole."""
import errno
import json
import os

import pytest
import torch

import export
from checkpoint import CHECKPOINT_FORMAT, load_trained, read_saved
from conftest import STORIES260K, TOK512, asset
from data import load_split, pad_batch
from evaluate import predict
from llama import load_pretrained
from runtime import Runtime
from test_cli import fails, read_lines, run
from tokenizer import Tokenizer
from bench.oracle import to_transformers
from utils import UsageError

SST_NAMES = ["awful", "bad", "average", "good", "excellent"]

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """stories260K, LoRA on a few SST sentences, exported; and stories260K alone exported with --lm-only."""
    folder = tmp_path_factory.mktemp("export")
    for name, n in (("train", 60), ("dev", 30)):
        with open(asset(f"data/sst-{name}.txt"), encoding="utf-8") as f:
            (folder / f"sst-{name}.txt").write_text("".join(f.readlines()[:n]), encoding="utf-8")
    run(["--option", "lora", "--pretrained-model-path", asset(STORIES260K), "--tokenizer", asset(TOK512),
         "--train", "sst-train.txt", "--dev", "sst-dev.txt", "--test", "sst-dev.txt",
         "--label-names", asset("data/sst-label-mapping.json"), "--epochs", "1", "--lr", "1e-2",
         "--filepath", "lora.pt"], folder)
    run(["--option", "export", "--filepath", "lora.pt", "--output", "classifier"], folder)
    run(["--option", "export", "--filepath", "lora.pt", "--adapter", "--output", "adapter"], folder)
    run(["--option", "export", "--lm-only", "--pretrained-model-path", asset(STORIES260K), "--tokenizer",
         asset(TOK512), "--output", "lm"], folder)
    saved = torch.load(folder / "lora.pt")  # the same run as if trained with --max_sentence_len 8
    saved["max_sentence_len"] = saved["training"]["--max_sentence_len"] = 8
    torch.save(saved, folder / "lora8.pt")
    run(["--option", "export", "--filepath", "lora8.pt", "--output", "classifier8"], folder)
    return folder


def classify_s_probabilities(exported, checkpoint, sentences):
    """(padded ids, label probabilities) of sentences as classify reads them with a checkpoint."""
    path = exported / "sentences.txt"
    path.write_text("".join(s + "\n" for s in sentences), encoding="utf-8")
    saved = read_saved(str(exported / checkpoint), "--filepath", CHECKPOINT_FORMAT)
    model, tokenizer = load_trained(str(exported / checkpoint), saved, None, None, torch.device("cpu"))
    split = load_split("input", str(path), SST_NAMES, tokenizer, 512, saved["max_sentence_len"], labels_optional=True)
    tokens, _ = pad_batch(split.token_ids, tokenizer.pad_id)
    return tokens, predict(model, split, 8, tokenizer.pad_id, Runtime(torch.device("cpu"), None)).exp()


TRICKY = ["A sentence that names <s>, </s> and <unk> as text.", "once upon a time " * 250,  # > the 512-token window
          "A moving, beautifully acted film.", "Dull."]


@pytest.mark.parametrize("checkpoint, folder", [("lora.pt", "classifier"), ("lora8.pt", "classifier8")])
def test_the_exported_tokenizer_cuts_and_reads_as_classify_does(exported, checkpoint, folder):
    """The window, --max_sentence_len and special tokens' text: transformers with truncation=True sees our ids."""
    tokens, ours = classify_s_probabilities(exported, checkpoint, TRICKY)
    hf = transformers.LlamaForSequenceClassification.from_pretrained(exported / folder).eval()
    batch = transformers.AutoTokenizer.from_pretrained(exported / folder)(TRICKY, truncation=True, padding=True,
                                                                          return_tensors="pt")
    assert torch.equal(batch["input_ids"], tokens)
    assert tokens.shape[1] == (512 if folder == "classifier" else 10)
    with torch.no_grad():
        torch.testing.assert_close(hf(**batch).logits.softmax(-1), ours, atol=1e-5, rtol=0)


def test_a_peft_adapter_on_the_exported_base_gives_classify_s_probabilities(exported):
    peft = pytest.importorskip("peft")
    tokens, ours = classify_s_probabilities(exported, "lora.pt", TRICKY)
    config = json.loads((exported / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] is None  # a llama2.c base: the folder is the user's own export
    base = transformers.LlamaForSequenceClassification.from_pretrained(exported / "lm", num_labels=5)
    model = peft.PeftModel.from_pretrained(base, exported / "adapter").eval()
    batch = transformers.AutoTokenizer.from_pretrained(exported / "adapter")(TRICKY, truncation=True, padding=True,
                                                                             return_tensors="pt")
    assert torch.equal(batch["input_ids"], tokens)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits.softmax(-1), ours, atol=1e-5, rtol=0)
    merged = transformers.LlamaForSequenceClassification.from_pretrained(exported / "classifier").eval()
    with torch.no_grad():  # the merged export and the adapter are one model
        torch.testing.assert_close(merged(**batch).logits, model(**batch).logits, atol=1e-5, rtol=0)


def test_an_exported_classifier_gives_classify_s_probabilities_in_transformers(exported):
    saved = read_saved(str(exported / "lora.pt"), "--filepath", CHECKPOINT_FORMAT)
    model, tokenizer = load_trained(str(exported / "lora.pt"), saved, None, None, torch.device("cpu"))
    split = load_split("input", str(exported / "sst-dev.txt"), SST_NAMES, tokenizer, 512, labels_optional=True)
    ours = predict(model, split, 8, tokenizer.pad_id, Runtime(torch.device("cpu"), None)).exp()

    hf = transformers.LlamaForSequenceClassification.from_pretrained(exported / "classifier").eval()
    assert hf.config.id2label == dict(enumerate(saved["label_names"]))
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(exported / "classifier")
    batch = hf_tokenizer(split.sentences, padding=True, return_tensors="pt")
    tokens, _ = pad_batch(split.token_ids, tokenizer.pad_id)
    assert torch.equal(batch["input_ids"], tokens)  # bos + sentence + eos, right-padded, as ours
    with torch.no_grad():
        theirs = hf(**batch).logits.softmax(-1)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
    written = [int(line.split(" ||| ")[0]) for line in read_lines(exported / "sst-test-lora-output.txt")]
    assert theirs.argmax(-1).tolist() == written


def test_lm_only_export_of_a_llama2c_model_gives_its_logits(exported):
    ours = load_pretrained(asset(STORIES260K)).eval()
    theirs = transformers.LlamaForCausalLM.from_pretrained(exported / "lm", attn_implementation="eager").eval()
    tokens = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = ours(tokens, all_logits=True)[0]
        exported_logits = theirs(tokens).logits
        assert torch.equal(exported_logits, to_transformers(ours)(tokens).logits)  # the very weights of the oracle
    # within 1e-5 of the logits' scale (about 20 here: fp32 sums in another order differ in their last bits)
    torch.testing.assert_close(exported_logits, logits, atol=1e-5 * logits.abs().max().item(), rtol=0)
    assert load_pretrained(str(exported / "lm")).state_dict().keys() == ours.state_dict().keys()


def test_export_replaces_only_its_own_folders(exported, tmp_path, capsys):
    common = ["--option", "export", "--filepath", str(exported / "lora.pt")]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    line = fails([*common, "--output", str(mine)], tmp_path, capsys)
    assert "--output" in line and "--overwrite" in line and (mine / "notes.txt").read_text() == "keep me"
    assert "is a file, so no folder" in fails([*common, "--output", str(mine / "notes.txt" / "dir")], tmp_path, capsys)
    assert "a file, not a folder" in fails([*common, "--output", str(exported / "lora.pt")], tmp_path, capsys)
    run([*common, "--output", str(tmp_path / "out")], tmp_path)
    run([*common, "--output", str(tmp_path / "out"), "--lm-only"], tmp_path)  # an export may replace an export
    assert json.loads((tmp_path / "out" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    run([*common, "--output", str(mine), "--overwrite"], tmp_path)
    assert not (mine / "notes.txt").exists()
    run([*common, "--output", str(tmp_path / "new" / "folders" / "out")], tmp_path)  # missing folders are made
    assert (tmp_path / "new" / "folders" / "out" / "config.json").is_file()
    assert sorted(os.listdir(tmp_path)) == ["mine", "new", "out"]  # no temporary folder, no lock file left

    line = fails([*common, "--output", "a", "--adapter", "--lm-only"], tmp_path, capsys)
    assert "--adapter and --lm-only" in line
    ckpt = torch.load(exported / "lora.pt")
    torch.save({**ckpt, "lora": None}, tmp_path / "full.pt")
    line = fails(["--option", "export", "--filepath", str(tmp_path / "full.pt"), "--output", "a", "--adapter"],
                 tmp_path, capsys)
    assert "not trained with --option lora" in line and "without --adapter" in line
    ckpt["trainable"]["classifier_head.bias"] = torch.zeros(5)  # a checkpoint from before the bias-free head
    torch.save(ckpt, tmp_path / "old.pt")
    line = fails(["--option", "export", "--filepath", str(tmp_path / "old.pt"), "--output", "x"], tmp_path, capsys)
    assert "bias" in line and "--lm-only" in line
    run(["--option", "classify", "--filepath", str(tmp_path / "old.pt"), "--input", str(exported / "sst-dev.txt"),
         "--output", "old.txt"], tmp_path)  # zero bias: classify still reads it, and predicts as before
    assert (tmp_path / "old.txt").read_bytes() == (exported / "sst-test-lora-output.txt").read_bytes()


def test_an_interrupted_export_leaves_the_folder_as_it_was(exported, tmp_path, monkeypatch):
    out = tmp_path / "out"
    llama = load_pretrained(asset(STORIES260K))
    export.write_folder(str(out), llama, Tokenizer(asset(TOK512)), {"test": 1}, overwrite=False)
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(export, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export.write_folder(str(out), llama, Tokenizer(asset(TOK512)), {"test": 2}, overwrite=False)
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before
    assert os.listdir(tmp_path) == ["out"]  # no temporary folder


@pytest.mark.parametrize("error", [errno.ENOSPC, errno.EFBIG])
def test_a_full_disk_during_an_export_is_one_line_and_leaves_the_folder_as_it_was(tmp_path, monkeypatch, error):
    out = tmp_path / "out"
    llama = load_pretrained(asset(STORIES260K))
    export.write_folder(str(out), llama, Tokenizer(asset(TOK512)), {"test": 1}, overwrite=False)
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}

    def full(*args, **kwargs):
        raise OSError(error, os.strerror(error))
    monkeypatch.setattr(export, "save_file", full)
    with pytest.raises(UsageError, match=f"--output {out}: could not write it \\({os.strerror(error)}\\)"):
        export.write_folder(str(out), llama, Tokenizer(asset(TOK512)), {"test": 2}, overwrite=False)
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before
    assert os.listdir(tmp_path) == ["out"]  # no temporary folder


def test_a_qlora_export_holds_its_dequantized_base_in_bf16_with_the_adapters_merged(exported, tmp_path, capsys):
    from safetensors.torch import load_file

    from hf import hf_weights
    from lora import is_adapter

    run(["--option", "lora", "--quantize", "nf4", "--pretrained-model-path", asset(STORIES260K), "--tokenizer",
         asset(TOK512), "--train", str(exported / "sst-train.txt"), "--dev", str(exported / "sst-dev.txt"),
         "--test", str(exported / "sst-dev.txt"), "--label-names", asset("data/sst-label-mapping.json"),
         "--epochs", "1", "--lr", "1e-2", "--filepath", "qlora.pt"], tmp_path)
    capsys.readouterr()
    run(["--option", "export", "--filepath", "qlora.pt", "--output", "classifier"], tmp_path)
    assert "the export holds that base dequantized, in bf16, with the adapters merged" in capsys.readouterr().out
    saved = read_saved(str(tmp_path / "qlora.pt"), "--filepath", CHECKPOINT_FORMAT)
    model, tokenizer = load_trained(str(tmp_path / "qlora.pt"), saved, None, None, torch.device("cpu"))
    llama = model.llama  # dequantized and merged in fp32
    merged = hf_weights({k: t for k, t in llama.state_dict().items() if not is_adapter(k)}, llama.config,
                        llama.tied_embeddings)
    written = load_file(tmp_path / "classifier" / "model.safetensors")
    assert merged.keys() - {"lm_head.weight"} == written.keys() - {"score.weight"}
    assert all(torch.equal(written[name], merged[name].to(torch.bfloat16)) for name in written
               if name != "score.weight")
    # transformers reads it as classify reads the checkpoint, up to the base's rounding to bf16
    split = load_split("input", str(exported / "sst-dev.txt"), SST_NAMES, tokenizer, 512, labels_optional=True)
    ours = predict(model, split, 8, tokenizer.pad_id, Runtime(torch.device("cpu"), None)).exp()
    hf = transformers.LlamaForSequenceClassification.from_pretrained(tmp_path / "classifier", dtype=torch.float32)
    batch = transformers.AutoTokenizer.from_pretrained(tmp_path / "classifier")(split.sentences, padding=True,
                                                                               return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(hf.eval()(**batch).logits.softmax(-1), ours, atol=0.02, rtol=0)
