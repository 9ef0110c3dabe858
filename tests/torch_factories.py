"""PyTorch model factories the tests name as ``torch:tests.torch_factories:NAME``.

Node processes import them by name, so they live in an importable module.
"""

import torch


def tanh_mlp(n_features, n_classes):
    """A 2-layer tanh MLP (smooth: finite differences agree closely)."""
    net = torch.nn.Sequential(
        torch.nn.Linear(n_features, 6), torch.nn.Tanh(), torch.nn.Linear(6, n_classes)
    )
    return net, torch.nn.CrossEntropyLoss()


def small_cnn():
    """A tiny CNN on 8x8 images (digits): conv, tanh, pool, linear."""
    net = torch.nn.Sequential(
        torch.nn.Unflatten(1, (1, 8, 8)),
        torch.nn.Conv2d(1, 3, kernel_size=3),
        torch.nn.Tanh(),
        torch.nn.AvgPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(3 * 3 * 3, 10),
    )
    return net, torch.nn.CrossEntropyLoss()


def relu_mlp_digits():
    """An MLP for digits (64 features, 10 classes), as a user would write it."""
    net = torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.ReLU(), torch.nn.Linear(16, 10))
    return net, torch.nn.functional.cross_entropy


def not_a_module():
    return "model", torch.nn.CrossEntropyLoss()


def wrong_width():
    return torch.nn.Linear(64, 3), torch.nn.CrossEntropyLoss()


def numpy_initialized():
    """Initialized from an unseeded numpy generator: a different x_0 in every process."""
    import numpy as np

    net = torch.nn.Linear(64, 10)
    with torch.no_grad():
        net.weight.copy_(torch.from_numpy(np.random.default_rng().normal(size=(10, 64))))
    return net, torch.nn.CrossEntropyLoss()


NOT_CALLABLE = 42
