"""Suite validation and expansion, through the CLI and the public loader."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from qbench.harness.cli import cli
from qbench.harness.errors import QbenchError
from qbench.harness.suite import load_suite

SUITES = Path(__file__).parent / "suites"
BROKEN = sorted((SUITES / "broken").glob("*.yaml"))


def _expected_key(path: Path) -> str:
    first = path.read_text().splitlines()[0]
    assert first.startswith("# expect: ")
    return first[len("# expect: ") :].strip()


@pytest.mark.parametrize("path", BROKEN, ids=[p.stem for p in BROKEN])
def test_broken_suite_exits_2_with_one_line_naming_file_and_key(path: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    res = CliRunner().invoke(cli, ["run", str(path), "--out", str(out)])
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1, res.output
    assert str(path) in lines[0]
    assert _expected_key(path) in lines[0]
    assert not out.exists(), "a rejected suite must record nothing"


def test_did_you_mean(tmp_path: Path) -> None:
    with pytest.raises(QbenchError, match="did you mean 'lsq'"):
        load_suite(SUITES / "broken" / "unknown_method.yaml")


def test_missing_suite_file() -> None:
    res = CliRunner().invoke(cli, ["run", "no/such/suite.yaml"])
    assert res.exit_code == 2 and "no/such/suite.yaml" in res.output


def test_smoke_expansion_parents_first_and_ids_stable() -> None:
    s = load_suite(Path(__file__).resolve().parents[1] / "suites" / "smoke.yaml")
    seen: set[str] = set()
    for c in s.cells:
        assert c.parent is None or c.parent in seen, f"{c.label} comes before its parent"
        seen.add(c.id)
    assert len(seen) == len(s.cells)
    again = load_suite(Path(__file__).resolve().parents[1] / "suites" / "smoke.yaml")
    assert [c.id for c in again.cells] == [c.id for c in s.cells]
    baselines = {c.seed: c.id for c in s.cells if c.method == "fp32"}
    assert sorted(baselines) == [0, 1, 2]
    for c in s.cells:
        if c.method != "fp32":
            assert c.parent == baselines[c.seed], "every method cell starts from its seed's baseline"


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "s.yaml"
    p.write_text(text)
    return p


def test_recipes_override_below_and_progressive_chain(tmp_path: Path) -> None:
    s = load_suite(
        _write(
            tmp_path,
            """
name: chain
defaults: {seeds: [0, 1], recipe: {lr: 0.1, epochs: 5, weight_decay: 1.0e-4}}
experiments:
  - dataset: digits
    model: small_cnn
    recipe: {lr: 0.2}
    baseline: {recipe: {epochs: 7}}
    methods:
      - method: lsq
        bits: [W4A4, W3A3, W2A2]
        init: progressive
        recipe: {lr: 0.01}
        bit_recipes: {W2A2: {weight_decay: 3.0e-5}}
""",
        )
    )
    cells = {(c.method, c.bits_label, c.seed): c for c in s.cells}
    base = cells[("fp32", "FP32", 0)]
    assert base.recipe["lr"] == 0.2 and base.recipe["epochs"] == 7 and base.recipe["weight_decay"] == 1e-4
    w4, w3, w2 = (cells[("lsq", b, 0)] for b in ("W4A4", "W3A3", "W2A2"))
    assert (w4.parent, w3.parent, w2.parent) == (base.id, w4.id, w3.id)
    assert w3.parent_method == "lsq" and w4.parent_method == "fp32"
    assert w4.recipe["lr"] == 0.01 and w4.recipe["epochs"] == 5 and w4.recipe["weight_decay"] == 1e-4
    assert w2.recipe["weight_decay"] == 3e-5
    assert cells[("lsq", "W3A3", 1)].parent == cells[("lsq", "W4A4", 1)].id


def test_cell_id_changes_with_what_determines_the_result(tmp_path: Path) -> None:
    text = """
name: ids
experiments:
  - dataset: digits
    model: small_cnn
    baseline: {recipe: {epochs: %d}}
    comment: %s
    methods: [{method: lsq, bits: [W4A4]}]
"""
    a = load_suite(_write(tmp_path, text % (3, "one"))).cells
    b = load_suite(_write(tmp_path, text % (3, "two"))).cells
    c = load_suite(_write(tmp_path, text % (4, "one"))).cells
    assert [x.id for x in a] == [x.id for x in b], "comments do not change what a cell computes"
    assert a[0].id != c[0].id and a[1].id != c[1].id, "a new baseline recipe changes the baseline and its children"


def test_dry_run_prints_plan_and_records_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    res = CliRunner().invoke(cli, ["run", str(SUITES / "tiny.yaml"), "--out", str(out), "--dry-run"])
    assert res.exit_code == 0, res.output
    assert "3 cells" in res.output and "lsq W4A4" in res.output and "run" in res.output
    assert not (out / "mlflow.db").exists()


def test_every_shipped_suite_loads() -> None:
    shipped = sorted((Path(__file__).parents[1] / "suites").glob("*.yaml"))
    assert shipped
    for path in shipped:
        assert load_suite(path).cells, path


def test_a_cell_on_the_reference_functions_is_its_own_row() -> None:
    """suites/fused_digits_gpu.yaml runs each method twice, fused and ``fused: false``:
    the table must not average the two."""
    from qbench.harness.report import aggregate
    from qbench.harness.runner import CellResult

    suite = load_suite(Path(__file__).parents[1] / "suites" / "fused_digits_gpu.yaml")
    results = [
        CellResult(
            c.id,
            c.label,
            "done",
            {"top1": 90.0 if c.recipe.get("fused", True) else 80.0, "size_bytes": 1, "compression_ratio": 1},
        )
        for c in suite.cells
    ]
    rows = {(r["method"], r["bits"]): r for r in aggregate(suite, results)}
    assert rows[("lsq", "W4A4")]["mean"] == 90.0 and rows[("lsq", "W4A4")]["n"] == 5
    assert rows[("lsq (fused: false)", "W4A4")]["mean"] == 80.0
