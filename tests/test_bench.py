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


def _bench_json(tmp_path, *args: str) -> dict:
    out = tmp_path / "bench.json"
    base = ["bench", "--model", "small_cnn", "--batch-size", "8", "--steps", "1", "--warmup", "1", "--device", "cpu"]
    res = CliRunner().invoke(cli, [*base, *args, "--json", str(out)])
    assert res.exit_code == 0, res.output
    return json.loads(out.read_text())


def test_bench_covers_every_registered_method(tmp_path):
    """``--method all``: every method times a step, or is skipped with a one-line reason; APoT
    (whose own parameter groups once met a recipe without weight_decay) times one."""
    from qbench.methods import METHODS

    rec = _bench_json(tmp_path, "--method", "all", "--bits", "W4A4")
    rows = rec["results"]
    assert rows[0]["method"] == "fp32"
    assert sorted(r["method"] for r in rows[1:]) == [m for m in METHODS.names() if m != "fp32"]
    for r in rows:
        assert r["error"] == "", r
        assert r["step_ms"] > 0 or (r["skipped"] and "\n" not in r["skipped"]), r
    by = {r["method"]: r for r in rows}
    assert by["apot"]["label"] == "apot W4A4" and by["apot"]["step_ms"] > 0 and not by["apot"]["skipped"]
    # a method without W4A4 runs at its nearest widths and says so
    assert by["xnor"]["label"] == "xnor W1A1" and "W4A4 unsupported" in by["xnor"]["note"]
    assert by["bayesian_bits"]["label"] == "bayesian_bits W4A8"
    # Bi-Real needs its own model family (sign of a ReLU output is always +1)
    assert by["bireal"]["skipped"] and "ReLU" in by["bireal"]["skipped"]
    assert "runner step only" in by["pqf"]["note"]


def test_bench_method_lists_and_unknown_names():
    from qbench.harness.bench import expand_methods

    assert expand_methods(("lsq,apot", "lsq", " pact ")) == ["lsq", "apot", "pact"]
    res = CliRunner().invoke(cli, ["bench", "--method", "lsq,apott", "--device", "cpu"])
    assert res.exit_code == 2 and "did you mean 'apot'" in res.output


def test_bench_fused_both_times_each_path(tmp_path, monkeypatch):
    """``--fused-both`` builds each quantized row twice, with set_fused(True) and (False), and
    puts the fused row against the reference one (forced here: the CPU has no fused kernels)."""
    import qbench.harness.bench as bench_mod
    import qbench.methods.modules as modules

    monkeypatch.setattr(bench_mod, "fused_kernels_apply", lambda device: True)
    flags = []
    real = modules.set_fused

    def spy(model, enabled):
        flags.append(enabled)
        real(model, enabled)
        assert all(q.fused is enabled for q in model.modules() if isinstance(q, modules.Quantizer))
        return model

    monkeypatch.setattr(modules, "set_fused", spy)
    rec = _bench_json(tmp_path, "--method", "lsq", "--fused-both")
    rows = [(r["label"], r["path"]) for r in rec["results"]]
    assert rows == [("fp32", "-"), ("lsq W4A4", "fused"), ("lsq W4A4", "ref")]
    assert flags == [True, False]
    fp, fused, ref = rec["results"]
    assert fused["x_ref"] == pytest.approx(fused["step_ms"] / ref["step_ms"])
    assert ref["x_ref"] is None and fp["x_ref"] is None


def test_bench_on_cpu_notes_what_it_leaves_out(tmp_path):
    """The CPU has neither fused kernels nor CUDA graphs: one reference row per config, a note
    for each, and no cudagraphs rows."""
    rec = _bench_json(tmp_path, "--method", "lsq", "--fused-both", "--cudagraphs")
    assert [(r["label"], r["path"], r["mode"]) for r in rec["results"]] == [
        ("fp32", "-", "eager"),
        ("lsq W4A4", "ref", "eager"),
    ]
    assert any("cudagraphs" in n for n in rec["notes"]) and any("fused" in n for n in rec["notes"])


def test_bench_cudagraphs_alone_on_cpu_times_nothing_but_says_why():
    res = CliRunner().invoke(
        cli, ["bench", "--model", "small_cnn", "--no-eager", "--cudagraphs", "--steps", "1", "--device", "cpu"]
    )
    assert res.exit_code == 0, res.output
    assert "cudagraphs: skipped" in res.output


def test_bench_peer_torchao_same_layers_same_bits(tmp_path):
    """The torchao row: the same model and layers as LSQ's (first and last at 8 bits), torchao's
    fake-quantizers in place of ours, timed beside it."""
    pytest.importorskip("torchao", reason="torchao (optional peer) is not installed")
    from qbench.harness.models import create_model
    from qbench.harness.peers import TorchaoFakeQuantizer, TorchaoQAT
    from qbench.methods import get_method
    from qbench.methods.modules import quant_layers

    def layers(method):
        model = method.prepare(create_model("resnet20", num_classes=10, in_channels=3, image_size=32), None)
        return model, {n: (m.w_bits, m.a_bits) for n, m in quant_layers(model)}

    peer, peer_layers = layers(TorchaoQAT(4, 4))
    _, lsq_layers = layers(get_method("lsq")(4, 4))
    assert peer_layers == lsq_layers and set(peer_layers.values()) == {(4, 4), (8, 8)}
    assert all(isinstance(m.weight_quantizer, TorchaoFakeQuantizer) for _, m in quant_layers(peer))
    rec = _bench_json(tmp_path, "--method", "lsq", "--bits", "W4A4", "--bits", "W2A2", "--peer", "torchao")
    rows = {r["label"]: r for r in rec["results"]}
    for label in ("torchao W4A4", "torchao W2A2"):
        assert rows[label]["path"] == "torchao" and rows[label]["error"] == "" and rows[label]["step_ms"] > 0
        assert rows[label]["x_fp"] == pytest.approx(rows[label]["step_ms"] / rows["fp32"]["step_ms"])
    assert rec["environment"]["torchao"]


def test_bench_peer_not_installed_is_one_line_error(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else real(name, *a))
    res = CliRunner().invoke(cli, ["bench", "--model", "small_cnn", "--peer", "torchao", "--device", "cpu"])
    assert res.exit_code == 2
    assert "torchao is not installed" in res.output and len(res.output.strip().splitlines()) == 1


@pytest.mark.slow
def test_ddp_throughput_on_two_gloo_processes(tmp_path) -> None:
    out = tmp_path / "ddp.json"
    res = CliRunner().invoke(
        cli,
        [
            "bench",
            "--model",
            "small_cnn",
            "--ddp",
            "cpu,cpu",
            "--batch-size",
            "8",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--json",
            str(out),
        ],
    )
    assert res.exit_code == 0, res.output
    rows = json.loads(out.read_text())["results"]
    assert [r["run"] for r in rows] == ["1 device", "DDP x2"]
    assert {r["mode"] for r in rows} == {"eager"}  # no compiled rows off CUDA
    assert all(r["images_per_s"] > 0 for r in rows) and rows[0]["speedup"] == 1.0
    assert "speed-up" in res.output


def test_ddp_needs_two_devices() -> None:
    res = CliRunner().invoke(cli, ["bench", "--model", "small_cnn", "--ddp", "cpu"])
    assert res.exit_code == 2 and "--ddp" in res.output


def test_cells_with_cuda_graphs_mark_each_step_and_batch(monkeypatch):
    """A cell with ``compile`` and ``cudagraphs`` tells the graphs where each training step
    and evaluation batch begins (the previous replay's outputs are done with); without
    ``cudagraphs`` nothing is marked. (The marks are what the CPU can check.)"""
    import torch
    from qbench.harness import train
    from qbench.methods.recipe import Recipe
    from torch import nn

    class Split:
        def batches(self, batch_size, train=False, device=None, generator=None, channels_last=False, drop_last=False):
            g = torch.Generator().manual_seed(0)
            for _ in range(3):
                yield torch.randn(4, 5, generator=g), torch.randint(0, 2, (4,), generator=g)

    marks = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    cpu = torch.device("cpu")
    for graphs, expected in ((True, 6), (False, 0)):
        marks.clear()
        r = Recipe(compile=True, cudagraphs=graphs, batch_size=4, eval_batch_size=4)
        monkeypatch.setattr(train, "uses_cudagraphs", lambda r, d: r.compile and r.cudagraphs)  # as on CUDA
        model = nn.Linear(5, 2)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        step = train.make_train_step(model, opt, r, cpu)
        for x, y in Split().batches(4):
            step(x, y)
        train.evaluate(model, Split(), r, cpu)
        assert len(marks) == expected, (graphs, len(marks))


def test_evaluation_builds_no_autograd_graph():
    """The shared evaluation loop runs under no_grad: with a graph, its summed loss would keep
    every batch's activations alive (a 500-image ImageNet evaluation grew to 22 GB)."""
    import torch
    from qbench.harness import train
    from qbench.methods.recipe import Recipe
    from torch import nn

    seen = []

    class Probe(nn.Linear):
        def forward(self, x):
            seen.append(torch.is_grad_enabled())
            return super().forward(x)

    class Split:
        def batches(self, batch_size, train=False, device=None, channels_last=False):
            yield torch.randn(4, 5), torch.randint(0, 2, (4,))

    train.evaluate(Probe(5, 2), Split(), Recipe(eval_batch_size=4), torch.device("cpu"))
    assert seen == [False]


@pytest.mark.parametrize("model", ["resnet20", "bireal_resnet20"])
def test_cifar_models_are_timed_at_their_own_32px_input(tmp_path, model):
    """A CIFAR network (Bi-Real's included) is timed on 32x32 inputs with 10 classes unless
    told otherwise, never at ImageNet's 224 px."""
    out = tmp_path / "bench.json"
    args = ["bench", "--model", model, "--method", "bireal" if "bireal" in model else "lsq"]
    res = CliRunner().invoke(
        cli, [*args, "--batch-size", "2", "--steps", "1", "--warmup", "0", "--device", "cpu", "--json", str(out)]
    )
    assert res.exit_code == 0, res.output
    assert f"{model} @ 32px" in res.output
    assert json.loads(out.read_text())["results"][1]["error"] == ""
