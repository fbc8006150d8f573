"""What every Llama module tree shares: its config, weight initialisation and parameter count."""
import math

from torch import nn

from config import LlamaConfig
from quantized import quantized_weights


class LlamaPreTrainedModel(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config

    def init_weights(self) -> None:
        """GPT-2's initialisation, as llama2.c trains with: N(0, 0.02) everywhere, and the projections that
        write into the residual stream scaled down by sqrt(2 * n_layers) so its variance stays put."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layers)
        for name, param in self.named_parameters():
            if name.endswith(("w3.weight", "wo.weight")):
                nn.init.normal_(param, mean=0.0, std=residual_std)

    def num_parameters(self) -> int:
        """Parameters counted once each (the tied embedding/output matrix is one), quantized weights included."""
        return sum(p.numel() for p in self.parameters()) + quantized_weights(self)
