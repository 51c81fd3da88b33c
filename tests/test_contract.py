"""The method contract: cell identity from validated options and method versions, a method
that owns its training through ``ctx.fit``, the layering (methods import nothing from the
harness), and the plans and errors a user acts on."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from qbench.harness.cli import cli
from qbench.harness.errors import QbenchError
from qbench.harness.suite import load_suite
from qbench.methods import METHODS, Method, MethodContext, Paper, get_method
from qbench.methods.modules import Quantizer

REPO = Path(__file__).resolve().parents[1]


def _suite(tmp_path: Path, method_block: str, name: str = "contract") -> Path:
    p = tmp_path / f"{name}.yaml"
    p.write_text(
        f"""
name: {name}
defaults:
  seeds: [0]
  recipe: {{batch_size: 128, lr: 0.05, calib_batches: 1}}
experiments:
  - dataset: digits
    model: small_cnn
    model_options: {{width: 8}}
    baseline: {{recipe: {{epochs: 1}}}}
    methods:
{method_block}
"""
    )
    return p


def _method_cell(path: Path, method: str):
    return next(c for c in load_suite(path).cells if c.method == method)


def test_defaults_written_out_give_the_same_cell_id(tmp_path):
    defaults = get_method("lsq").Options().model_dump(mode="json")
    assert defaults, "LSQ has options with defaults"
    written = ", ".join(f"{k}: {v if not isinstance(v, bool) else str(v).lower()}" for k, v in defaults.items())
    empty = _suite(tmp_path, "      - {method: lsq, bits: [W4A4], options: {}}", name="a")
    full = _suite(tmp_path, f"      - {{method: lsq, bits: [W4A4], options: {{{written}}}}}", name="b")
    a, b = _method_cell(empty, "lsq"), _method_cell(full, "lsq")
    assert a.options == b.options == defaults
    assert a.id == b.id and a.group == b.group
    other = _suite(tmp_path, "      - {method: lsq, bits: [W4A4], options: {first_last: fp}}", name="c")
    assert _method_cell(other, "lsq").id != a.id, "a changed option is another cell"


def test_a_bumped_method_version_gives_new_cell_ids(tmp_path, monkeypatch):
    path = _suite(tmp_path, "      - {method: lsq, bits: [W4A4]}")
    before = _method_cell(path, "lsq")
    base_before = next(c for c in load_suite(path).cells if c.method == "fp32")
    monkeypatch.setattr(get_method("lsq"), "version", get_method("lsq").version + 1)
    after = _method_cell(path, "lsq")
    assert after.id != before.id and after.method_version == before.method_version + 1
    assert next(c for c in load_suite(path).cells if c.method == "fp32").id == base_before.id, "others unchanged"


def test_seed_groups_are_the_same_configuration(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(
        _suite(tmp_path, "      - {method: lsq, bits: [W4A4, W2A2]}").read_text().replace("seeds: [0]", "seeds: [0, 1]")
    )
    cells = load_suite(path).cells
    groups = {}
    for c in cells:
        groups.setdefault((c.method, c.w_bits), set()).add(c.group)
    assert all(len(g) == 1 for g in groups.values()), "the seeds of one configuration share a group"
    assert len({next(iter(g)) for g in groups.values()}) == 3, "fp32, W4A4 and W2A2 are three groups"


def test_pydantic_prefix_does_not_leak(tmp_path):
    path = _suite(tmp_path, "      - {method: lsq, bits: [W3A33]}")
    with pytest.raises(QbenchError) as e:
        load_suite(path)
    assert "Value error" not in str(e.value) and "activation bits 33 out of range" in str(e.value)


def test_unknown_option_says_did_you_mean_and_the_known_ones(tmp_path):
    path = _suite(tmp_path, "      - {method: lsq, bits: [W4A4], options: {first_lst: fp}}")
    with pytest.raises(QbenchError, match=r"did you mean 'first_last'.*lsq options:"):
        load_suite(path)


def test_methods_import_nothing_from_the_harness():
    offenders = []
    for f in sorted((REPO / "methods").rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            offenders += [f"{f.name}: {n}" for n in names if n.startswith("qbench.harness")]
    assert not offenders, offenders


def test_every_hook_the_harness_calls_is_declared_on_method():
    for hook in (
        "prepare",
        "calibrate",
        "train",
        "extra_loss",
        "param_groups",
        "on_step",
        "finalize",
        "footprint",
        "load_parent",
        "import_checkpoint",
    ):
        assert callable(getattr(Method, hook)), hook
    for attr in ("needs_teacher", "status", "version", "comment", "init", "Options", "paper"):
        assert hasattr(Method, attr), attr


# -- a method that owns its training --------------------------------------------------


class _Scale(Quantizer):
    """A trivial learnable scale on the input (a stand-in for a codebook)."""

    def __init__(self):
        super().__init__(bits=32)
        self.gain = torch.nn.Parameter(torch.ones(()))

    def forward(self, x):
        return x * self.gain


class OwnTraining(Method):
    """Two stages, like BGD and Bayesian Bits: distillation from the teacher with every
    parameter, then a stage that trains nothing but its own parameters."""

    name = "own_training"
    paper = Paper(title="test", authors="qbench", venue="tests", year=2026)
    needs_teacher = True
    seen: dict = {}

    def train(self, model, ctx: MethodContext) -> bool:
        type(self).seen["teacher"] = ctx.teacher is not None and not ctx.teacher.training
        type(self).seen["recipe_epochs"] = ctx.recipe.epochs
        teacher = ctx.teacher

        def distill(m, x, y, out):
            with torch.no_grad():
                t = teacher(x)
            return F.kl_div(F.log_softmax(out.float(), 1), F.softmax(t.float(), 1), reduction="batchmean")

        first = ctx.fit(model, stage="distill", loss_fn=distill)
        ctx.save_state({"after": "distill", "best": first["best_test"]})
        head = [p for n, p in model.named_parameters() if n.startswith("classifier") or n.endswith("fc.weight")]
        ctx.fit(model, stage="head", epochs=1, param_groups=[{"params": head or list(model.parameters())[-1:]}])
        type(self).seen["state"] = ctx.load_state()
        type(self).seen["eval"] = ctx.evaluate(model)
        ctx.log({"own_metric": 1.5})
        return True


@pytest.fixture
def own_training():
    METHODS._items[OwnTraining.name] = OwnTraining
    OwnTraining.seen = {}
    yield OwnTraining
    METHODS._items.pop(OwnTraining.name, None)


def test_a_method_that_owns_its_training_gets_the_harness_loop(tmp_path, own_training):
    import mlflow
    from qbench.harness.executor import LocalExecutor
    from qbench.harness.progress import Reporter
    from qbench.harness.runner import RunContext
    from qbench.harness.tracking import default_uri

    path = _suite(tmp_path, "      - {method: own_training, bits: [W32A32], recipe: {epochs: 2}}")
    suite = load_suite(path)
    out = tmp_path / "out"
    ctx = RunContext(out_dir=out, tracking_uri=default_uri(out))
    results = LocalExecutor(["cpu"]).run(suite.cells, ctx, Reporter(len(suite.cells)))
    assert [r.status for r in results] == ["done", "done"], [r.error for r in results]
    seen = own_training.seen
    assert seen["teacher"] and seen["recipe_epochs"] == 2
    assert seen["state"]["after"] == "distill"
    assert 0 <= seen["eval"]["top1"] <= 100 and seen["eval"]["n_images"] > 0
    client = mlflow.tracking.MlflowClient(default_uri(out))
    run_id = results[1].run_id
    assert [m.step for m in client.get_metric_history(run_id, "distill/test_top1")] == [1, 2]
    assert [m.step for m in client.get_metric_history(run_id, "head/train_loss")] == [1]
    assert client.get_run(run_id).data.metrics["own_metric"] == 1.5
    assert results[1].metrics["best_epoch"] == 1, "the last stage's history gives best_*"
    assert not [p.name for p in (out / "cells" / results[1].cell_id).iterdir() if p.name != "model.pt"], (
        "resumable state is cleared once the cell finished"
    )


# -- plans and errors -----------------------------------------------------------------


def _qbench(*args, **kw):
    return subprocess.run([sys.executable, "-m", "qbench.harness.cli", *args], capture_output=True, text=True, **kw)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_device_without_a_gpu_is_one_line_before_anything_runs(tmp_path):
    path = _suite(tmp_path, "      - {method: lsq, bits: [W4A4]}")
    out = tmp_path / "out"
    res = CliRunner().invoke(cli, ["run", str(path), "--out", str(out), "--device", "cuda:0"])
    assert res.exit_code == 2
    lines = [x for x in res.output.splitlines() if x.strip()]
    assert len(lines) == 1 and "cuda:0" in lines[0] and "no CUDA GPU" in lines[0]
    assert not out.exists()
    res = CliRunner().invoke(cli, ["run", str(path), "--out", str(out), "--device", "tpu"])
    assert res.exit_code == 2 and "tpu" in res.output and not out.exists()


def test_dry_run_times_each_cell_and_checks_the_data(tmp_path):
    path = _suite(tmp_path, "      - {method: lsq, bits: [W4A4]}")
    res = CliRunner().invoke(cli, ["run", str(path), "--out", str(tmp_path / "out"), "--dry-run"])
    assert res.exit_code == 0, res.output
    assert "2 cells to run, about" in res.output and "~" in res.output
    assert not (tmp_path / "out").exists(), "a dry run records nothing"
    missing = tmp_path / "missing.yaml"
    missing.write_text(
        path.read_text().replace("dataset: digits", "dataset: cifar10\n    dataset_options: {download: false}")
    )
    res = CliRunner().invoke(
        cli, ["run", str(missing), "--out", str(tmp_path / "out"), "--dry-run", "--data-root", str(tmp_path / "nodata")]
    )
    assert res.exit_code == 2, res.output
    lines = [x for x in res.output.splitlines() if x.strip() and not x.startswith("suite ")]
    assert len(lines) == 1 and "cifar10 not found" in lines[0] and "--data-root" in lines[0]


def test_a_killed_cell_shows_as_killed_not_running(tmp_path):
    from qbench.harness.tracking import PID, Tracker, default_uri

    path = _suite(tmp_path, "      - {method: lsq, bits: [W4A4]}")
    cell = load_suite(path).cells[0]
    out = tmp_path / "out"
    out.mkdir()
    tracker = Tracker(default_uri(out), out / "mlartifacts")
    run_id = tracker.start(cell)
    res = _qbench("show", str(path), "--out", str(out))
    assert " running " in res.stdout, "this process is alive: running"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    tracker.set_tags(run_id, {PID: str(dead.pid)})
    res = _qbench("show", str(path), "--out", str(out))
    assert res.returncode == 0 and " killed " in res.stdout and " running " not in res.stdout, res.stdout
