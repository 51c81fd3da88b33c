"""Third-party plugins, installed as real distributions (``pip install --target``, no network)
and used through the real CLI in subprocesses with ``PYTHONPATH`` pointing at them:

* ``examples/qbench-twn``: the ``twn`` method (``qbench.methods``);
* ``tests/fixtures/broken_plugin``: a method whose module fails to import, which costs
  only itself (one warning line) until a suite asks for it (exit 2, one line), and a
  reported-number package (``qbench.reported``) that loads all the same;
* a second distribution registering ``twn`` again, made here: a suite using ``twn`` is then
  refused with an error naming both distributions.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest
from qbench.leaderboard import reported
from qbench.leaderboard.reported import parse_reported

REPO = Path(__file__).resolve().parents[1]
TWN_DIST = REPO / "examples" / "qbench-twn"
BROKEN_DIST = Path(__file__).resolve().parent / "fixtures" / "broken_plugin"
FIXTURE_YAML = BROKEN_DIST / "qbench_broken_reported" / "fixture.yaml"

SUITE = """\
name: plugins
defaults:
  seeds: [0]
  recipe: {{batch_size: 128, lr: 0.05, calib_batches: 1}}
experiments:
  - dataset: digits
    model: small_cnn
    model_options: {{width: 8}}
    baseline: {{recipe: {{epochs: 2}}}}
    methods:
      - method: {method}
        bits: [{bits}]
        recipe: {{epochs: 1, lr: 0.01, calib_batches: 1}}
"""


def pip_install(target: Path, *sources: Path) -> None:
    """Install local source trees into ``target``, offline, without touching the venv."""
    res = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
        + ["--no-deps", "--no-build-isolation", "--no-index", "--target", str(target)]
        + [str(s) for s in sources],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]


def copy_source(src: Path, dst: Path) -> Path:
    """A copy of a source tree (setuptools builds in place: keep the checkout clean)."""
    return Path(shutil.copytree(src, dst, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__")))


def env_with(site: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(site)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def qbench(site: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "qbench.harness.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env_with(site),
    )


def lines_naming(text: str, *words: str) -> list[str]:
    return [line for line in text.splitlines() if all(w in line for w in words)]


def write_suite(path: Path, method: str, bits: str) -> Path:
    path.write_text(SUITE.format(method=method, bits=bits), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """Both plugin distributions installed into one target folder (once per module)."""
    root = tmp_path_factory.mktemp("plugins")
    target = root / "site"
    pip_install(
        target, copy_source(TWN_DIST, root / "src" / "qbench-twn"), copy_source(BROKEN_DIST, root / "src" / "broken")
    )
    return target


@pytest.fixture(scope="module")
def twn_run(site, tmp_path_factory):
    """``qbench run`` of a tiny digits suite with the plugin method ``twn`` (and the leaderboard):
    full-precision activations (the paper) and 4-bit ones (the LSQ extension)."""
    root = tmp_path_factory.mktemp("twn_run")
    suite = write_suite(root / "twn.yaml", "twn", "W2A32, W2A4")
    out = root / "out"
    return out, qbench(site, "run", str(suite), "--out", str(out), timeout=600)


def test_list_methods_shows_the_plugin_and_warns_once_about_the_broken_one(site):
    res = qbench(site, "list", "methods")
    assert res.returncode == 0, res.stdout + res.stderr
    names = {line.split()[0] for line in res.stdout.splitlines() if line.strip()}
    assert {"twn", "lsq", "uniform", "fp32"} <= names, res.stdout
    assert "broken" not in names
    twn = next(line for line in res.stdout.splitlines() if line.startswith("twn "))
    assert "Ternary Weight Networks" in twn
    warnings = lines_naming(res.stderr, "qbench: warning:")
    assert len(warnings) == 1, res.stderr
    assert "'broken'" in warnings[0] and "qbench-broken" in warnings[0], warnings[0]


def test_run_with_the_plugin_method(site, twn_run):
    out, res = twn_run
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    from qbench.harness.tracking import Tracker, default_uri

    runs = Tracker(default_uri(out)).runs().values()
    cells = {(r.tags.get("qbench.method"), r.tags.get("qbench.w_bits"), r.tags.get("qbench.a_bits")): r for r in runs}
    assert set(cells) == {("fp32", "32", "32"), ("twn", "2", "32"), ("twn", "2", "4")}, cells.keys()
    for key in [("twn", "2", "32"), ("twn", "2", "4")]:
        twn = cells[key]
        assert twn.status == "done", key
        assert twn.metrics["bit_audit_ok"] == 1, key
        assert twn.metrics["compression_ratio"] > 4, key  # 2-bit codes (the BN layers stay FP32)
    # the leaderboard build lists every method: the broken plugin is named once, not fatal
    assert "leaderboard:" in res.stdout, res.stdout[-2000:]
    assert (out / "site" / "index.html").is_file()
    warnings = lines_naming(res.stderr, "qbench: warning:", "broken")
    assert len(warnings) == 1, res.stderr[-3000:]
    assert "qbench-broken" in warnings[0]


def test_ternary_weights_in_the_stored_footprint(site, twn_run):
    """Every quantized layer (first and last included, the official code's policy) holds
    at most three values, and is stored at 2 bits."""
    out, res = twn_run
    assert res.returncode == 0, res.stderr[-3000:]
    from qbench.harness.tracking import Tracker, default_uri

    tracker = Tracker(default_uri(out))
    twns = [r for r in tracker.runs().values() if r.tags.get("qbench.method") == "twn"]
    assert len(twns) == 2
    for twn in twns:
        a_bits = int(twn.tags["qbench.a_bits"])
        path = tracker.download(twn.run_id, "footprint.json", out / "dl" / twn.run_id)
        fp = json.loads(Path(path).read_text(encoding="utf-8"))
        assert fp["audit_ok"] is True
        quantized = [lf for lf in fp["layers"] if lf["levels_allowed"] is not None]
        assert len(quantized) == 4  # small_cnn: 3 convolutions and the classifier
        for lf in quantized:
            assert lf["w_bits"] == 2 and lf["a_bits"] == a_bits, lf
            assert lf["levels_allowed"] == 3 and 2 <= lf["distinct_max"] <= 3, lf
            assert lf["bops"] == lf["macs"] * 2 * a_bits, lf


def test_suite_using_the_broken_plugin_is_refused(site, tmp_path):
    suite = write_suite(tmp_path / "broken.yaml", "broken", "W2A32")
    res = qbench(site, "run", str(suite), "--out", str(tmp_path / "out"))
    assert res.returncode == 2, res.stdout + res.stderr
    errors = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(errors) == 1, res.stderr
    assert errors[0].startswith("qbench: error:") and "qbench-broken" in errors[0], errors[0]
    assert "'broken'" in errors[0] and "experiments[0].methods[0].method" in errors[0]
    assert not (tmp_path / "out" / "mlflow.db").exists()  # nothing recorded


def test_plugin_reported_numbers_are_loaded(site):
    code = (
        "from qbench.leaderboard.reported import load_reported\n"
        "df = load_reported()\n"
        "print(df.to_json(orient='records'))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env_with(site))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "warning" not in res.stderr, res.stderr
    rows = json.loads(res.stdout)
    mine = [r for r in rows if r["file"] == "qbench-broken:fixture.yaml"]
    expected = parse_reported(FIXTURE_YAML.read_text(encoding="utf-8"), "qbench-broken:fixture.yaml")
    keys = ("paper", "dataset", "model", "method", "w_bits", "a_bits", "notation", "metric", "value", "source")
    assert [{k: r[k] for k in keys} for r in mine] == [{k: r[k] for k in keys} for r in expected]
    assert mine and all(r["paper"] == "fixture_plugin" for r in mine)
    assert any(r["file"].startswith("methods/reported/") for r in rows)  # qbench's own still load


def test_two_distributions_registering_one_name_is_an_error(site, tmp_path):
    """A second distribution registering ``twn``, installed into the same target."""
    src = tmp_path / "clone"
    (src / "qbench_twn_clone").mkdir(parents=True)
    (src / "qbench_twn_clone" / "__init__.py").write_text("from qbench_twn.method import TWN  # noqa: F401\n")
    (src / "pyproject.toml").write_text(
        textwrap.dedent("""\
            [build-system]
            requires = ["setuptools>=68"]
            build-backend = "setuptools.build_meta"

            [project]
            name = "qbench-twn-clone"
            version = "0.2.0"

            [project.entry-points."qbench.methods"]
            twn = "qbench_twn_clone:TWN"

            [tool.setuptools]
            packages = ["qbench_twn_clone"]
            """)
    )
    target = Path(shutil.copytree(site, tmp_path / "site"))
    pip_install(target, src)
    suite = write_suite(tmp_path / "twn.yaml", "twn", "W2A32")
    res = qbench(target, "run", str(suite), "--out", str(tmp_path / "out"))
    assert res.returncode == 2, res.stdout + res.stderr
    errors = lines_naming(res.stderr, "qbench: error:")
    assert len(errors) == 1, res.stderr
    assert "'twn'" in errors[0] and "twice" in errors[0], errors[0]
    assert "qbench-twn 0.1.0" in errors[0] and "qbench-twn-clone 0.2.0" in errors[0], errors[0]


# --- the qbench.reported group in process (fake entry points) --------------------------


def _package(root: Path, name: str, files: dict[str, str]) -> None:
    pkg = root / name
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    for fname, text in files.items():
        (pkg / fname).write_text(text, encoding="utf-8")


GOOD = textwrap.dedent("""\
    paper: {key: plugin_demo, title: "A plugin's paper", authors: "A. Author", venue: arXiv, year: 2021}
    rows:
      - {dataset: digits, model: small_cnn, method: twn, w_bits: 2, a_bits: 32, metric: top1, value: 97.5,
         source: "Table 1"}
    """)


def test_reported_group_skips_a_broken_plugin_with_one_warning(tmp_path, monkeypatch, capsys):
    _package(tmp_path, "qbench_demo_reported", {"demo.yaml": GOOD, "notes.txt": "not read"})
    monkeypatch.syspath_prepend(str(tmp_path))
    eps = [
        EntryPoint(name="ghost", value="qbench_no_such_package.reported", group=reported.GROUP),
        EntryPoint(name="demo", value="qbench_demo_reported", group=reported.GROUP),
    ]
    monkeypatch.setattr(reported, "entry_points", lambda group: eps if group == reported.GROUP else [])
    monkeypatch.setattr(reported, "_warned", set())
    for _ in range(2):  # warned once per process, however often the numbers are loaded
        df = reported.load_reported()
        demo = df[df["paper"] == "plugin_demo"]
        assert len(demo) == 1 and demo.iloc[0]["file"] == "unknown-distribution:demo.yaml"
        assert df["file"].str.startswith("methods/reported/").any()
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith("qbench: warning: reported numbers of plugin 'ghost' from ")
    assert "qbench_no_such_package.reported" in warnings[0] and warnings[0].endswith("; skipped")


def test_reported_group_names_a_plugin_file_in_errors(tmp_path, monkeypatch):
    bad = GOOD.replace("value: 97.5", "value: 197.5")
    _package(tmp_path, "qbench_bad_reported", {"bad.yaml": bad})
    monkeypatch.syspath_prepend(str(tmp_path))
    eps = [EntryPoint(name="bad", value="qbench_bad_reported", group=reported.GROUP)]
    monkeypatch.setattr(reported, "entry_points", lambda group: eps if group == reported.GROUP else [])
    with pytest.raises(reported.QbenchError) as err:
        reported.load_reported()
    assert "unknown-distribution:bad.yaml: rows[0].value" in str(err.value)


# --- the TWN quantizer itself (imported from the example's source tree) ----------------


@pytest.fixture
def twn_module(monkeypatch):
    monkeypatch.syspath_prepend(str(TWN_DIST))
    import qbench_twn.method

    return qbench_twn.method


def test_ternarize_follows_the_papers_threshold_and_scale(twn_module):
    import torch

    w = torch.tensor([-1.0, -0.2, 0.05, 0.3, 0.9, -0.6], requires_grad=True)
    # Delta = 0.7 * mean|w| = 0.7 * 3.05 / 6 = 0.3558; |w| > Delta: 1.0, 0.9, 0.6 -> alpha = 2.5 / 3
    q = twn_module.ternarize(w)
    alpha = 2.5 / 3
    assert torch.allclose(q, torch.tensor([-alpha, 0.0, 0.0, 0.0, alpha, -alpha]))
    g = torch.arange(6.0)
    (q * g).sum().backward()
    assert torch.equal(w.grad, g)  # straight through, Delta and alpha held constant
    # the threshold factor is an option: 0.5 keeps 0.3 too (Delta = 0.254)
    q = twn_module.ternarize(w.detach(), 0.5)
    assert torch.allclose(q.abs().unique(), torch.tensor([0.0, 2.8 / 4]))


def test_twn_layers_and_options(twn_module):
    import torch
    from pydantic import ValidationError
    from qbench.methods import MethodContext, Recipe
    from qbench.methods.modules import Identity, quant_layers
    from torch import nn

    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))
    ctx = MethodContext(device=torch.device("cpu"), recipe=Recipe())
    q = twn_module.TWN(2, 32).prepare(model, ctx)
    layers = quant_layers(q)
    assert len(layers) == 2  # first and last layers ternarized (the official code's policy)
    for _, layer in layers:
        assert isinstance(layer.weight_quantizer, twn_module.TernaryWeight)
        assert isinstance(layer.act_quantizer, Identity)
        assert layer.weight_quantizer.scale_count() == 1 and layer.weight_quantizer.max_levels() == 3
        assert layer.quantized_weight().detach().unique().numel() <= 3
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Flatten(), nn.Linear(64, 10))
    q = twn_module.TWN(2, 4, first_last="fp").prepare(model, ctx)
    assert [n for n, _ in quant_layers(q)] == ["2"]
    act = q[2].act_quantizer
    assert isinstance(act, twn_module.LearnedStepAct) and act.bits == 4
    q.train()
    out = q(torch.randn(2, 1, 8, 8))
    assert out.shape == (2, 10) and act.is_initialized() and not bool(act.signed)  # after a ReLU
    with pytest.raises(ValidationError):
        twn_module.TWN(2, 32, delta=0.7, unknown=1)
