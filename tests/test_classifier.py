import pytest
import torch
import torch.nn.functional as F

from classifier import (LlamaEmbeddingClassifier, LlamaZeroShotClassifier, build_classifier, prompt_suffix_text,
                        zero_shot_classifier)
from conftest import STORIES260K, TOK512, asset
from data import Split
from datafiles import read_labeled_data
from evaluate import predict
from llama import load_pretrained
from runtime import Runtime
from settings import LoRASettings
from tokenizer import Tokenizer
from utils import UsageError

CPU = Runtime(torch.device("cpu"))
LABELS = ["awful", "bad", "average", "good", "excellent"]


def sst_split(tokenizer, suffix, n=60) -> Split:
    examples = read_labeled_data(asset("data/sst-dev.txt"), "--dev").examples[:n]
    ids = [[tokenizer.bos_id] + tokenizer.encode(e.sentence, bos=False, eos=False) + suffix for e in examples]
    return Split("dev", [e.label for e in examples], [e.sentence for e in examples], ids)


def test_zero_shot_scores_are_the_label_sequence_log_probability():
    tokenizer = Tokenizer(tokenizer_model=asset(TOK512))
    llama = load_pretrained(asset(STORIES260K)).eval()
    label_ids = [tokenizer.encode(name, bos=False, eos=False) for name in LABELS]
    model = LlamaZeroShotClassifier(llama, label_ids)
    prompts = [tokenizer.encode(t, bos=True, eos=False) for t in ("A fine film. This movie is", "Dull")]
    tokens = torch.zeros(2, max(map(len, prompts)), dtype=torch.long)
    for row, p in enumerate(prompts):
        tokens[row, :len(p)] = torch.tensor(p)
    with torch.no_grad():
        scores = model(tokens, torch.tensor([len(p) for p in prompts]))
        for row, prompt in enumerate(prompts):
            for col, label in enumerate(label_ids):
                logits, _ = llama(torch.tensor([prompt + label]), all_logits=True)
                log_probs = F.log_softmax(logits[0, len(prompt) - 1:-1], dim=-1)
                expected = log_probs[torch.arange(len(label)), label].sum()
                assert torch.allclose(scores[row, col], expected, atol=1e-4)


def test_zero_shot_scores_labels_of_one_and_several_tokens_after_prompts_of_any_length():
    """Labels of 1, 3 and 2 tokens after three prompts of different lengths in one right-padded batch: each
    score is the sum of the label's log-probabilities from one full forward pass over prompt + label."""
    torch.manual_seed(0)
    llama = load_pretrained(asset(STORIES260K)).eval()
    label_ids = [[70], [80, 90, 100], [110, 120]]
    prompts = [torch.randint(3, 512, (n,)).tolist() for n in (7, 2, 12)]
    tokens = torch.zeros(3, 12, dtype=torch.long)
    for row, p in enumerate(prompts):
        tokens[row, :len(p)] = torch.tensor(p)
    with torch.no_grad():
        scores = LlamaZeroShotClassifier(llama, label_ids)(tokens, torch.tensor([len(p) for p in prompts]))
        for row, prompt in enumerate(prompts):
            for col, label in enumerate(label_ids):
                logits, _ = llama(torch.tensor([prompt + label]), all_logits=True)
                log_probs = F.log_softmax(logits[0, len(prompt) - 1:-1], dim=-1)
                expected = log_probs[torch.arange(len(label)), label].sum()
                torch.testing.assert_close(scores[row, col], expected, atol=1e-4, rtol=1e-5)


def test_batch_size_does_not_change_zero_shot_predictions():
    tokenizer = Tokenizer(tokenizer_model=asset(TOK512))
    llama = load_pretrained(asset(STORIES260K))
    model = LlamaZeroShotClassifier(llama, [tokenizer.encode(name, bos=False, eos=False) for name in LABELS])
    split = sst_split(tokenizer, tokenizer.encode(prompt_suffix_text(LABELS), bos=False, eos=False))
    one_by_one = predict(model, split, 1, tokenizer.pad_id, CPU).argmax(-1).tolist()
    assert predict(model, split, 7, tokenizer.pad_id, CPU).argmax(-1).tolist() == one_by_one
    assert predict(model, split, 60, tokenizer.pad_id, CPU).argmax(-1).tolist() == one_by_one
    assert len(set(one_by_one)) > 1


def test_batch_size_does_not_change_classifier_predictions():
    tokenizer = Tokenizer(tokenizer_model=asset(TOK512))
    torch.manual_seed(0)
    model = LlamaEmbeddingClassifier(load_pretrained(asset(STORIES260K)), 5, hidden_dropout_prob=0.3)
    split = sst_split(tokenizer, [tokenizer.eos_id])
    one_by_one = predict(model, split, 1, tokenizer.pad_id, CPU)
    torch.testing.assert_close(predict(model, split, 9, tokenizer.pad_id, CPU), one_by_one, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(predict(model, split, 60, tokenizer.pad_id, CPU), one_by_one, atol=1e-5, rtol=1e-5)
    assert len(set(one_by_one.argmax(-1).tolist())) > 1


def test_embedding_classifier_reads_the_last_real_token():
    torch.manual_seed(0)
    llama = load_pretrained(asset(STORIES260K)).eval()
    model = LlamaEmbeddingClassifier(llama, 3, hidden_dropout_prob=0.0).eval()
    seq = torch.randint(3, 512, (1, 8))
    padded = torch.cat([seq, torch.zeros(1, 5, dtype=torch.long)], dim=1)
    with torch.no_grad():
        alone = model(seq, torch.tensor([8]))
        in_batch = model(padded, torch.tensor([8]))
        _, hidden = llama(seq)
        expected = F.log_softmax(model.classifier_head(hidden[:, -1]), dim=-1)
    assert torch.allclose(alone, expected, atol=1e-6) and torch.allclose(in_batch, alone, atol=1e-5)
    assert torch.allclose(alone.exp().sum(), torch.tensor(1.0))


def test_an_untied_output_matrix_is_not_trained_by_the_classifier():
    llama = load_pretrained(asset(STORIES260K))
    llama.output.weight = torch.nn.Parameter(llama.output.weight.detach().clone())
    model = LlamaEmbeddingClassifier(llama, 5, hidden_dropout_prob=0.0)
    model(torch.randint(3, 512, (2, 6)), torch.tensor([6, 4])).sum().backward()
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert "llama.output.weight" not in trainable
    assert all(model.get_parameter(name).grad is not None for name in trainable)


def test_lora_classifier_trains_the_adapters_and_the_head_only():
    llama = load_pretrained(asset(STORIES260K))
    lora = LoRASettings(rank=2, alpha=1.0, dropout=0.0, targets=("wq", "w2"))
    model = build_classifier(llama, 3, hidden_dropout_prob=0.0, lora=lora)
    trainable = sorted(name for name, p in model.named_parameters() if p.requires_grad)
    n_layers = llama.config.n_layers
    assert len(trainable) == 2 * 2 * n_layers + 1  # lora_A and lora_B on two targets per layer, the head
    assert all(name.endswith(("lora_A", "lora_B")) or name.startswith("classifier_head.") for name in trainable)
    assert any(".attention.wq.lora_A" in name for name in trainable)
    assert any(".feed_forward.w2.lora_B" in name for name in trainable)


def test_zero_shot_labels_that_tokenize_alike_are_refused():
    tokenizer = Tokenizer(tokenizer_model=asset(TOK512))
    llama = load_pretrained(asset(STORIES260K))
    model = zero_shot_classifier(llama, tokenizer, ["bad", "good"], "labels.json")
    assert model.label_token_ids == [tokenizer.encode(n, bos=False, eos=False) for n in ("bad", "good")]
    assert model.prompt_suffix == tokenizer.encode("Is this movie bad or good? This movie is ", bos=False, eos=False)


    class CaseBlind:  # a tokenizer to which "Good" and "good" are the same tokens
        def encode(self, text, bos, eos):
            return tokenizer.encode(text.lower(), bos, eos)

    with pytest.raises(UsageError, match="labels.json: 'good' and 'Good' are the same tokens"):
        zero_shot_classifier(llama, CaseBlind(), ["good", "Good"], "labels.json")


def test_a_lora_rank_beyond_a_matrix_s_side_is_warned_about(capsys):
    llama = load_pretrained(asset(STORIES260K))  # wq is 64 x 64, wk is 32 x 64
    build_classifier(llama, 3, 0.0, LoRASettings(rank=40, alpha=1.0, dropout=0.0, targets=("wq", "wk")))
    err = capsys.readouterr().err.splitlines()
    assert err == ["warning: --lora_rank 40 exceeds wk's smaller side (32 x 64): its adapter is 1.9x the size of the "
                   "matrix it adapts"]


def test_the_classifier_is_transformers_sequence_classifier_in_loss_and_gradients(tiny_model):
    """Same weights, same right-padded batch: LlamaForSequenceClassification's loss and every gradient. Its head
    is transformers' `score` (no bias, N(0, 0.02)), which is also what makes an export exact."""
    transformers = pytest.importorskip("transformers")
    from hf import hf_name, to_rotate_half
    from bench.oracle import transformers_config, transformers_weights

    torch.manual_seed(0)
    ours = build_classifier(tiny_model, 3, hidden_dropout_prob=0.0, lora=None).train()
    assert ours.classifier_head.bias is None and 0.01 < ours.classifier_head.weight.std() < 0.04
    theirs = transformers.LlamaForSequenceClassification(transformers_config(tiny_model.config, num_labels=3,
                                                                            pad_token_id=0))
    theirs.model.load_state_dict(transformers_weights(tiny_model))
    theirs.score.load_state_dict({"weight": ours.classifier_head.weight})
    tokens = torch.randint(1, 97, (4, 13), generator=torch.Generator().manual_seed(1))
    lengths = torch.tensor([13, 4, 9, 1])
    tokens[torch.arange(13)[None] >= lengths[:, None]] = 0
    labels = torch.tensor([0, 2, 1, 2])
    our_loss = F.nll_loss(ours(tokens, lengths), labels)
    their_loss = F.cross_entropy(theirs(input_ids=tokens, attention_mask=(tokens != 0).long()).logits, labels)
    torch.testing.assert_close(our_loss, their_loss)
    our_loss.backward()
    their_loss.backward()
    their_grads = {name: p.grad for name, p in theirs.named_parameters()}
    heads = {"wq": tiny_model.config.n_heads, "wk": tiny_model.config.n_kv_heads}
    for name, param in tiny_model.named_parameters():
        if name == "output.weight":
            continue  # tied to the embeddings
        grad = param.grad
        kind = name.split(".")[-2]
        if kind in heads:
            grad = to_rotate_half(grad, heads[kind])
        torch.testing.assert_close(grad, their_grads[hf_name(name)], atol=1e-6, rtol=1e-5, msg=name)
    torch.testing.assert_close(ours.classifier_head.weight.grad, their_grads["score.weight"])
