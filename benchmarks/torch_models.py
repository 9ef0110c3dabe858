"""PyTorch models the benchmarks train, named ``torch:torch_models:NAME``.

The scripts run as ``python benchmarks/<script>.py``, so this module is
importable from the scripts' own directory (in-process drivers; a node process
gets the directory from the launcher).
"""

from __future__ import annotations

import torch
from torch import nn


def digits_cnn():
    """A small CNN for scikit-learn's 8 x 8 digits: conv 3x3 (16), conv 3x3 (32), dense 10."""
    net = nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, 16, kernel_size=3, padding=1),  # 16 x 8 x 8
        nn.ReLU(),
        nn.MaxPool2d(2),  # 16 x 4 x 4
        nn.Conv2d(16, 32, kernel_size=3, padding=1),  # 32 x 4 x 4
        nn.ReLU(),
        nn.MaxPool2d(2),  # 32 x 2 x 2
        nn.Flatten(),
        nn.Linear(32 * 2 * 2, 10),
    )
    return net, torch.nn.CrossEntropyLoss()


def digits_mlp():
    """An MLP 64-256-10 with ReLU: little computation per step, so per-step overheads show."""
    net = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))
    return net, torch.nn.CrossEntropyLoss()


#: name -> factory, in the order the benchmark runs them
MODELS = {"cnn": digits_cnn, "mlp": digits_mlp}
