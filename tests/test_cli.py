"""The dasgd command: bad input gets one line and exit code 2; subcommands print what they promise."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import networkx as nx
import pytest

import dasgd
from dasgd.cli import build_parser, config_from_args, main
from dasgd.config import (
    ALGORITHMS,
    DELAY_RULES,
    DTYPES,
    SERVER_OPTIMIZERS,
    SHARDINGS,
    TRANSPORTS,
    RunConfig,
)
from dasgd.ml.models import ACTIVATIONS, MODELS
from dasgd.ml.optim import OPTIMIZERS
from dasgd.topology import save_topology

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def files(tmp_path):
    save_topology(nx.path_graph(6), tmp_path / "path6.json")
    # node-link JSON written by hand: nx.node_link_data's keywords differ across networkx 3.x
    disconnected = {
        "nodes": [{"id": i} for i in range(4)],
        "edges": [{"source": 0, "target": 1}, {"source": 2, "target": 3}],
    }
    (tmp_path / "disconnected.json").write_text(json.dumps(disconnected))
    (tmp_path / "broken.json").write_text("{not json")
    (tmp_path / "bad.svm").write_text("1 1:0.5 2:oops\n-1 1:0.1\n")
    return tmp_path


def run_main(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


BAD_INPUTS = [
    (["--topology", "moebius"], "unknown topology 'moebius'"),
    (["--dataset", "mnist_fashion"], "unknown dataset 'mnist_fashion'"),
    (["--topology", "{tmp}/missing.json"], "does not exist"),
    (["--topology", "{tmp}/broken.json"], "broken.json"),
    (["--topology", "{tmp}/disconnected.json"], "connected"),
    (["-n", "4", "--topology", "{tmp}/path6.json"], "6 nodes"),
    (["--dataset", "{tmp}/bad.svm"], "bad.svm"),
    (["--lr", "-0.1"], "learning rate must be"),
    (["--batch-size", "-8"], "batch size must be"),
    (["--batch-size", "0"], "batch size must be"),
    (["--model", "transformer"], "invalid choice: 'transformer'"),
    # with torch: the module cannot be imported; without: torch cannot; either names the spec
    (["--model", "torch:no_such_module_xyz:make"], "model 'torch:no_such_module_xyz:make'"),
    (["--model", "torch:nocolon"], "torch:MODULE:FACTORY"),
    (["--config", "{tmp}/missing.json"], "config file"),
    (["--config", "{tmp}/broken.json"], "cannot read config file"),
    (["--model", "logistic"], "needs 2 classes"),
    (["--topology", "hypercube", "-n", "6"], "power-of-two"),
    (["--send-every", "0"], "send interval"),
    (["--transport", "udp"], "invalid choice: 'udp'"),
    (["--lr", "fast"], "invalid float value: 'fast'"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["-n", "0"], "number of nodes"),
    (["--slowdown", "9:2"], "slowdown names node 9"),
    (["--latency", "0-2:0.1"], "not in the topology"),
    (["--queue-mib", "nan"], "--queue-mib"),
    (["--max-lead-steps", "2", "--send-every", "4"], "must be >= the send interval 4"),
    (["--model", "mlp", "--hidden", "100000,100000"], "too large"),
    (["-n", "4", "--partition", "0-2@1+1"], "link 0-2, which is not in the topology"),
    (["-n", "4", "--partition", "0-1@1+1", "--partition", "7@1+1"], "nodes 0..3"),
    (["--partition", "0-1@-2+1"], "start -2 s must be >= 0"),
    (["--partition", "0-1@2+0"], "duration 0 s must be > 0"),
    (["--partition", "0-1"], "U-V@START+DURATION"),
]


@pytest.mark.parametrize(("args", "message"), BAD_INPUTS)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(files, capsys, args, message):
    args = [a.replace("{tmp}", str(files)) for a in args]
    out_dir = files / "runs"
    code, out, err = run_main(capsys, "run", "-q", "--out-dir", str(out_dir), *args)
    assert code == 2
    assert err.startswith("dasgd: error: ") and err.count("\n") == 1, err
    assert message in err
    assert "Traceback" not in err
    assert not out_dir.exists() or not any(out_dir.iterdir())


def test_port_in_use_is_a_user_error(tmp_path, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        base = port - 1  # node 1 collides
        code, _, err = run_main(
            capsys,
            "run",
            "-q",
            "--transport",
            "tcp",
            "--base-port",
            str(base),
            "--out-dir",
            str(tmp_path),
        )
    if base < 1024:
        pytest.skip("ephemeral port too low for this check")
    assert code == 2
    assert f"port {port} (node 1)" in err and "--base-port" in err


@pytest.mark.parametrize(
    ("argv", "stderr"),
    [
        (["run", "--topology", "nope"], "dasgd: error: unknown topology 'nope'"),
        (["run", "--model", "nope"], "dasgd: error: argument --model: invalid choice: 'nope'"),
    ],
)
def test_real_command_exit_code_and_no_traceback(tmp_path, argv, stderr):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-m", "dasgd", *argv, "--out-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith(stderr) and proc.stderr.count("\n") == 1, proc.stderr
    assert "Traceback" not in proc.stderr


def test_real_command_version():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-m", "dasgd", "--version"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, f"dasgd {dasgd.__version__}\n", "")


@pytest.mark.parametrize(
    ("flag", "valid"),
    [
        ("--model", (*MODELS, "torch:MODULE:FACTORY")),
        ("--activation", ACTIVATIONS),
        ("--dtype", DTYPES),
        ("--optimizer", OPTIMIZERS),
        ("--server-optimizer", SERVER_OPTIMIZERS),
        ("--delay-rule", DELAY_RULES),
        ("--transport", TRANSPORTS),
        ("--algorithm", ALGORITHMS),
        ("--sharding", SHARDINGS),
    ],
)
def test_a_value_outside_the_choices_is_one_line_naming_every_valid_value(
    tmp_path, capsys, flag, valid
):
    code, out, err = run_main(capsys, "run", "-q", "--out-dir", str(tmp_path), flag, "bogus")
    assert code == 2 and out == ""
    assert err.startswith(f"dasgd: error: argument {flag}: invalid choice: 'bogus'"), err
    assert err.count("\n") == 1, err
    for value in valid:
        assert value in err
    assert not any(tmp_path.iterdir())
    # and --help lists them, for people and shell completion
    assert main(["run", "--help"]) == 0
    assert "{" + ",".join(valid) + "}" in capsys.readouterr().out


def test_version_prints_the_package_version(capsys):
    code, out, err = run_main(capsys, "--version")
    assert code == 0 and err == ""
    assert out == f"dasgd {dasgd.__version__}\n"


def test_defaults_are_the_documented_run():
    config = config_from_args(build_parser().parse_args(["run"]))
    assert config == RunConfig()
    assert (config.n_nodes, config.topology.spec, config.data.dataset, config.model.name) == (
        4,
        "ring",
        "digits",
        "softmax",
    )


def test_topology_file_takes_its_node_count(files):
    config = config_from_args(
        build_parser().parse_args(["run", "--topology", str(files / "path6.json")])
    )
    assert config.n_nodes is None  # resolved from the file by the launcher


def test_topology_command(capsys):
    code, out, _ = run_main(capsys, "topology", "torus:2x4")
    assert code == 0
    for key in ("n_nodes", "n_edges", "degree_min", "diameter", "spectral_gap"):
        assert key in out
    code, out, _ = run_main(capsys, "topology", "hypercube", "-n", "8", "--json")
    desc = json.loads(out)
    assert desc["n_nodes"] == 8 and desc["n_edges"] == 12 and desc["diameter"] == 3


def test_summary_of_missing_run_is_a_user_error(tmp_path, capsys):
    code, _, err = run_main(capsys, "summary", str(tmp_path / "nope"))
    assert code == 2 and "summary.json" in err


@pytest.mark.multiprocess
def test_run_then_summary_prints_the_same_table(tmp_path, capsys):
    code, out, _ = run_main(
        capsys, "run", "-q", "-n", "2", "--steps", "30", "--out-dir", str(tmp_path), "--run-id", "x"
    )
    assert code == 0
    assert "every delta applied exactly once at every node: yes" in out
    code, again, _ = run_main(capsys, "summary", str(tmp_path / "x"))
    assert code == 0
    table = out.split("\nrun directory:")[0]
    assert again.strip() == table.strip()


def test_sized_spec_sets_the_node_count():
    config = config_from_args(build_parser().parse_args(["run", "--topology", "torus:2x4"]))
    assert config.n_nodes is None  # 8, from the spec
    config = config_from_args(
        build_parser().parse_args(["run", "--topology", "torus:2x4", "-n", "6"])
    )
    assert config.n_nodes == 6  # and the launcher reports the mismatch


def test_unwritable_out_dir_is_a_user_error(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, _, err = run_main(capsys, "run", "-q", "--out-dir", str(blocker / "runs"))
    assert code == 2 and "cannot create the run directory" in err


def test_malformed_summary_is_a_user_error(tmp_path, capsys):
    (tmp_path / "summary.json").write_text("{}")
    code, _, err = run_main(capsys, "summary", str(tmp_path))
    assert code == 2 and "not a dasgd summary" in err


@pytest.mark.multiprocess
@pytest.mark.parametrize(
    ("algorithm", "named"), [("dasgd", "diverged at step"), ("ps-async", "diverged")]
)
def test_divergence_is_a_named_failure(tmp_path, capsys, algorithm, named):
    code, _, err = run_main(
        capsys,
        "run",
        "-q",
        "--algorithm",
        algorithm,
        "--model",
        "mlp",
        "--lr",
        "1000",
        "--steps",
        "300",
        "--out-dir",
        str(tmp_path),
        "--send-timeout-s",
        "20",
    )
    assert code == 1
    assert named in err and "lower --lr" in err and "Traceback" not in err


def test_partition_flags_repeat_into_one_spec_and_round_trip():
    from dasgd.cli import args_from_config, options_namespace

    parser = build_parser()
    args = parser.parse_args(["run", "--partition", "0-1@2+3", "--partition", "3@1+1"])
    config = config_from_args(args)
    assert config.emulation.partition == "0-1@2+3,3@1+1"
    assert config_from_args(options_namespace("run", config)) == config
    assert args_from_config(config)["partition"] == ["0-1@2+3,3@1+1"]
    # the Python API's option takes one string (or a list) too
    api = config_from_args(options_namespace("run", None, {"partition": "0-1@2+3"}))
    assert api.emulation.partition == "0-1@2+3"
    assert config_from_args(parser.parse_args(["run"])).emulation.partition == ""
