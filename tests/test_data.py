"""Tests of dasgd.ml.data: loading, splitting, sharding and mini-batch sampling."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dasgd.errors import DataError
from dasgd.ml.data import (
    DATASETS,
    BatchSampler,
    Dataset,
    class_histogram,
    load_dataset,
    shard_by_label,
    shard_iid,
    steps_for_epochs,
)

# ----------------------------------------------------------------------------
# Loading bundled datasets
# ----------------------------------------------------------------------------

BUNDLED = {
    # name: (samples, features, classes)
    "digits": (1797, 64, 10),
    "breast_cancer": (569, 30, 2),
    "wine": (178, 13, 3),
    "iris": (150, 4, 3),
}


def test_datasets_constant_lists_the_bundled_sets():
    assert DATASETS == ("digits", "breast_cancer", "wine", "iris")


@pytest.mark.parametrize("name", list(BUNDLED))
def test_bundled_dataset_shapes_and_classes(name):
    m, d, c = BUNDLED[name]
    ds = load_dataset(name, test_fraction=0.2, seed=0)
    n_test = int(np.ceil(0.2 * m))
    assert isinstance(ds, Dataset)
    assert ds.name == name
    assert (ds.n_train, ds.n_test, ds.n_features, ds.n_classes) == (m - n_test, n_test, d, c)
    assert ds.X_train.shape == (m - n_test, d) and ds.X_test.shape == (n_test, d)
    assert ds.class_labels == tuple(range(c))
    for X in (ds.X_train, ds.X_test):
        assert X.dtype == np.float64 and X.flags.c_contiguous
    for y in (ds.y_train, ds.y_test):
        assert y.dtype == np.int64 and y.flags.c_contiguous
        assert y.min() >= 0 and y.max() < c
    # stratified: every class appears in both parts
    assert set(ds.y_train.tolist()) == set(range(c)) == set(ds.y_test.tolist())
    json.dumps(ds.class_labels)


def test_test_fraction_sets_the_test_size():
    ds = load_dataset("iris", test_fraction=0.5)
    assert (ds.n_train, ds.n_test) == (75, 75)


def test_standardized_train_has_zero_mean_unit_std():
    ds = load_dataset("digits")
    raw = load_dataset("digits", standardize=False)
    varying = raw.X_train.std(axis=0) > 0
    assert not varying.all()  # digits has constant (all-zero) pixels
    np.testing.assert_allclose(ds.X_train.mean(axis=0), 0.0, atol=1e-10)
    np.testing.assert_allclose(ds.X_train.std(axis=0)[varying], 1.0, atol=1e-10)
    np.testing.assert_array_equal(ds.X_train[:, ~varying], 0.0)
    # the test part uses the training statistics, so it is not exactly standardized
    assert not np.allclose(ds.X_test.mean(axis=0)[varying], 0.0, atol=1e-10)


def test_unstandardized_keeps_raw_values():
    ds = load_dataset("iris", standardize=False)
    assert ds.X_train.min() >= 0.0 and ds.X_train.max() <= 8.0


def test_same_seed_same_split_other_seed_other_split():
    a = load_dataset("wine", seed=3)
    b = load_dataset("wine", seed=3)
    c = load_dataset("wine", seed=4)
    np.testing.assert_array_equal(a.X_train, b.X_train)
    np.testing.assert_array_equal(a.y_test, b.y_test)
    assert not np.array_equal(a.X_train, c.X_train)


def test_dataset_is_frozen():
    ds = load_dataset("iris")
    with pytest.raises(dataclasses.FrozenInstanceError):
        ds.n_classes = 5  # type: ignore[misc]


# ----------------------------------------------------------------------------
# Files: svmlight and .npz
# ----------------------------------------------------------------------------


def _two_blobs(m=60, d=5, seed=0):
    rng = np.random.default_rng(seed)
    y = np.where(np.arange(m) % 2 == 0, -1.0, 1.0)
    X = rng.normal(size=(m, d)) + y[:, None]
    X[X < -0.5] = 0.0  # make it sparse-ish
    return X, y


@pytest.mark.parametrize("prefix", ["", "svmlight:"])
def test_svmlight_file_maps_minus_one_plus_one_to_zero_one(tmp_path, prefix):
    from sklearn.datasets import dump_svmlight_file

    X, y = _two_blobs()
    path = tmp_path / "blobs.svm"
    dump_svmlight_file(X, y, str(path), zero_based=False)
    ds = load_dataset(prefix + str(path), test_fraction=0.25, standardize=False)
    assert ds.name == "blobs.svm"
    assert ds.n_classes == 2 and ds.class_labels == (-1, 1)
    assert (ds.n_train, ds.n_test, ds.n_features) == (45, 15, 5)
    assert set(np.unique(ds.y_train).tolist()) == {0, 1}
    # each training row is a row of X with its label mapped -1 -> 0, +1 -> 1
    for row, label in zip(ds.X_train, ds.y_train, strict=True):
        hits = np.flatnonzero(np.all(np.isclose(X, row), axis=1))
        assert hits.size >= 1
        assert (y[hits[0]] > 0) == bool(label)


def test_svmlight_prefix_forces_the_reader_for_npz_suffix(tmp_path):
    from sklearn.datasets import dump_svmlight_file

    X, y = _two_blobs()
    path = tmp_path / "odd.npz"
    dump_svmlight_file(X, y, str(path))
    assert load_dataset(f"svmlight:{path}").n_features == 5


def test_npz_without_test_arrays_is_split(tmp_path):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(40, 3))
    y = np.array(["cat", "dog"] * 20)
    path = tmp_path / "pets.npz"
    np.savez(path, X=X, y=y)
    ds = load_dataset(str(path), test_fraction=0.25, seed=1)
    assert ds.name == "pets.npz"
    assert (ds.n_train, ds.n_test, ds.n_features) == (30, 10, 3)
    assert ds.class_labels == ("cat", "dog")
    assert class_histogram(ds.y_test, 2) == [5, 5]
    json.dumps(ds.class_labels)


def test_npz_with_test_arrays_is_not_split(tmp_path):
    rng = np.random.default_rng(0)
    X, X_test = rng.normal(size=(30, 4)), rng.normal(size=(7, 4))
    y, y_test = np.arange(30) % 3 + 5, np.array([5, 6, 7, 5, 6, 7, 8])
    path = tmp_path / "given.npz"
    np.savez(path, X=X, y=y, X_test=X_test, y_test=y_test)
    ds = load_dataset(str(path), standardize=False)
    np.testing.assert_array_equal(ds.X_train, X)
    np.testing.assert_array_equal(ds.X_test, X_test)
    # labels 5..8 (8 only in the test part) map to 0..3
    assert ds.class_labels == (5, 6, 7, 8) and ds.n_classes == 4
    np.testing.assert_array_equal(ds.y_train, y - 5)
    np.testing.assert_array_equal(ds.y_test, y_test - 5)
    std = load_dataset(str(path))
    np.testing.assert_allclose(std.X_train.mean(axis=0), 0.0, atol=1e-12)


def test_single_member_class_falls_back_to_unstratified_split(tmp_path):
    X = np.arange(20, dtype=float).reshape(10, 2)
    y = np.array([0] * 5 + [1] * 4 + [2])
    path = tmp_path / "lonely.npz"
    np.savez(path, X=X, y=y)
    ds = load_dataset(str(path), test_fraction=0.3)
    assert (ds.n_train, ds.n_test, ds.n_classes) == (7, 3, 3)


# ----------------------------------------------------------------------------
# Error paths: one-line DataError naming the bad value
# ----------------------------------------------------------------------------


def _raises(match_text, fn, *args, **kwargs):
    with pytest.raises(DataError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert match_text in message, message
    assert "\n" not in message, message
    return message


def test_unknown_name_lists_choices():
    message = _raises("'foo'", load_dataset, "foo")
    assert message.startswith("unknown dataset 'foo'")
    for name in DATASETS:
        assert name in message
    assert "svmlight" in message and ".npz" in message


@pytest.mark.parametrize(("prefix", "name"), [("", "missing.npz"), ("", "a9a"), ("svmlight:", "x")])
def test_missing_file(tmp_path, prefix, name):
    given = prefix + str(tmp_path / name)
    message = _raises(repr(given), load_dataset, given)
    assert "not found" in message


def test_directory_is_refused(tmp_path):
    _raises(str(tmp_path), load_dataset, str(tmp_path))


@pytest.mark.parametrize(
    "text",
    ["this is not svmlight\n", "1 3:1.0 2:x\n", "1 qid 1:2\n"],
)
def test_malformed_svmlight(tmp_path, text):
    path = tmp_path / "broken.txt"
    path.write_text(text)
    message = _raises(str(path), load_dataset, str(path))
    assert "malformed" in message


def test_binary_garbage_is_malformed_svmlight(tmp_path):
    path = tmp_path / "garbage.bin"
    path.write_bytes(bytes(range(256)))
    _raises(str(path), load_dataset, str(path))


def test_svmlight_with_nan_feature(tmp_path):
    path = tmp_path / "nan.svm"
    path.write_text("1 1:nan\n-1 2:1\n1 1:2\n-1 2:3\n")
    _raises("non-finite", load_dataset, str(path))


def test_svmlight_one_class(tmp_path):
    path = tmp_path / "one.svm"
    path.write_text("".join(f"1 1:{i}\n" for i in range(10)))
    _raises("one.svm", load_dataset, str(path))


def test_npz_without_y(tmp_path):
    path = tmp_path / "noy.npz"
    np.savez(path, X=np.zeros((4, 2)))
    message = _raises(str(path), load_dataset, str(path))
    assert "y" in message


@pytest.mark.parametrize(
    ("arrays", "expected"),
    [
        ({"X": np.zeros(6), "y": np.arange(6) % 2}, "2-D"),
        ({"X": np.zeros((6, 2)), "y": np.arange(5) % 2}, "must match"),
        ({"X": np.full((6, 2), np.inf), "y": np.arange(6) % 2}, "non-finite"),
        ({"X": np.zeros((6, 2)), "y": np.zeros(6)}, "at least 2"),
        ({"X": np.zeros((300, 2)), "y": np.linspace(0, 1, 300)}, "regression"),
        ({"X": np.zeros((6, 2)), "y": np.array([0.0, 1, 0, 1, 0, np.nan])}, "non-finite"),
        ({"X": np.zeros((6, 2)), "y": np.arange(6) % 2, "X_test": np.zeros((2, 2))}, "both"),
        (
            {
                "X": np.zeros((6, 2)),
                "y": np.arange(6) % 2,
                "X_test": np.zeros((2, 3)),
                "y_test": np.zeros(2),
            },
            "features",
        ),
        ({"X": np.zeros((6, 2)), "y": np.arange(6).reshape(3, 2)}, "1-D"),
    ],
)
def test_malformed_npz(tmp_path, arrays, expected):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    message = _raises(expected, load_dataset, str(path))
    assert "bad.npz" in message


def test_npz_that_is_not_an_archive(tmp_path):
    path = tmp_path / "plain.npz"
    path.write_text("hello")
    _raises(str(path), load_dataset, str(path))
    single = tmp_path / "single.npz"
    with open(single, "wb") as f:
        np.save(f, np.zeros(3))
    _raises(str(single), load_dataset, str(single))


def test_npz_with_object_array(tmp_path):
    path = tmp_path / "obj.npz"
    np.savez(path, X=np.zeros((3, 2)), y=np.array(["a", None, 1], dtype=object))
    _raises(str(path), load_dataset, str(path))


@pytest.mark.parametrize("bad", [0, 0.0, 1, 1.5, -0.1, float("nan"), True, "0.2"])
def test_bad_test_fraction(bad):
    _raises(f"test_fraction={bad!r}", load_dataset, "iris", test_fraction=bad)


def test_too_few_training_samples(tmp_path):
    path = tmp_path / "tiny.npz"
    np.savez(path, X=np.zeros((3, 2)), y=np.array([0, 1, 0]))
    _raises("tiny.npz", load_dataset, str(path), test_fraction=0.5)
    np.savez(path, X=np.zeros((1, 2)), y=np.array([0]), X_test=np.zeros((2, 2)), y_test=[0, 1])
    _raises("training", load_dataset, str(path))


@pytest.mark.parametrize("seed", [-1, 1.5, "0"])
def test_bad_seed(seed):
    _raises("seed=", load_dataset, "iris", seed=seed)


def test_huge_svmlight_is_refused_before_densifying(tmp_path):
    path = tmp_path / "wide.svm"
    # 1000 rows x 600000 features = 4.5 GiB dense
    path.write_text("".join(f"{i % 2} 600000:1\n" for i in range(1000)))
    message = _raises("1000x600000", load_dataset, str(path))
    assert "wide.svm" in message


# ----------------------------------------------------------------------------
# Sharding
# ----------------------------------------------------------------------------


def _assert_partition(shards, m):
    joined = np.concatenate(shards)
    assert joined.dtype == np.int64
    np.testing.assert_array_equal(np.sort(joined), np.arange(m))
    for s in shards:
        assert s.dtype == np.int64 and s.ndim == 1
        np.testing.assert_array_equal(s, np.sort(s))


@pytest.mark.parametrize(("m", "n"), [(10, 1), (10, 3), (10, 10), (1797, 7)])
def test_shard_iid_partitions_nearly_equally(m, n):
    shards = shard_iid(m, n, seed=5)
    assert len(shards) == n
    _assert_partition(shards, m)
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1


def test_shard_iid_is_seeded():
    a, b, c = shard_iid(100, 4, seed=1), shard_iid(100, 4, seed=1), shard_iid(100, 4, seed=2)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


@pytest.mark.parametrize(
    ("m", "n", "named"),
    [(5, 6, "n_nodes=6"), (5, 0, "n_nodes=0"), (5, -1, "n_nodes=-1"), (0, 1, "n_samples=0")],
)
def test_shard_iid_bad_sizes(m, n, named):
    with pytest.raises(DataError, match=f"^{named} is invalid") as info:
        shard_iid(m, n)
    assert "\n" not in str(info.value)


def _digits_labels():
    return load_dataset("digits", standardize=False).y_train


def _mean_tv_from_global(y, shards, n_classes):
    """Median total-variation distance between each shard's label mix and the global one."""
    global_p = np.bincount(y, minlength=n_classes) / len(y)
    tvs = []
    for s in shards:
        p = np.asarray(class_histogram(y[s], n_classes)) / len(s)
        tvs.append(0.5 * np.abs(p - global_p).sum())
    return float(np.median(tvs))


@pytest.mark.parametrize("alpha", [0.01, 0.1, 1.0, 100.0])
def test_shard_by_label_partitions_with_nonempty_shards(alpha):
    y = _digits_labels()
    shards = shard_by_label(y, 16, alpha, seed=0)
    assert len(shards) == 16
    _assert_partition(shards, len(y))
    assert all(len(s) >= 1 for s in shards)


def test_shard_by_label_skew_depends_on_alpha():
    y = _digits_labels()
    skewed = shard_by_label(y, 10, 0.05, seed=0)
    uniform = shard_by_label(y, 10, 1000.0, seed=0)
    assert _mean_tv_from_global(y, skewed, 10) > 0.5
    assert _mean_tv_from_global(y, uniform, 10) < 0.1
    # small alpha: most nodes hold few classes; large alpha: all nodes hold all classes
    n_classes_held = [np.count_nonzero(class_histogram(y[s], 10)) for s in skewed]
    assert np.median(n_classes_held) <= 4
    assert all(np.count_nonzero(class_histogram(y[s], 10)) == 10 for s in uniform)


def test_shard_by_label_is_seeded():
    y = _digits_labels()
    a, b = shard_by_label(y, 5, 0.5, seed=3), shard_by_label(y, 5, 0.5, seed=3)
    c = shard_by_label(y, 5, 0.5, seed=4)
    assert all(np.array_equal(x, z) for x, z in zip(a, b, strict=True))
    assert not all(np.array_equal(x, z) for x, z in zip(a, c, strict=True))


def test_shard_by_label_fills_empty_shards_when_nodes_equal_samples():
    y = np.array([0, 0, 0, 1, 1, 2])
    shards = shard_by_label(y, 6, 0.001, seed=0)
    _assert_partition(shards, 6)
    assert [len(s) for s in shards] == [1] * 6


def test_shard_by_label_accepts_non_integer_labels():
    y = np.array(["a", "b"] * 10)
    _assert_partition(shard_by_label(y, 3, 1.0), 20)


@pytest.mark.parametrize(
    ("n", "alpha", "text"),
    [(3, 0.0, "alpha"), (3, -1.0, "alpha"), (3, float("nan"), "alpha"), (21, 1.0, "n_nodes")],
)
def test_shard_by_label_bad_arguments(n, alpha, text):
    _raises(text, shard_by_label, np.arange(20) % 2, n, alpha)


def test_class_histogram():
    assert class_histogram(np.array([0, 2, 2, 1, 2]), 4) == [1, 1, 3, 0]
    assert class_histogram(np.array([], dtype=np.int64), 2) == [0, 0]
    assert all(type(c) is int for c in class_histogram(np.array([1]), 2))
    _raises("0..1", class_histogram, np.array([0, 2]), 2)


# ----------------------------------------------------------------------------
# Mini-batch sampling
# ----------------------------------------------------------------------------


@pytest.mark.parametrize(("m", "b"), [(10, 1), (10, 3), (10, 5), (10, 10), (7, 4)])
def test_batch_sampler_covers_every_index_once_per_epoch(m, b):
    sampler = BatchSampler(m, b, seed=11)
    n_epochs = 6
    batches = [sampler.next_batch() for _ in range(-(-n_epochs * m // b))]
    assert all(batch.shape == (b,) and batch.dtype == np.int64 for batch in batches)
    stream = np.concatenate(batches)
    for e in range(n_epochs):
        np.testing.assert_array_equal(np.sort(stream[e * m : (e + 1) * m]), np.arange(m))
    assert sampler.epoch == len(stream) // m


def test_batch_sampler_epoch_counts_completed_passes():
    sampler = BatchSampler(10, 4, seed=0)
    assert sampler.epoch == 0
    sampler.next_batch()
    sampler.next_batch()
    assert sampler.epoch == 0
    sampler.next_batch()  # 12 samples drawn: one pass done
    assert sampler.epoch == 1


def test_batch_sampler_batch_larger_than_shard():
    sampler = BatchSampler(3, 7, seed=2)
    stream = np.concatenate([sampler.next_batch() for _ in range(6)])  # 42 = 14 epochs
    assert sampler.epoch == 14
    for e in range(14):
        np.testing.assert_array_equal(np.sort(stream[3 * e : 3 * e + 3]), np.arange(3))


def test_batch_sampler_single_sample():
    sampler = BatchSampler(1, 3)
    np.testing.assert_array_equal(sampler.next_batch(), [0, 0, 0])
    assert sampler.epoch == 3


def test_batch_sampler_is_reproducible_and_seeded():
    def stream(seed):
        sampler = BatchSampler(50, 8, seed=seed)
        return np.concatenate([sampler.next_batch() for _ in range(40)])

    np.testing.assert_array_equal(stream(1), stream(1))
    assert not np.array_equal(stream(1), stream(2))


def test_batch_sampler_batches_cannot_corrupt_the_sampler():
    sampler = BatchSampler(10, 3)
    batch = sampler.next_batch()
    with pytest.raises(ValueError, match="read-only"):
        batch[0] = 99


@pytest.mark.parametrize(
    ("m", "b", "named"),
    [
        (0, 1, "n_samples=0"),
        (5, 0, "batch_size=0"),
        (-1, 2, "n_samples=-1"),
        (5, 1.5, "batch_size=1.5"),
        (True, 1, "n_samples=True"),
    ],
)
def test_batch_sampler_bad_arguments(m, b, named):
    with pytest.raises(DataError, match=f"^{re.escape(named)} is invalid"):
        BatchSampler(m, b)


@pytest.mark.parametrize(
    ("epochs", "m", "b", "steps"),
    [
        (1, 10, 3, 4),
        (3, 10, 3, 10),
        (1, 10, 10, 1),
        (0.5, 100, 10, 5),
        (0.1, 70, 7, 1),  # 0.1 * 70 / 7 is 1.0000000000000002 in floats
        (0.01, 10, 3, 1),  # at least 1
        (2.5, 1437, 32, 113),
    ],
)
def test_steps_for_epochs(epochs, m, b, steps):
    assert steps_for_epochs(epochs, m, b) == steps


@pytest.mark.parametrize(
    ("epochs", "m", "b", "named"),
    [
        (0, 10, 1, "epochs=0"),
        (-1, 10, 1, "epochs=-1"),
        (1, 0, 1, "n_samples=0"),
        (1, 10, 0, "batch_size=0"),
    ],
)
def test_steps_for_epochs_bad_arguments(epochs, m, b, named):
    with pytest.raises(DataError, match=f"^{named} is invalid"):
        steps_for_epochs(epochs, m, b)


# ----------------------------------------------------------------------------
# Import cost
# ----------------------------------------------------------------------------


def test_import_does_not_load_sklearn():
    code = "import sys, dasgd.ml.data; print('sklearn' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert out.stdout.strip() == "False"
