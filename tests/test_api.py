"""The Python API: dasgd.run / simulate / load_run, options named as the flags, arrays, replay."""

from __future__ import annotations

import signal
import sys
import threading

import numpy as np
import pytest
from sklearn.datasets import load_iris

import dasgd
from dasgd.cli import args_from_config, config_from_args, main, options_namespace
from dasgd.config import ModelConfig, RunConfig, TrainConfig, TransportConfig
from dasgd.errors import ConfigError


def _iris():
    return load_iris(return_X_y=True)


def _column(table, name):
    """A column of a RunResult table: a DataFrame with pandas, a list of dicts without."""
    if isinstance(table, list):
        return [row[name] for row in table]
    return list(table[name])


def _columns(table):
    return set(table[0]) if isinstance(table, list) else set(table.columns)


def test_simulate_with_arrays_gives_tables_models_and_replays_bit_for_bit(tmp_path, capsys):
    X, y = _iris()
    result = dasgd.simulate(
        nodes=3, topology="complete", dataset=(X, y), steps=20, out_dir=tmp_path, quiet=True
    )
    run = result.summary["run"]
    assert run["simulated"] and run["steps"] == 60
    assert result.models.shape == (3, 4 * 3 + 3) and result.x0.shape == (15,)
    np.testing.assert_allclose(result.average_model, result.models.mean(axis=0))
    # the arrays were saved as given, and the config names them: the run replays
    saved = np.load(result.run_dir / "data" / "arrays.npz")
    np.testing.assert_array_equal(saved["X"], X)
    assert result.config.data.dataset == str((result.run_dir / "data" / "arrays.npz").resolve())
    assert result.summary["dataset"]["n_train"] + result.summary["dataset"]["n_test"] == 150
    # record tables (DataFrames with pandas, lists of dicts without)
    intervals = result.intervals
    assert {"process", "node", "t_s", "step", "loss"} <= _columns(intervals)
    assert set(_column(intervals, "process")) == {"node-0", "node-1", "node-2"}
    assert len(result.gradients) == 60 and len(result.applies) == 2 * 60
    assert _column(result.finals, "steps") == [20, 20, 20]
    assert len(result.nodes) == 3
    # a replay from the run directory: same config, new run directory, same models (the
    # simulator is deterministic)
    again = dasgd.simulate(result.run_dir, quiet=True)
    assert again.run_dir != result.run_dir
    np.testing.assert_array_equal(again.models, result.models)
    # and through the command line, with an override
    code = main(["simulate", "-q", "--config", str(result.run_dir / "config.json"), "--lr", "0.01"])
    assert code == 0
    capsys.readouterr()
    runs = sorted(
        p for p in tmp_path.iterdir() if p.name not in (result.run_dir.name, again.run_dir.name)
    )
    (replayed,) = runs
    replay = dasgd.load_run(replayed)
    assert replay.config.train.lr == 0.01 and replay.config.n_nodes == 3
    assert replay.config.topology.spec == "complete" and replay.config.train.steps == 20


def test_test_split_given_as_arrays_is_used_as_is(tmp_path):
    X, y = _iris()
    result = dasgd.simulate(
        nodes=2,
        dataset={"X": X[:100], "y": y[:100], "X_test": X[100:], "y_test": y[100:]},
        steps=5,
        out_dir=tmp_path,
        quiet=True,
        no_standardize=True,
    )
    assert (result.summary["dataset"]["n_train"], result.summary["dataset"]["n_test"]) == (100, 50)


def test_load_run_with_pandas_gives_dataframes(tmp_path):
    pd = pytest.importorskip("pandas", reason="the notebook extra is not installed")
    loaded = dasgd.load_run(dasgd.simulate(nodes=2, steps=5, out_dir=tmp_path, quiet=True).run_dir)
    assert isinstance(loaded.intervals, pd.DataFrame) and isinstance(loaded.nodes, pd.DataFrame)
    assert loaded.gradients["t_end_s"].dtype == np.float64


def test_load_run_without_pandas_gives_lists_of_dicts(tmp_path, monkeypatch):
    result = dasgd.simulate(nodes=2, steps=5, out_dir=tmp_path, quiet=True)
    monkeypatch.setitem(sys.modules, "pandas", None)  # import pandas raises ImportError
    loaded = dasgd.load_run(result.run_dir)
    rows = loaded.intervals
    assert isinstance(rows, list) and isinstance(rows[0], dict) and rows[0]["process"] == "node-0"
    assert isinstance(loaded.nodes, list)
    assert "dasgd, 2 nodes" in repr(loaded)


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        ({"bogus": 1}, "unknown option 'bogus': valid options are activation, algorithm"),
        ({"algorithm": "sgd"}, "unknown algorithm 'sgd': choose one of dasgd, ps-async, ps-sync"),
        ({"hidden": "a,b"}, "hidden='a,b' is invalid"),
        ({"no_events": "yes"}, "no_events must be True or False"),
        ({"lr": -1.0}, "learning rate must be"),
        ({"model": "torch:x"}, "torch:MODULE:FACTORY"),
        ({"dataset": (1, 2, 3)}, "dataset must be a name or path, (X, y)"),
        ({"dataset": "arrays"}, "names data given as arrays"),
        ({"dataset": (np.ones((4, 2)), np.zeros(3))}, "y has 3 labels and X has 4 rows"),
    ],
)
def test_bad_options_are_config_errors_naming_the_value(tmp_path, options, needle):
    with pytest.raises(ConfigError) as info:
        dasgd.simulate(out_dir=tmp_path, quiet=True, **options)
    assert needle in str(info.value)
    assert not any(tmp_path.iterdir())


def test_options_and_configs_are_the_command_line_word_for_word():
    cfg = RunConfig(
        n_nodes=3,
        algorithm="ps-async",
        model=ModelConfig("mlp", hidden=(7, 5), dtype="float32"),
        train=TrainConfig(lr=0.2, steps=9, send_every=2, max_lead_steps=4, seed=5),
        transport=TransportConfig(kind="tcp", queue_bytes=3 << 20),
        run_id="keep",
        eval_interval_s=None,
        record_events=False,
    )
    assert config_from_args(options_namespace("run", cfg)) == cfg
    assert config_from_args(options_namespace("run", cfg.to_dict())) == cfg
    flags = config_from_args(
        options_namespace(
            "run", None, {"nodes": 3, "hidden": "7,5", "no_events": True, "send_every": 2}
        )
    )
    assert flags.model.hidden == (7, 5) and not flags.record_events
    assert flags.train.send_every == 2 and flags.n_nodes == 3
    # a new topology without nodes is sized by the topology, as on a fresh command line
    resized = config_from_args(options_namespace("run", cfg, {"topology": "torus:2x3"}))
    assert resized.n_nodes is None and resized.topology.spec == "torus:2x3"
    assert args_from_config(cfg)["queue_mib"] == 3.0


@pytest.mark.multiprocess
def test_run_from_a_worker_thread(tmp_path):
    """Signal handlers can be set only in the main thread: a run elsewhere must not need one."""
    before = signal.getsignal(signal.SIGTERM)
    results, errors = [], []

    def work():
        try:
            results.append(
                dasgd.run(nodes=2, steps=30, out_dir=tmp_path, quiet=True, eval_interval_s=0)
            )
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(timeout=240)
    assert not thread.is_alive() and not errors, errors
    (result,) = results
    assert result.summary["checks"]["exactly_once"]
    assert result.models.shape[0] == 2
    np.testing.assert_allclose(result.models[0], result.models[1], rtol=0, atol=1e-12)
    assert signal.getsignal(signal.SIGTERM) is before
