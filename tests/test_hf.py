"""Hugging Face folders in, against transformers' own tiny models (export: test_export.py)."""
import json
import os
import shutil
import subprocess
import struct
import sys

import pytest
import torch

import flags
from conftest import ROOT, TOK512, asset, save_tokenizer_json
from checkpoint import CHECKPOINT_FORMAT, load_trained, read_saved
from data import load_split, pad_batch
from evaluate import predict
from hf import default_tokenizer, read_hf, stored_dtype
from decoding import prepare_for_decoding
from llama import load_pretrained
from runtime import Runtime
from tokenizer import Tokenizer
from test_cli import read_lines, run, sst_subset  # noqa: F401 (a fixture)
from utils import UsageError

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory):
    """transformers' own tiny LlamaForCausalLM (grouped-query attention, untied output, rope_theta and
    rms_norm_eps not llama2.c's, tok512's vocabulary), saved as one file and as shards."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
                                      max_position_embeddings=128, tie_word_embeddings=False,
                                      rope_parameters={"rope_type": "default", "rope_theta": 5000.0})
    model = transformers.LlamaForCausalLM(config).eval()
    root = tmp_path_factory.mktemp("hf")
    model.save_pretrained(root / "single")
    model.save_pretrained(root / "sharded", max_shard_size="20KB")
    assert (root / "sharded" / "model.safetensors.index.json").exists()
    for folder in ("single", "sharded"):
        shutil.copyfile(asset(TOK512), root / folder / "tokenizer.model")
    return model, root


@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_a_transformers_folder_gives_transformers_logits_and_greedy_tokens(hf_folders, layout):
    theirs, root = hf_folders
    ours = load_pretrained(str(root / layout)).eval()
    assert ours.config.rope_theta == 5000.0 and ours.config.norm_eps == 1e-6 and not ours.tied_embeddings
    tokens = torch.randint(0, 512, (2, 23), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens, all_logits=True)[0], theirs(tokens).logits, atol=1e-5, rtol=1e-5)
        expected = theirs.generate(tokens[:1], max_new_tokens=20, do_sample=False, min_new_tokens=20,
                                   pad_token_id=0, eos_token_id=None)
    assert ours.generate(tokens[:1], 20, temperature=0.0).tolist() == expected.tolist()


def edited_copy(root, tmp_path, **changes):
    folder = tmp_path / "edited"
    shutil.copytree(root / "single", folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("field, value", [
    ("model_type", "mistral"), ("hidden_act", "gelu"), ("attention_bias", True), ("mlp_bias", True),
    ("rope_parameters", {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}), ("head_dim", 16),
])
def test_what_this_model_cannot_represent_is_refused_naming_the_field(hf_folders, tmp_path, field, value):
    folder = edited_copy(hf_folders[1], tmp_path, **{field: value})
    with pytest.raises(UsageError, match=f"config.json: {field} = "):
        load_pretrained(str(folder))


def logits_of_both(folder):
    """Our logits and transformers' on the same folder, read as each reads it."""
    tokens = torch.randint(0, 512, (1, 40), generator=torch.Generator().manual_seed(2))
    theirs = transformers.LlamaForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    with torch.no_grad():
        return load_pretrained(str(folder)).eval()(tokens, all_logits=True)[0], theirs(tokens).logits


@pytest.mark.parametrize("changes, theta", [
    # rope_scaling, when given, is the dict transformers reads, and its theta comes from it or from the top level
    (dict(rope_scaling={"rope_type": "default"}, rope_parameters={"rope_type": "default", "rope_theta": 100.0}),
     10000.0),
    (dict(rope_scaling={"rope_type": "default", "rope_theta": 300.0},
          rope_parameters={"rope_type": "default", "rope_theta": 100.0}, rope_theta=50.0), 300.0),
    (dict(rope_scaling={"type": "default"}, rope_theta=50.0), 50.0),
    (dict(rope_scaling=None, rope_parameters={"rope_type": "default", "rope_theta": 100.0}, rope_theta=50.0), 100.0),
    (dict(rope_parameters={"rope_type": "default"}, rope_theta=700.0), 700.0),
])
def test_rope_fields_are_read_as_transformers_reads_them(hf_folders, tmp_path, changes, theta):
    folder = edited_copy(hf_folders[1], tmp_path, **changes)
    assert read_hf(str(folder))[0].rope_theta == theta
    ours, theirs = logits_of_both(folder)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_rope_scaling_beside_default_rope_parameters_is_refused(hf_folders, tmp_path):
    """The usual context-extension edit: transformers would run scaled rope, which this model cannot."""
    folder = edited_copy(hf_folders[1], tmp_path, rope_scaling={"rope_type": "linear", "factor": 4.0})
    with pytest.raises(UsageError, match="config.json: rope_scaling = .*linear"):
        load_pretrained(str(folder))


def test_tied_embeddings_are_kept_apart_when_the_file_holds_a_different_lm_head(hf_folders, tmp_path, capsys):
    folder = edited_copy(hf_folders[1], tmp_path, tie_word_embeddings=True)
    assert not load_pretrained(str(folder)).tied_embeddings
    assert "both are kept, untied" in capsys.readouterr().err
    ours, theirs = logits_of_both(folder)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    from safetensors.torch import load_file, save_file
    tensors = load_file(folder / "model.safetensors")
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()  # the same values: tied, as there
    save_file(tensors, folder / "model.safetensors")
    ours = load_pretrained(str(folder))
    assert ours.tied_embeddings and ours.output.weight is ours.tok_embeddings.weight


def test_old_style_rope_scaling_is_refused_and_top_level_rope_theta_honoured(hf_folders, tmp_path):
    folder = edited_copy(hf_folders[1], tmp_path, rope_parameters=None, rope_theta=500.0, rope_scaling=None)
    assert read_hf(str(folder))[0].rope_theta == 500.0
    folder = edited_copy(hf_folders[1], tmp_path / "b", rope_parameters=None, rope_scaling={"type": "dynamic"})
    with pytest.raises(UsageError, match="rope_scaling = "):
        load_pretrained(str(folder))


def test_other_weights_and_tokenizers_are_refused(hf_folders, tmp_path):
    folder = edited_copy(hf_folders[1], tmp_path)
    os.rename(folder / "model.safetensors", folder / "pytorch_model.bin")
    with pytest.raises(UsageError, match="only safetensors weights"):
        load_pretrained(str(folder))
    from safetensors.torch import load_file, save_file
    tensors = load_file(hf_folders[1] / "single" / "model.safetensors")
    tensors["model.layers.1.self_attn.q_proj.weight"] = torch.zeros(31, 32)
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(UsageError, match=r"layers.1.attention.wq.weight has shape \(31, 32\)"):
        load_pretrained(str(folder))
    save_file({"score.weight": torch.zeros(2, 32)}, folder / "model.safetensors")
    with pytest.raises(UsageError, match="tensor score.weight is not part of a LlamaForCausalLM"):
        load_pretrained(str(folder))
    os.remove(folder / "tokenizer.model")
    with pytest.raises(UsageError, match="has no tokenizer \\(tokenizer.model or tokenizer.json\\); .* --tokenizer"):
        default_tokenizer(str(folder))
    (folder / "tokenizer.json").write_text("{}")
    with pytest.raises(UsageError, match="tokenizer.json: not a readable tokenizer.json"):
        Tokenizer(default_tokenizer(str(folder)))


def test_every_option_takes_a_folder_with_its_own_tokenizer(hf_folders, tmp_path, sst_subset, capsys):  # noqa: F811
    folder = str(hf_folders[1] / "sharded")
    run(["--option", "generate", "--pretrained-model-path", folder, "--max_new_tokens", "5"], tmp_path)
    assert read_lines(tmp_path / "generated-sentence-temp-0.txt")[0].startswith(flags.ASSIGNMENT_PREFIX)
    run(["--option", "prompt", "--pretrained-model-path", folder, *sst_subset], tmp_path)
    run(["--option", "lora", "--pretrained-model-path", folder, *sst_subset, "--epochs", "1", "--lr", "1e-2",
         "--filepath", "lora.pt"], tmp_path)
    run(["--option", "classify", "--filepath", "lora.pt", "--input", sst_subset[3], "--output", "again.txt"], tmp_path)
    assert (tmp_path / "again.txt").read_bytes() == (tmp_path / "sst-dev-lora-output.txt").read_bytes()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_loading_a_folder_holds_the_weights_once_in_the_run_s_precision(tmp_path, dtype):
    """The tensors read become the parameters, each converted on its own: peak memory grows by the weights in the
    run's precision and some change, not by twice the weights as when they were copied into new parameters."""
    from safetensors.torch import save_file

    from config import LlamaConfig
    from hf import hf_config, hf_weights
    from llama import Llama

    config = LlamaConfig(dim=512, n_layers=8, n_heads=8, vocab_size=32000, max_seq_len=256)  # 300 MB in fp32
    model = Llama(config, tied_embeddings=False)
    weights = {name: t.to(getattr(torch, dtype)) for name, t in hf_weights(model.state_dict(), config, False).items()}
    save_file(weights, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({**hf_config(config, tied=False), "dtype": dtype}))
    del model, weights
    # VmHWM: this process's peak resident memory (ru_maxrss would report pytest's, inherited through fork)
    script = ("import sys, torch; from llama import load_pretrained; "
              "peak = lambda: int(open('/proc/self/status').read().split('VmHWM:')[1].split()[0]) * 1024; "
              "before = peak(); model = load_pretrained(sys.argv[1], getattr(torch, sys.argv[2])); "
              "sum(p.sum() for p in model.parameters()); "  # every weight read once: all of it is in memory
              "print((peak() - before) / sum(p.numel() * p.element_size() for p in model.parameters()))")
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path), dtype], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert float(result.stdout) < 2.0, result.stdout  # 1.4 in fp32, 1.7-1.8 in bf16; copying into new ones: 2.4


def test_a_folder_with_only_tokenizer_json_runs_and_exports_it(hf_folders, tmp_path):
    """As transformers 5 saves a folder: generate gives the sentencepiece folder's text, and an export carries
    tokenizer.json on, which transformers reads back to our ids."""
    root = hf_folders[1]
    folder = tmp_path / "json"
    shutil.copytree(root / "single", folder)
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer",
                                                              "add_bos_token": True}))
    transformers.AutoTokenizer.from_pretrained(folder).save_pretrained(folder)
    os.remove(folder / "tokenizer.model")
    for name, path in (("json", folder), ("single", root / "single")):
        run(["--option", "generate", "--pretrained-model-path", str(path), "--max_new_tokens", "8",
             "--generated_sentence_low_temp_out", f"{name}.txt", "--temperature", "0"], tmp_path)
    assert (tmp_path / "json.txt").read_text() == (tmp_path / "single.txt").read_text()
    run(["--option", "export", "--lm-only", "--pretrained-model-path", str(folder), "--output", "out"], tmp_path)
    assert not (tmp_path / "out" / "tokenizer.model").exists()
    text = "Once upon a time, <s> was text."
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")(text)["input_ids"]
    assert theirs == Tokenizer(str(tmp_path / "out" / "tokenizer.json")).encode(text, bos=True, eos=False)


def json_folder(root, folder, single: str):
    """hf_folders' model with only the tokenizer.json that transformers 5 saves, its template put to `single`."""
    shutil.copytree(root / "single", folder)
    os.remove(folder / "tokenizer.model")
    save_tokenizer_json(asset(TOK512), folder, single)
    return folder


@pytest.mark.parametrize("single", ["$A", "<s> $A </s>"])
def test_the_special_tokens_around_a_text_follow_the_tokenizer_json_in_every_option(hf_folders, tmp_path, single,
                                                                                   sst_subset):  # noqa: F811
    """generate, perplexity, training and classify read a text as transformers' tokenizer(text) does, and an
    exported classifier's tokenizer gives classify's ids (its </s> last) whatever the template."""
    model, root = hf_folders
    folder = json_folder(root, tmp_path / "json", single)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    prompt = "Once upon a time, there was a little girl"
    (tmp_path / "prompts.jsonl").write_text(json.dumps({"prompt": prompt}) + "\n")
    (tmp_path / "story.txt").write_text(prompt + ". She liked to play.", encoding="utf-8")
    common = ["--pretrained-model-path", str(folder)]
    run(["--option", "generate", *common, "--input", "prompts.jsonl", "--output", "out.jsonl", "--max_new_tokens",
         "8", "--ignore_eos"], tmp_path)
    run(["--option", "perplexity", *common, "--input", "story.txt", "--output", "ppl.json"], tmp_path)
    ids = hf_tokenizer(prompt, return_tensors="pt").input_ids
    assert ids[0, :1].tolist() != [1] if single == "$A" else ids[0, -1].item() == 2
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
        story = hf_tokenizer((tmp_path / "story.txt").read_text(), return_tensors="pt").input_ids
        loss = model(story, labels=story).loss.item()
    ours = json.loads((tmp_path / "out.jsonl").read_text())["completion"]
    assert ours == hf_tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert json.loads((tmp_path / "ppl.json").read_text())["loss"] == pytest.approx(loss, rel=1e-5)

    run(["--option", "finetune", *common, *sst_subset, "--epochs", "1", "--lr", "1e-3", "--filepath", "ft.pt"],
        tmp_path)
    run(["--option", "export", "--filepath", "ft.pt", "--output", "classifier"], tmp_path)
    saved = read_saved(str(tmp_path / "ft.pt"), "--filepath", CHECKPOINT_FORMAT)
    llama, tokenizer = load_trained(str(tmp_path / "ft.pt"), saved, None, None, torch.device("cpu"))
    split = load_split("dev", sst_subset[3], saved["label_names"], tokenizer, llama.llama.config.max_seq_len)
    ours = predict(llama, split, 8, tokenizer.pad_id, Runtime(torch.device("cpu"), None)).exp()
    batch = transformers.AutoTokenizer.from_pretrained(tmp_path / "classifier")(
        split.sentences, truncation=True, padding=True, return_tensors="pt")
    assert torch.equal(batch["input_ids"], pad_batch(split.token_ids, tokenizer.pad_id)[0])
    assert (batch["input_ids"][:, 0] == 1).all() == single.startswith("<s>")
    classifier = transformers.LlamaForSequenceClassification.from_pretrained(tmp_path / "classifier").eval()
    with torch.no_grad():
        torch.testing.assert_close(classifier(**batch).logits.softmax(-1), ours, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def bf16_folder(hf_folders, tmp_path_factory):
    """transformers' tiny model saved in bf16, as real checkpoints are: its config says so."""
    model, root = hf_folders
    folder = tmp_path_factory.mktemp("bf16")
    theirs = transformers.LlamaForCausalLM.from_pretrained(root / "single", dtype=torch.bfloat16).eval()
    theirs.save_pretrained(folder)
    shutil.copyfile(root / "single" / "tokenizer.model", folder / "tokenizer.model")
    assert stored_dtype(str(folder)) == "bf16"
    return theirs, folder


def test_a_bf16_folder_held_in_bf16_gives_transformers_bf16_logits_and_greedy_tokens(bf16_folder):
    theirs, folder = bf16_folder
    ours = load_pretrained(str(folder), torch.bfloat16).eval()
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    tokens = torch.randint(0, 512, (2, 23), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = ours(tokens, all_logits=True)[0]
        greedy = ours.generate(tokens[:1], 20, temperature=0.0)
    with torch.no_grad():
        expected = theirs(tokens).logits
        expected_greedy = theirs.generate(tokens[:1], max_new_tokens=20, do_sample=False, min_new_tokens=20,
                                          pad_token_id=0, eos_token_id=None)
    # bf16 keeps 8 bits of mantissa: a few units of its last place on logits of about 1
    torch.testing.assert_close(logits.float(), expected.float(), atol=3e-2, rtol=2e-2)
    assert greedy.tolist() == expected_greedy.tolist()


def test_a_bf16_base_trains_fp32_adapters_and_classifies_in_any_precision(bf16_folder, tmp_path, sst_subset,  # noqa: F811
                                                                        monkeypatch, capsys):
    """--dtype auto runs a bf16 folder in bf16 where the CPU multiplies bf16 (else fp32, with a note); the base is
    held in bf16, what trains in fp32; the checkpoint names its base by the stored weights, so classify finds it
    whatever precision it runs in."""
    import runtime
    folder = str(bf16_folder[1])
    monkeypatch.setattr(runtime, "cpu_has_bf16_matmul", lambda: True)
    run(["--option", "lora", "--pretrained-model-path", folder, *sst_subset, "--epochs", "1", "--lr", "1e-2",
         "--filepath", "lora.pt"], tmp_path)
    out = capsys.readouterr().out
    assert "parameters, bfloat16)" in out and "peak memory" in out
    saved = torch.load(tmp_path / "lora.pt")
    assert saved["training"]["--dtype"] == "bf16"
    assert {t.dtype for t in saved["trainable"].values()} == {torch.float32}
    run(["--option", "classify", "--filepath", "lora.pt", "--input", sst_subset[3], "--output", "again.txt"], tmp_path)
    assert (tmp_path / "again.txt").read_bytes() == (tmp_path / "sst-dev-lora-output.txt").read_bytes()
    run(["--option", "classify", "--filepath", "lora.pt", "--input", sst_subset[3], "--output", "fp32.txt",
         "--dtype", "fp32"], tmp_path)
    assert "parameters, float32)" in capsys.readouterr().out
    monkeypatch.setattr(runtime, "cpu_has_bf16_matmul", lambda: False)
    run(["--option", "generate", "--pretrained-model-path", folder, "--max_new_tokens", "5"], tmp_path)
    captured = capsys.readouterr()
    assert ("is stored in bf16, which this CPU has no instructions for; --dtype bf16 holds the weights in half the "
            "memory; running in fp32") in captured.err
    assert "parameters, float32)" in captured.out


def test_bf16_lora_on_a_cpu_without_bf16_instructions_takes_fp32_kernels_and_classifies_as_it_trained(
        bf16_folder, tmp_path, sst_subset, monkeypatch, capsys):  # noqa: F811
    """The products of the frozen bf16 base run in fp32 kernels (kernels.py) in training and in classify, and the
    trained adapters stay apart from the bf16 weights (merged, they would round away), so classify of the checkpoint
    gives the predictions the run wrote."""
    import runtime
    monkeypatch.setattr(runtime, "cpu_has_bf16_matmul", lambda: False)
    run(["--option", "lora", "--pretrained-model-path", str(bf16_folder[1]), *sst_subset, "--epochs", "2", "--lr",
         "1e-2", "--dtype", "bf16", "--filepath", "lora.pt"], tmp_path)
    captured = capsys.readouterr()
    assert "multiplies them in fp32 kernels here" in captured.err and "parameters, bfloat16)" in captured.out
    run(["--option", "classify", "--filepath", "lora.pt", "--input", sst_subset[3], "--output", "again.txt",
         "--dtype", "bf16"], tmp_path)  # auto would run it in fp32 on such a CPU
    assert (tmp_path / "again.txt").read_bytes() == (tmp_path / "sst-dev-lora-output.txt").read_bytes()


def test_quantized_generation_reads_a_bf16_folder_as_stored_whatever_the_run_s_precision(bf16_folder, tmp_path,
                                                                                           monkeypatch, capsys):
    """int8 weights made from the stored bf16 ones equal those made from an fp32 copy, which would only cost memory."""
    import runtime
    monkeypatch.setattr(runtime, "cpu_has_bf16_matmul", lambda: False)  # --dtype auto: fp32
    run(["--option", "generate", "--pretrained-model-path", str(bf16_folder[1]), "--max_new_tokens", "6",
         "--temperature", "0", "--quantize", "int8"], tmp_path)
    assert "layers in int8, products and the rest in bfloat16)" in capsys.readouterr().out
    fp32 = prepare_for_decoding(load_pretrained(str(bf16_folder[1])).eval(), "int8")
    bf16 = prepare_for_decoding(load_pretrained(str(bf16_folder[1]), torch.bfloat16).eval(), "int8")
    assert all(torch.equal(a, b) for a, b in zip(fp32.buffers(), bf16.buffers()))


def hostile(folder, header: dict, data: bytes = b"", header_len: int = None) -> None:
    """A model.safetensors whose header says what it likes about its data."""
    text = json.dumps(header).encode()
    with open(folder / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(text) if header_len is None else header_len) + text + data)


@pytest.mark.parametrize("case, header, data, header_len, words", [
    ("header longer than the file", {}, b"", 1 << 62, "header claims 4611686018427387904 bytes"),
    ("offsets outside the file", {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8, None,
     "bytes 0..16"),
    ("size and shape disagree", {"a": {"dtype": "F32", "shape": [1 << 40], "data_offsets": [0, 8]}}, b"\0" * 8, None,
     "not its shape"),
    ("overlapping tensors", {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                             "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12, None,
     "share bytes"),
    ("dtype we do not read", {"a": {"dtype": "I64", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 8, None, "is I64"),
    ("header not json", None, b"", None, "not JSON"),
])
def test_a_hostile_safetensors_header_is_refused_in_one_line_before_any_allocation(hf_folders, tmp_path, case,
                                                                                    header, data, header_len, words):
    folder = edited_copy(hf_folders[1], tmp_path)
    if header is None:
        with open(folder / "model.safetensors", "wb") as f:
            f.write(struct.pack("<Q", 5) + b"{oops")
    else:
        hostile(folder, header, data, header_len)
    with pytest.raises(UsageError, match="model.safetensors: not a valid safetensors file") as refused:
        load_pretrained(str(folder))
    assert words in str(refused.value) and "\n" not in str(refused.value)


def mapped_files(tensor):
    """The files whose mapping in this process holds the tensor's first byte."""
    address, files = tensor.data_ptr(), set()
    with open("/proc/self/maps") as f:
        for line in f:
            span, *rest = line.split()
            begin, end = (int(x, 16) for x in span.split("-"))
            if begin <= address < end and len(rest) >= 5:
                files.add(rest[4])
    return files


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_a_folders_weights_are_mapped_from_its_file_not_copied(hf_folders):
    # read into new memory, a 7B model would be held twice while decoding.py converts it
    theirs, root = hf_folders
    model = load_pretrained(str(root / "single"))  # fp32 in the file and held in fp32: the file's own bytes
    weights = [model.output.weight, model.layers[0].feed_forward.w2.weight, model.norm.weight]
    assert all(mapped_files(w) == {str(root / "single" / "model.safetensors")} for w in weights)
    model.layers[0].feed_forward.w2.weight.data += 1  # copy-on-write: the file stays as it was
    assert torch.equal(load_pretrained(str(root / "single")).layers[0].feed_forward.w2.weight,
                       theirs.model.layers[0].mlp.down_proj.weight)
