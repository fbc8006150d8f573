"""Two ways to classify a sentence with a Llama.

Both take right-padded token ids (batch, seqlen) and the true lengths (batch,), and return log-probabilities
over the labels (batch, n_labels). Causal attention never lets a real token see the padding that follows it,
so the padded positions need no mask and change no prediction, whatever the batch.
"""
import torch
import torch.nn.functional as F
from torch import nn

from llama import Llama


class LlamaZeroShotClassifier(nn.Module):
    """Scores each label by the language model: log p(label tokens | prompt), the whole label token
    sequence, so labels that tokenize into several pieces (e.g. under a 512-piece vocabulary) are fair."""

    def __init__(self, llama: Llama, label_token_ids: list[list[int]]):
        super().__init__()
        self.llama = llama
        for param in self.llama.parameters():
            param.requires_grad = False
        self.label_token_ids = label_token_ids

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        batch_size = tokens.shape[0]
        scores = []
        for label_ids in self.label_token_ids:
            label = torch.tensor(label_ids, device=tokens.device).expand(batch_size, -1)  # (batch, n)
            positions = lengths[:, None] + torch.arange(len(label_ids), device=tokens.device)  # (batch, n)
            extended = F.pad(tokens, (0, len(label_ids))).scatter(1, positions, label)  # prompt + label
            hidden = self.llama.hidden_states(extended)
            # the token at position p is predicted by the hidden state at p - 1
            predicting = hidden.gather(1, (positions - 1)[..., None].expand(-1, -1, hidden.shape[-1]))
            log_probs = F.log_softmax(self.llama.output(predicting).float(), dim=-1)  # (batch, n, vocab)
            scores.append(log_probs.gather(2, label[..., None]).squeeze(-1).sum(dim=1))
        return torch.stack(scores, dim=1)


class LlamaEmbeddingClassifier(nn.Module):
    """The final hidden state of the last real token, then dropout, a linear head and log-softmax."""

    def __init__(self, llama: Llama, num_labels: int, hidden_dropout_prob: float):
        super().__init__()
        self.llama = llama
        self.num_labels = num_labels
        self.dropout = nn.Dropout(hidden_dropout_prob)
        self.classifier_head = nn.Linear(llama.config.dim, num_labels)
        if not llama.tied_embeddings:
            # The head replaces the language-model output: an untied output matrix gets no gradient, and must
            # not count as trained (DistributedDataParallel would wait for its gradient forever).
            llama.output.weight.requires_grad_(False)

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        hidden = self.llama.hidden_states(tokens)  # (batch, seqlen, dim)
        last = hidden[torch.arange(tokens.shape[0], device=tokens.device), lengths - 1]  # (batch, dim)
        return F.log_softmax(self.classifier_head(self.dropout(last)).float(), dim=-1)
