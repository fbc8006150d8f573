"""The language model as a task (--task lm): a Llama trained and measured by the next-token cross-entropy of its own
output layer, at the positions whose tokens train (lmdata.py says which)."""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from llama import Llama
from lora import train_adapters
from settings import LoRASettings

IGNORE = -100  # a position that predicts nothing that trains (transformers' label for it)


class LlamaLanguageModel(nn.Module):
    """forward(tokens, targets) -> the cross-entropy of each trained target, (n_targets,) in row-major order.

    tokens (batch, seqlen) are right-padded; targets (batch, seqlen) hold the token each position must predict,
    or IGNORE. Only the trained positions go through the output layer: a prompt the loss masks costs no logits,
    and the 32000-wide logits of a long batch are never all held at once."""

    def __init__(self, llama: Llama):
        super().__init__()
        self.llama = llama

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        hidden = self.llama.hidden_states(tokens)  # (batch, seqlen, dim)
        trained = targets != IGNORE
        logits = self.llama.output(hidden[trained]).float()  # (n_targets, vocab)
        return F.cross_entropy(logits, targets[trained], reduction="none")


def build_language_model(llama: Llama, lora: Optional[LoRASettings]) -> LlamaLanguageModel:
    """The model --task lm trains: every weight (full fine-tuning) or, with LoRA settings, adapters alone."""
    model = LlamaLanguageModel(llama)
    if lora:
        train_adapters(model, llama, lora)
    return model.to(llama.norm.weight.device)


def next_token_targets(token_ids: list[list[int]], trained_from: list[int], seqlen: int) -> torch.Tensor:
    """(batch, seqlen) targets of right-padded sequences: position t predicts token t + 1 where t + 1 trains."""
    targets = torch.full((len(token_ids), seqlen), IGNORE, dtype=torch.long)
    for row, (ids, start) in enumerate(zip(token_ids, trained_from)):
        targets[row, start - 1:len(ids) - 1] = torch.tensor(ids[start:], dtype=torch.long)
    return targets


def sliding_windows(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored) of each window over a stream of n_tokens: each token after the first is scored
    once, in the first window that reaches it, with that window's context before it (transformers' recipe for the
    perplexity of fixed-length models)."""
    windows, scored_to = [], 1
    for begin in range(0, n_tokens, stride):
        end = min(begin + window, n_tokens)
        if end > scored_to:
            windows.append((begin, end, scored_to))
            scored_to = end
        if end == n_tokens:
            break
    return windows
