"""``qbench bench``: times full training steps of a method against full precision."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from qbench.harness.bench import BenchConfig, parse_bits, run_bench
from qbench.harness.cli import cli
from qbench.harness.errors import QbenchError


def test_parse_bits():
    assert parse_bits("W4A4") == (4, 4) and parse_bits("w2a8") == (2, 8)
    with pytest.raises(QbenchError, match="W<bits>A<bits>"):
        parse_bits("4bit")


def test_bench_cli_writes_records_with_ratios(tmp_path):
    out = tmp_path / "bench.json"
    res = CliRunner().invoke(
        cli,
        [
            "bench",
            "--model",
            "small_cnn",
            "--method",
            "lsq",
            "--bits",
            "W4A4",
            "--bits",
            "W2A2",
            "--batch-size",
            "8",
            "--steps",
            "3",
            "--warmup",
            "1",
            "--device",
            "cpu",
            "--json",
            str(out),
        ],
    )
    assert res.exit_code == 0, res.output
    assert "lsq W4A4" in res.output and "x FP" in res.output
    rec = json.loads(out.read_text())
    assert rec["environment"]["torch"] and rec["config"]["model"] == "small_cnn"
    rows = {r["label"]: r for r in rec["results"]}
    assert set(rows) == {"fp32", "lsq W4A4", "lsq W2A2"}
    fp = rows["fp32"]
    assert fp["x_fp"] == 1.0 and fp["error"] == ""
    for r in rows.values():
        assert r["mode"] == "eager" and r["step_ms"] > 0
        assert r["images_per_s"] == pytest.approx(8 / (r["step_ms"] / 1000))
        assert r["x_fp"] == pytest.approx(r["step_ms"] / fp["step_ms"])
        assert r["step_ms_p10"] <= r["step_ms"] <= r["step_ms_p90"]


def test_bench_compiled_mode():
    """The compiled path (dynamo with its eager backend: cheap on a CPU)."""
    import torch

    cfg = BenchConfig(
        model="small_cnn",
        batch_size=16,
        image_size=8,
        num_classes=10,
        in_channels=1,
        methods=[("lsq", 4, 4)],
        modes=("compiled",),
        steps=2,
        warmup=1,
        compile_backend="eager",
    )
    results = run_bench(cfg, torch.device("cpu"))
    assert [(r.label, r.mode, r.error) for r in results] == [
        ("fp32", "compiled", ""),
        ("lsq W4A4", "compiled", ""),
    ]
    assert all(r.step_ms > 0 for r in results)


def test_bench_times_an_epoch_of_a_real_dataset():
    import torch

    cfg = BenchConfig(
        model="small_cnn",
        batch_size=256,
        image_size=8,
        num_classes=10,
        in_channels=1,
        modes=("eager",),
        steps=1,
        warmup=0,
        dataset="digits",
    )
    (fp,) = run_bench(cfg, torch.device("cpu"))
    assert fp.epoch_images == 1437 // 256 * 256 and fp.epoch_s > 0  # digits' training split


def test_bench_rejects_bad_input():
    runner = CliRunner()
    res = runner.invoke(cli, ["bench", "--model", "small_cnn", "--bits", "4", "--device", "cpu"])
    assert res.exit_code == 2 and "W<bits>A<bits>" in res.output
    res = runner.invoke(cli, ["bench", "--model", "resnet81", "--device", "cpu"])
    assert res.exit_code == 2 and "did you mean" in res.output
    res = runner.invoke(cli, ["bench", "--method", "lsqq", "--device", "cpu"])
    assert res.exit_code == 2 and "unknown method" in res.output
