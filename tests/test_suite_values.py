"""Bad values in a suite are refused before anything runs, within seconds, on one line
naming the file and the key path, exit status 2, nothing recorded.

Each file in tests/suites/bad_values/ starts with ``# expect: <key path>`` (and maybe more
``# expect:`` lines, fragments of the message); cases that are binary or huge (UTF-16,
20 MB, a million-cell grid, 5,000-character names) are generated here instead.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from qbench.harness.cli import cli
from qbench.harness.errors import QbenchError
from qbench.harness.suite import MAX_CELLS, load_suite

REPO = Path(__file__).resolve().parents[1]
SUITES = Path(__file__).parent / "suites"
BAD = sorted((SUITES / "bad_values").glob("*.yaml"))
GOOD = sorted((REPO / "suites").glob("*.yaml")) + sorted(SUITES.glob("*.yaml"))
SECONDS = 5.0

OK = "name: gen\nexperiments:\n  - {dataset: digits, model: small_cnn}\n"


def _expected(path: Path) -> list[str]:
    lines = path.read_text().splitlines()
    assert lines[0].startswith("# expect: "), f"{path.name} must start with '# expect: <key path>'"
    return [line[len("# expect: ") :].strip() for line in lines if line.startswith("# expect: ")]


@pytest.fixture(scope="module", autouse=True)
def _warm() -> None:
    """Import torch, torchvision and the registries once, so the timings below measure the
    checks and not the first import."""
    load_suite(SUITES / "tiny.yaml")


def _refused(path: Path, tmp_path: Path, *expected: str) -> str:
    out = tmp_path / "out"
    start = time.monotonic()
    res = CliRunner().invoke(cli, ["run", str(path), "--out", str(out)])
    took = time.monotonic() - start
    assert res.exit_code == 2, res.output or repr(res.exception)
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1, res.output
    assert lines[0].startswith("qbench: error: "), lines[0]
    assert str(path) in lines[0], lines[0]
    for fragment in expected:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    assert len(lines[0]) < 1500, "one readable line, not the value echoed back"
    assert not out.exists(), "a refused suite records nothing"
    assert took < SECONDS, f"refused after {took:.1f} s"
    return lines[0]


@pytest.mark.parametrize("path", BAD, ids=[p.stem for p in BAD])
def test_bad_value_exits_2_with_one_line_naming_file_and_key(path: Path, tmp_path: Path) -> None:
    _refused(path, tmp_path, *_expected(path))


def _gen(tmp_path: Path, data: bytes | str, name: str = "gen.yaml") -> Path:
    p = tmp_path / name
    p.write_bytes(data.encode() if isinstance(data, str) else data)
    return p


LONG = "x" * 5000
GENERATED = {
    "utf16_bom": (OK.encode("utf-16"), ["UTF-16"]),
    "utf16_no_bom": (OK.encode("utf-16-le"), ["NUL bytes", "UTF-8"]),
    "utf32_bom": (OK.encode("utf-32"), ["UTF-32"]),
    "latin1": (("# caf\u00e9\n" + OK).encode("latin-1"), ["not UTF-8", "line 1"]),
    "control_character": ("name: gen\x01\n" + OK[10:], ["not valid YAML at line 1"]),
    "nested_10000_deep": (
        "name: gen\nexperiments:\n  - {dataset: digits, model: small_cnn, model_options: {a: "
        + "[" * 10_000
        + "]" * 10_000
        + "}}\n",
        ["line 3"],
    ),
    "long_suite_name": (f"name: {LONG}\n" + OK[10:], [": name:", "at most 100 characters"]),
    "long_model_name": (
        f"name: gen\nexperiments:\n  - {{dataset: digits, model: {LONG}}}\n",
        ["experiments[0].model:", "5000 characters"],
    ),
    "long_dataset_name": (
        f"name: gen\nexperiments:\n  - {{dataset: [digits, {LONG}], model: small_cnn}}\n",
        ["experiments[0].dataset[1]:", "5000 characters"],
    ),
    "long_method_name": (
        "name: gen\nexperiments:\n  - dataset: digits\n    model: small_cnn\n"
        f"    methods: [{{method: {LONG}, bits: [W4A4]}}]\n",
        ["experiments[0].methods[0].method:", "5000 characters"],
    ),
    "long_bits": (
        "name: gen\nexperiments:\n  - dataset: digits\n    model: small_cnn\n"
        f"    methods: [{{method: lsq, bits: [{LONG}]}}]\n",
        ["experiments[0].methods[0].bits:", "characters) is not of the form W<bits>A<bits>"],
    ),
    "long_comment": (
        f"name: gen\nexperiments:\n  - {{dataset: digits, model: small_cnn, comment: {LONG}}}\n",
        ["experiments[0].comment:", "at most 2000 characters"],
    ),
    "long_option_name": (
        "name: gen\nexperiments:\n  - {dataset: digits, model: small_cnn, dataset_options: {" + "k" * 300 + ": 1}}\n",
        ["experiments[0].dataset_options.kkkk", "MLflow stores at most 250"],
    ),
    "long_option_value": (
        "name: gen\nexperiments:\n  - {dataset: cifar10, model: resnet20, dataset_options: {path: "
        + "p" * 7000
        + "}}\n",
        ["experiments[0].dataset_options.path:", "MLflow stores parameters of at most 6,000"],
    ),
    "million_cells": (
        "name: gen\ndefaults: {seeds: ["
        + ", ".join(map(str, range(2000)))
        + "]}\nexperiments:\n  - dataset: digits\n    model: small_cnn\n    methods:\n      - {method: lsq, bits: ["
        + ", ".join(["W4A4"] * 500)
        + "]}\n",
        ["experiments[0]:", f"more than {MAX_CELLS:,} cells"],
    ),
    "two_documents": (OK + "---\n" + OK, ["not valid YAML at line 4"]),
}


@pytest.mark.parametrize("case", list(GENERATED), ids=list(GENERATED))
def test_generated_bad_file_exits_2_with_one_line(case: str, tmp_path: Path) -> None:
    data, expected = GENERATED[case]
    _refused(_gen(tmp_path, data), tmp_path, *expected)


def test_20_megabyte_file_is_refused_before_it_is_read(tmp_path: Path, monkeypatch) -> None:
    p = tmp_path / "huge.yaml"
    with p.open("wb") as fh:
        fh.write(OK.encode())
        fh.write(b"# " + b"x" * 20_000_000 + b"\n")

    def no_read(*a, **k):  # the size alone decides
        raise AssertionError("a 20 MB suite was read")

    monkeypatch.setattr(Path, "read_text", no_read)
    monkeypatch.setattr(Path, "read_bytes", no_read)
    monkeypatch.setattr(Path, "open", no_read)
    _refused(p, tmp_path, "20.0 MB", "at most 1 MB")


def test_weights_that_do_not_fit_the_model_are_refused_up_front(tmp_path: Path) -> None:
    import torch
    from qbench.harness.models import create_model

    torch.save(create_model("small_cnn", num_classes=10).state_dict(), tmp_path / "small.pth")
    suite = "name: w\nexperiments:\n  - {dataset: cifar10, model: resnet18, model_options: {weights: small.pth}}\n"
    _refused(_gen(tmp_path, suite), tmp_path, "experiments[0].model_options.weights:", "do not fit the model")


def test_weights_that_are_no_state_dict_are_refused(tmp_path: Path) -> None:
    import torch

    torch.save({"epoch": 3, "notes": ["a", "b"]}, tmp_path / "nosd.pth")
    suite = "name: w\nexperiments:\n  - {dataset: cifar10, model: resnet18, model_options: {weights: nosd.pth}}\n"
    _refused(_gen(tmp_path, suite), tmp_path, "experiments[0].model_options.weights:", "no state dict")


def test_fitting_weights_and_known_options_load(tmp_path: Path) -> None:
    import torch
    from qbench.harness.models import create_model

    torch.save(create_model("resnet18", num_classes=10, image_size=32).state_dict(), tmp_path / "r18.pth")
    suite = """
name: fine
defaults: {seeds: [0, 1], dataset_options: {limit: 100}}
experiments:
  - dataset: cifar10
    model: resnet18
    dataset_options: {format: jpeg, augment: false, mean: [0.5, 0.5, 0.5], std: [0.25, 0.25, 0.25]}
    model_options: {weights: r18.pth, stem: cifar}
  - dataset: digits                 # takes **options: an option some dataset has is fine
    model: small_cnn
    model_options: {width: 8}
    methods:
      - {method: pact, bits: [W4A4, {w: 2, a: 2}], options: {alpha_init: 3}}
"""
    s = load_suite(_gen(tmp_path, suite))
    assert {c.model for c in s.cells} == {"resnet18", "small_cnn"}
    r18 = next(c for c in s.cells if c.model == "resnet18")
    assert r18.model_options["weights"] == str((tmp_path / "r18.pth").resolve())
    assert r18.dataset_options["limit"] == 100


def test_utf8_with_bom_is_read(tmp_path: Path) -> None:
    assert load_suite(_gen(tmp_path, b"\xef\xbb\xbf" + OK.encode())).name == "gen"


@pytest.mark.parametrize("path", GOOD, ids=[p.stem for p in GOOD])
def test_the_shipped_suites_still_validate(path: Path) -> None:
    """Validation only (their data may be absent here): every shipped suite loads, and
    quickly (models are built on the meta device, torchvision's weights are not fetched)."""
    start = time.monotonic()
    suite = load_suite(path)
    assert suite.cells
    assert time.monotonic() - start < 3 * SECONDS


def test_dataset_shape_needs_no_data() -> None:
    from qbench.harness.data import dataset_shape

    assert dataset_shape("digits") == (10, 1, 8)
    assert dataset_shape("mnist") == (10, 1, 28)
    assert dataset_shape("cifar10") == (10, 3, 32)
    assert dataset_shape("cifar100") == (100, 3, 32)
    assert dataset_shape("imagenet") == (1000, 3, 224)
    assert dataset_shape("imagenet", {"image_size": 160}).image_size == 160
    assert dataset_shape("digits", {"image_size": 160}).image_size == 8, "digits takes no image_size"
    assert dataset_shape("no_such_dataset") is None


def test_errors_are_qbench_errors_for_the_loader_too(tmp_path: Path) -> None:
    with pytest.raises(QbenchError, match=r"did you mean 'width'"):
        load_suite(SUITES / "bad_values" / "model_option_typo.yaml")
    with pytest.raises(QbenchError, match=r"anchors and aliases"):
        load_suite(SUITES / "bad_values" / "billion_laughs.yaml")
