"""Reference architectures of the workloads (W1 MLP, LEAF FEMNIST CNN, Shakespeare LSTM)."""

from __future__ import annotations

import torch
from torch import nn


def mlp(n_in: int = 64, hidden: int = 128, n_out: int = 10) -> nn.Module:
    """W1: 64-128-10 with ReLU."""
    return nn.Sequential(nn.Linear(n_in, hidden), nn.ReLU(), nn.Linear(hidden, n_out))


def femnist_cnn(num_classes: int = 62) -> nn.Module:
    """LEAF/TFF CNN: conv5x5(32)-pool-conv5x5(64)-pool-dense(2048)-dense(62)."""
    return nn.Sequential(
        nn.Conv2d(1, 32, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 7 * 7, 2048),
        nn.ReLU(),
        nn.Linear(2048, num_classes),
    )


class CharLSTM(nn.Module):
    """Shakespeare next-character model: embedding 8, 2-layer LSTM 256 (FedAvg paper / TFF)."""

    def __init__(self, vocab: int, embed: int = 8, hidden: int = 256, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, embed)
        self.lstm = nn.LSTM(embed, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.embed(x))
        return self.head(out)
