"""Two ways to classify a sentence with a Llama, and how each is built for a task.

Both take right-padded token ids (batch, seqlen) and the true lengths (batch,), and return log-probabilities
over the labels (batch, n_labels). Causal attention never lets a real token see the padding that follows it,
so the padded positions need no mask and change no prediction, whatever the batch.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from llama import KVCache, Llama
from lora import train_adapters
from settings import LoRASettings
from tokenizer import Tokenizer
from utils import UsageError


class LlamaZeroShotClassifier(nn.Module):
    """Scores each label by the language model: log p(label tokens | prompt), the whole label token
    sequence, so labels that tokenize into several pieces (e.g. under a 512-piece vocabulary) are fair.

    The prompt is read once for all labels. The last real prompt token predicts every label's first token; the
    rest of each label (when it has more than one token) goes on from its prompt's cached keys and values, all
    labels in one batch: rotary positions continue from each prompt's own length, and a mask hides the padding
    that follows the shorter prompts in the cache.
    """

    def __init__(self, llama: Llama, label_token_ids: list[list[int]], prompt_suffix: Optional[list[int]] = None):
        super().__init__()
        self.llama = llama
        for param in self.llama.parameters():
            param.requires_grad = False
        self.label_token_ids = label_token_ids
        self.prompt_suffix = prompt_suffix or []  # the question each sentence is followed by
        self.label_room = max(map(len, label_token_ids))  # tokens a sentence leaves free for the longest label

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        batch_size, seqlen = tokens.shape
        n_labels, longest = len(self.label_token_ids), max(map(len, self.label_token_ids))
        device = tokens.device
        caches = [KVCache(seqlen + longest - 1) for _ in self.llama.layers]
        last = self.llama.hidden_states(tokens, kv_caches=caches, only_at=lengths - 1)[:, 0]  # (batch, dim)
        first_ids = torch.tensor([ids[0] for ids in self.label_token_ids], device=device)
        scores = self.log_probs(last)[:, first_ids]  # (batch, n_labels)
        if longest == 1:
            return scores

        # Every label but its last token, after its own copy of each prompt: (batch * n_labels, longest - 1)
        label_ids = torch.tensor([ids + [0] * (longest - len(ids)) for ids in self.label_token_ids], device=device)
        in_label = torch.tensor([[j < len(ids) for j in range(longest)] for ids in self.label_token_ids],
                                device=device)
        for cache in caches:
            cache.repeat_batch(n_labels)
        prompt_lengths = lengths.repeat_interleave(n_labels)[:, None]  # (batch * n_labels, 1)
        steps = torch.arange(longest - 1, device=device)
        padding_mask = torch.cat([torch.arange(seqlen, device=device) < prompt_lengths,
                                  torch.ones(len(prompt_lengths), longest - 1, dtype=torch.bool, device=device)], 1)
        hidden = self.llama.hidden_states(label_ids[:, :-1].repeat(batch_size, 1), padding_mask, kv_caches=caches,
                                          start_pos=seqlen, positions=prompt_lengths + steps)
        log_probs = self.log_probs(hidden).view(batch_size, n_labels, longest - 1, -1)
        rest = log_probs.gather(3, label_ids[None, :, 1:, None].expand(batch_size, -1, -1, 1)).squeeze(-1)
        return scores + (rest * in_label[:, 1:]).sum(dim=-1)

    def log_probs(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(self.llama.output(hidden).float(), dim=-1)


class LlamaEmbeddingClassifier(nn.Module):
    """The final hidden state of the last real token, then dropout, a linear head and log-softmax.

    The head is transformers' `score` of LlamaForSequenceClassification: no bias, weights drawn from N(0, 0.02),
    so that a trained classifier exports exactly (export.py) and trains as transformers' does
    (docs/accuracy.md). Checkpoints made before had a bias (head_bias=True rebuilds them)."""

    def __init__(self, llama: Llama, num_labels: int, hidden_dropout_prob: float, head_bias: bool = False):
        super().__init__()
        self.llama = llama
        self.num_labels = num_labels
        self.dropout = nn.Dropout(hidden_dropout_prob)
        self.classifier_head = nn.Linear(llama.config.dim, num_labels, bias=head_bias)
        nn.init.normal_(self.classifier_head.weight, std=0.02)
        if not llama.tied_embeddings:
            # The head replaces the language-model output: an untied output matrix gets no gradient, and must
            # not count as trained (DistributedDataParallel would wait for its gradient forever).
            llama.output.weight.requires_grad_(False)

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        last = self.llama.hidden_states(tokens, only_at=lengths - 1)[:, 0]  # (batch, dim)
        return F.log_softmax(self.classifier_head(self.dropout(last)).float(), dim=-1)


def prompt_suffix_text(label_names: list[str]) -> str:
    if len(label_names) == 2:
        names = " or ".join(label_names)
    else:
        names = ", ".join(label_names[:-1]) + ", or " + label_names[-1]
    return f"Is this movie {names}? This movie is "


def zero_shot_classifier(llama: Llama, tokenizer: Tokenizer, label_names: list[str],
                         path: str) -> LlamaZeroShotClassifier:
    """The zero-shot classifier of a task: its question and its label names as token ids (path: the label
    mapping, for errors)."""
    label_ids = [tokenizer.encode(name, bos=False, eos=False) for name in label_names]
    for i, ids in enumerate(label_ids):
        if ids in label_ids[:i]:
            raise UsageError(f"--label-names {path}: {label_names[label_ids.index(ids)]!r} and {label_names[i]!r} "
                             f"are the same tokens to the tokenizer; zero-shot cannot tell them apart")
    suffix = tokenizer.encode(prompt_suffix_text(label_names), bos=False, eos=False)
    return LlamaZeroShotClassifier(llama, label_ids, suffix)


def build_classifier(llama: Llama, n_labels: int, hidden_dropout_prob: float,
                     lora: Optional[LoRASettings], head_bias: bool = False) -> LlamaEmbeddingClassifier:
    """The fine-tuning classifier; with LoRA settings, adapters on the base model, which then stays frozen: only
    the adapters and the head train."""
    model = LlamaEmbeddingClassifier(llama, n_labels, hidden_dropout_prob, head_bias)
    if lora:
        train_adapters(model, model.llama, lora, also_trained="classifier_head.")
    device = llama.norm.weight.device
    return model if device.type == "meta" else model.to(device)  # a base on the meta device waits for its shards
