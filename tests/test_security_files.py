"""Files a user, a shared data folder or a cache hands in are data, never code: a crafted
CIFAR batch or checkpoint is refused before anything in it runs, a refused checkpoint's
message gives no advice to load it unsafely, and CSV exports do not hand spreadsheets a
formula to run.

The hostile files here are pickles whose ``__reduce__`` calls ``os.system`` to create a
marker file: the marker must never appear."""

from __future__ import annotations

import argparse
import csv
import io
import os
import pickle
import shlex
import shutil
import struct
import tarfile
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from qbench.harness.data import load_dataset
from qbench.harness.errors import QbenchError
from qbench.harness.models import create_model
from qbench.harness.models.weights import read_state_dict, safe_load
from qbench.leaderboard import build_table
from qbench.leaderboard.export import to_csv
from qbench.leaderboard.reported import load_reported
from qbench.leaderboard.runs import Run

CIFAR10_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


class RunsACommand:
    """Unpickling this runs ``touch <marker>`` (what a crafted batch or checkpoint does)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


# -- CIFAR python batches -------------------------------------------------------------------------
class _Py2Pickler(pickle._Pickler):
    """Writes bytes as Python 2 ``str`` (SHORT_BINSTRING/BINSTRING), as cPickle did for the
    original CIFAR batches (read back as str with encoding='latin1')."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_bytes(self, obj):
        n = len(obj)
        if n < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([n]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", n) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_bytes


def original_format(obj: dict) -> bytes:
    """``obj`` pickled as the files from Krizhevsky's site: protocol 2, Python 2 strings
    (keys included), numpy 1's ``numpy.core.multiarray`` module name."""
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    raw = buf.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
    assert b"_codecs" not in raw and b"numpy._core" not in raw
    return raw


def write_cifar10(folder: Path, n: int = 3, dump=None) -> dict[str, tuple[np.ndarray, list[int]]]:
    """A cifar-10-batches-py folder in torchvision's layout (data_batch_1..5, test_batch,
    batches.meta); ``dump`` pickles each dict (default: as the original files)."""
    dump = dump or original_format
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    written = {}
    for k, name in enumerate(CIFAR10_FILES):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = [(k + i) % 10 for i in range(n)]
        batch = {b"batch_label": b"batch", b"data": data, b"labels": labels, b"filenames": [b"x.png"] * n}
        (folder / name).write_bytes(dump(batch))
        written[name] = (data, labels)
    (folder / "batches.meta").write_bytes(dump({b"label_names": [b"airplane"] * 10, b"num_vis": 3072}))
    return written


def _expected(written, names):
    images = np.concatenate([written[n][0] for n in names]).reshape(-1, 3, 32, 32)
    labels = [label for n in names for label in written[n][1]]
    return torch.from_numpy(images), labels


@pytest.mark.parametrize(
    "dump",
    [
        original_format,
        pickle.dumps,
        lambda o: pickle.dumps(o, protocol=2),  # bytes through _codecs.encode
        lambda o: pickle.dumps(o, protocol=5),  # arrays through numpy's _frombuffer
    ],
    ids=["original-py2", "py3-default", "py3-protocol2", "py3-protocol5"],
)
def test_genuine_cifar_batches_still_load(tmp_path, dump):
    written = write_cifar10(tmp_path / "root" / "cifar-10-batches-py", dump=dump)
    b = load_dataset("cifar10", str(tmp_path / "root"), download=False, cache_dir=str(tmp_path / "cache"))
    images, labels = _expected(written, CIFAR10_FILES[:5])
    assert b.variant == "pickle" and torch.equal(b.train.images, images) and b.train.labels.tolist() == labels
    images, labels = _expected(written, ["test_batch"])
    assert torch.equal(b.test.images, images) and b.test.labels.tolist() == labels
    again = load_dataset("cifar10", str(tmp_path / "root"), download=False, cache_dir=str(tmp_path / "cache"))
    assert torch.equal(again.train.images, b.train.images)  # from the tensor cache
    # the downloaded archive, read without unpacking
    shutil.make_archive(str(tmp_path / "tgz" / "cifar-10-python"), "gztar", tmp_path / "root", "cifar-10-batches-py")
    t = load_dataset("cifar10", str(tmp_path / "tgz"), download=False, cache=False)
    assert torch.equal(t.train.images, b.train.images) and torch.equal(t.test.labels, b.test.labels)


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_hostile_cifar_batch_is_refused_and_runs_nothing(tmp_path, protocol):
    marker = tmp_path / "marker"
    folder = tmp_path / "root" / "cifar-10-batches-py"
    write_cifar10(folder)
    evil = {"data": np.zeros((1, 3072), np.uint8), "labels": [RunsACommand(marker)]}
    (folder / "data_batch_1").write_bytes(pickle.dumps(evil, protocol=protocol))
    with pytest.raises(QbenchError) as e:
        load_dataset("cifar10", str(tmp_path / "root"), download=False, cache_dir=str(tmp_path / "cache"))
    assert not marker.exists(), "loading the batch ran its command"
    assert "not a CIFAR batch" in e.value.message and "system" in e.value.message
    assert e.value.where == str(folder / "data_batch_1")


def test_hostile_batch_in_the_archive_or_the_default_data_root_is_refused(tmp_path, monkeypatch):
    marker = tmp_path / "marker"
    root = tmp_path / "data"
    folder = root / "cifar-10-batches-py"
    write_cifar10(folder)
    (folder / "test_batch").write_bytes(pickle.dumps({"data": RunsACommand(marker), "labels": [0]}, protocol=2))
    # no --data-root: the default data root ($QBENCH_DATA, else <cache>/data)
    monkeypatch.setenv("QBENCH_DATA", str(root))
    monkeypatch.setenv("QBENCH_CACHE", str(tmp_path / "cache"))
    with pytest.raises(QbenchError, match="not a CIFAR batch") as e:
        load_dataset("cifar10", None, download=False)
    assert not marker.exists(), "loading the batch ran its command"
    assert e.value.where == str(folder / "test_batch")
    # the same batch inside cifar-10-python.tar.gz
    archive = tmp_path / "tgz" / "cifar-10-python.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(folder, arcname="cifar-10-batches-py")
    with pytest.raises(QbenchError, match="not a CIFAR batch") as e:
        load_dataset("cifar10", str(archive.parent), download=False, cache=False)
    assert e.value.where == f"{archive}:cifar-10-batches-py/test_batch"
    assert not marker.exists() and not list((tmp_path / "cache").rglob("cifar10-pickle-test-*"))  # nothing cached


def test_a_batch_that_is_not_a_dict_is_a_clear_error(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar10(folder)
    (folder / "data_batch_2").write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(QbenchError, match="not a CIFAR batch") as e:
        load_dataset("cifar10", str(tmp_path), download=False, cache=False)
    assert e.value.where == str(folder / "data_batch_2")


# -- checkpoints and weights files -----------------------------------------------------------------
def _hostile_files(folder: Path, marker: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        "pickle-protocol2": pickle.dumps({"w": 1, "x": RunsACommand(marker)}, protocol=2),
        "pickle-protocol4": pickle.dumps({"w": 1, "x": RunsACommand(marker)}, protocol=4),
    }
    out = {}
    for name, data in files.items():
        out[name] = folder / f"{name}.pth"
        out[name].write_bytes(data)
    out["torch-save-zip"] = folder / "zip.pth"
    torch.save({"conv.weight": torch.ones(2), "x": RunsACommand(marker)}, out["torch-save-zip"])
    out["torch-save-legacy"] = folder / "legacy.pth.tar"
    torch.save(
        {"state_dict": {"w": torch.ones(2)}, "x": RunsACommand(marker)},
        out["torch-save-legacy"],
        _use_new_zipfile_serialization=False,
    )
    assert not marker.exists()
    return out


def _assert_refused(message: str) -> None:
    assert "refused" in message and "not a plain weights file (tensors and containers only)" in message
    assert "system" in message  # names what it would have called
    assert "weights_only" not in message and "arbitrary code execution" not in message


@pytest.mark.parametrize("kind", ["pickle-protocol2", "pickle-protocol4", "torch-save-zip", "torch-save-legacy"])
def test_checkpoint_carrying_code_is_refused_without_unsafe_advice(tmp_path, kind):
    marker = tmp_path / "marker"
    path = _hostile_files(tmp_path / "ckpt", marker)[kind]
    with pytest.raises(QbenchError) as e:
        safe_load(path, str(path))
    assert not marker.exists(), "loading the checkpoint ran its command"
    _assert_refused(e.value.message)
    assert e.value.where == str(path) and "Nothing in it was run" in e.value.message
    # the ``weights`` model option reads files the same way
    with pytest.raises(QbenchError) as e:
        create_model("preact_resnet18", num_classes=10, weights=str(path))
    _assert_refused(e.value.message)
    assert str(path) in e.value.message and e.value.where == "preact_resnet18.weights"
    assert not marker.exists()


def test_checkpoint_with_other_objects_is_refused_and_says_which(tmp_path):
    path = tmp_path / "with_args.pth"  # released checkpoints often hold an argparse.Namespace
    torch.save({"state_dict": {"w": torch.ones(2)}, "args": argparse.Namespace(lr=0.1)}, path)
    with pytest.raises(QbenchError, match=r"refused: .*not a plain weights file.*argparse\.Namespace") as e:
        read_state_dict(path, "model.weights")
    assert "weights_only" not in e.value.message


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_truncated_or_corrupt_checkpoint_cannot_be_read(tmp_path, legacy):
    good = tmp_path / "good.pth"
    torch.save({"w": torch.arange(4000, dtype=torch.float32)}, good, _use_new_zipfile_serialization=not legacy)
    assert torch.equal(safe_load(good, "x")["w"], torch.arange(4000, dtype=torch.float32))
    data = good.read_bytes()
    for cut in (40, 200, len(data) // 2, len(data) - 10):
        bad = tmp_path / f"cut{cut}.pth"
        bad.write_bytes(data[:cut])
        with pytest.raises(QbenchError) as e:
            safe_load(bad, str(bad))
        assert "cannot read the checkpoint" in e.value.message and "refused" not in e.value.message
        assert "weights_only" not in e.value.message
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"this is not a checkpoint at all")
    with pytest.raises(QbenchError, match="cannot read the checkpoint"):
        safe_load(junk, "x")


# -- CSV exports -----------------------------------------------------------------------------------
HYPERLINK = '=HYPERLINK("http://x","y")'


def _run(comment: str, top1: float) -> Run:
    tags = {
        "cell_id": "digits-small_cnn-lsq-4-4-0",
        "dataset": "digits",
        "model": "small_cnn",
        "method": "lsq",
        "w_bits": "4",
        "a_bits": "4",
        "seed": "0",
        "status": "done",
        "comment": comment,
        "tolerance": "0.5",
    }
    return Run(
        run_id="r1",
        experiment="smoke",
        experiment_id="1",
        name="lsq",
        status="done",
        tags={f"qbench.{k}": v for k, v in tags.items()},
        params={},
        metrics={"top1": top1, "top5": 99.0},
        group="smoke:g1",
    )


def test_csv_export_neutralises_formulas_but_keeps_numbers():
    reported = load_reported(
        [
            (
                "methods/reported/demo.yaml",
                textwrap.dedent(f"""\
                    paper: {{key: demo, title: "Demo", authors: "A. Author", venue: ICLR, year: 2020}}
                    rows:
                      - {{dataset: digits, model: small_cnn, method: lsq, w_bits: 4, a_bits: 4, metric: top1,
                         value: 96.0, source: "Table 1", comment: '{HYPERLINK}'}}
                """),
            )
        ]
    )
    table = build_table([_run("@SUM(1+1)", 95.49)], reported, comments={"lsq": "-2+3+cmd|' /C calc'!A0"})
    row = table.iloc[0]
    assert row["comment"].startswith(HYPERLINK) and row["delta"] == pytest.approx(-0.51)

    text = to_csv(table)
    cells = dict(zip(*list(csv.reader(io.StringIO(text))), strict=True))
    assert cells["reported_comment"] == "'" + HYPERLINK
    assert cells["comment"] == "'" + row["comment"]
    assert cells["suite_comment"] == "'@SUM(1+1)"
    assert cells["method_comment"] == "'-2+3+cmd|' /C calc'!A0"
    assert cells["delta"] == "-0.51" or float(cells["delta"]) == pytest.approx(-0.51)  # a number, not text
    assert not cells["delta"].startswith("'") and cells["reported"] == "96.0"
    assert not any(v.startswith(("=", "+", "-", "@", "\t", "\r")) for v in cells.values() if v != cells["delta"])
    back = pd.read_csv(io.StringIO(text))
    assert back["delta"].iloc[0] == pytest.approx(-0.51) and back["reproduced"].iloc[0] == pytest.approx(95.49)
