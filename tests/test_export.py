"""dasgd export: CSV, Parquet and TensorBoard from a run directory, and their errors."""

from __future__ import annotations

import csv
import struct
import sys

import numpy as np
import pytest

import dasgd
from dasgd.analysis.export import TABLES, export_run, run_tables
from dasgd.cli import main


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    return dasgd.simulate(nodes=3, steps=15, out_dir=out, quiet=True, eval_interval_s=0.001).run_dir


def test_tables_hold_every_record_and_event(run_dir):
    tables = run_tables(run_dir)
    assert list(tables) == list(TABLES)
    for name, table in tables.items():
        lengths = {len(c) for c in table.values()}
        assert len(lengths) == 1, name  # equal-length columns
    assert len(tables["gradients"]["step"]) == 45
    assert tables["gradients"]["t_end_s"].dtype == np.float64
    assert len(tables["applies"]["origin"]) == 2 * 45  # b = 1: every step is a delta
    finals = tables["finals"]
    assert list(finals["process"]) == ["node-0", "node-1", "node-2"]
    assert list(finals["steps"]) == [15, 15, 15]
    assert finals["edges"][0].startswith("[")  # nested fields as JSON text
    assert list(tables["intervals"])[:5] == ["process", "node", "kind", "t_s", "step"]


def test_csv_export_reads_back(run_dir, tmp_path, capsys):
    assert main(["export", str(run_dir), "-o", str(tmp_path)]) == 0
    printed = capsys.readouterr().out.split()
    assert sorted(printed) == sorted(str(tmp_path / f"{t}.csv") for t in TABLES)
    tables = run_tables(run_dir)
    with (tmp_path / "gradients.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 45 and list(rows[0]) == list(tables["gradients"])
    np.testing.assert_array_equal(
        [float(r["t_end_s"]) for r in rows], tables["gradients"]["t_end_s"]
    )
    with (tmp_path / "intervals.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(tables["intervals"]["t_s"])
    assert {r["process"] for r in rows} == {"node-0", "node-1", "node-2"}


def test_parquet_export_reads_back(run_dir, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet", reason="the parquet extra is not installed")
    written = export_run(run_dir, "parquet", tmp_path)
    assert {p.name for p in written} == {f"{t}.parquet" for t in TABLES}
    applies = pq.read_table(tmp_path / "applies.parquet")
    expected = run_tables(run_dir, ["applies"])["applies"]
    assert applies.column_names == list(expected)
    np.testing.assert_array_equal(
        applies.column("staleness_steps").to_numpy(), expected["staleness_steps"]
    )
    assert str(applies.schema.field("origin").type) == "int32"


def _scalars(path) -> dict[str, int]:
    """Count the scalar values per tag in a TensorBoard event file (TFRecord framing).

    tensorboardX writes but does not read, and the tensorboard package (which
    reads) is no dependency: the framing is 8 bytes of length, 4 of CRC, the
    record, 4 of CRC; the record is tensorboardX's own ``Event`` protobuf.
    """
    from tensorboardX.proto import event_pb2

    counts: dict[str, int] = {}
    data = path.read_bytes()
    pos = 0
    while pos < len(data):
        (length,) = struct.unpack("<Q", data[pos : pos + 8])
        event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + length])
        pos += 12 + length + 4
        for value in event.summary.value:
            counts[value.tag] = counts.get(value.tag, 0) + 1
    return counts


def test_tensorboard_export_has_one_run_per_process(run_dir, tmp_path):
    pytest.importorskip("tensorboardX", reason="the tensorboard extra is not installed")
    assert main(["export", str(run_dir), "--format", "tensorboard", "-o", str(tmp_path)]) == 0
    root = tmp_path / run_dir.name
    assert sorted(p.name for p in root.iterdir()) == ["average", "node-0", "node-1", "node-2"]
    (events,) = (root / "node-1").glob("events.out.tfevents.*")
    counts = _scalars(events)
    intervals = run_tables(run_dir, ["intervals"])["intervals"]
    assert counts["train/loss"] == np.count_nonzero(intervals["node"] == 1)
    assert counts["test/accuracy"] >= 2
    (average,) = (root / "average").glob("events.out.tfevents.*")
    assert _scalars(average)["test/loss"] >= 2


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["export", "/nonexistent/run"], "is not a run directory"),
        (["export", "{run}", "--format", "xlsx"], "invalid choice: 'xlsx'"),
        (["export", "{run}", "--format", "parquet"], "needs pyarrow"),
        (["run", "-q", "--out-dir", "{tmp}/runs", "--tensorboard", "{tmp}"], "needs tensorboardX"),
    ],
)
def test_export_errors_are_one_line_exit_2(run_dir, tmp_path, capsys, monkeypatch, argv, needle):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "tensorboardX", None)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    argv = [a.replace("{run}", str(run_dir)).replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("dasgd: error: ") and err.count("\n") == 1 and needle in err, err
