"""The toy family's stage-1 objective: symmetric in-batch InfoNCE (query -> target and target -> query)."""

import torch
import torch.nn.functional as F
from torch import nn


class ToySymmetricLoss(nn.Module):
    def __init__(self, temperature: float):
        super().__init__()
        self.temperature = temperature
        self.calls = 0

    @classmethod
    def from_config(cls, config, temperature=None):
        return cls(config.temperature)

    def forward(self, outputs, target_keys=None):
        self.calls += 1
        logits = outputs.query_embeds @ outputs.target_embeds.T / self.temperature
        labels = torch.arange(len(logits), device=logits.device)
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2

    def get_config_dict(self):
        return {"objective": "symmetric InfoNCE", "temperature": self.temperature}
