"""The reported-numbers files: every file in methods/reported/ loads, and a malformed file
is refused with an error that names the file and the row."""

from __future__ import annotations

import textwrap

import pytest
from qbench.harness.errors import QbenchError
from qbench.leaderboard.reported import COLUMNS, load_reported, parse_reported

GOOD = textwrap.dedent("""\
    paper: {key: demo, title: "A paper", authors: "A. Author", venue: ICLR, year: 2020,
            url: "https://example.org/paper"}
    rows:
      - {dataset: cifar10, model: resnet20, method: lsq, w_bits: 4, a_bits: 4, metric: top1,
         value: 91.5, source: "Table 1"}
      - {dataset: cifar10, model: resnet20, method: lqnet, w_bits: 2, a_bits: 2, metric: top1,
         value: 88.0, source: "Table 2", notation: ter/ter, comment: "ternary weights"}
      - {dataset: coco, model: maskrcnn_resnet50, method: pqf, w_bits: 8, a_bits: 32,
         metric: mask_ap, value: 30.8, source: "README", size_mb: 6.65}
""")


def test_real_files_load():
    """Every file the package ships parses (a file another engineer adds is checked here)."""
    df = load_reported()
    assert list(df.columns) == COLUMNS
    if len(df):
        assert df["value"].notna().all()
        assert df["source"].str.len().gt(0).all()
        assert df["w_bits"].between(1, 32).all() and df["a_bits"].between(1, 32).all()


def test_good_file_parses():
    df = load_reported([("methods/reported/demo.yaml", GOOD)])
    assert len(df) == 3
    first = df.iloc[0]
    assert (first["paper"], first["dataset"], first["w_bits"], first["value"]) == (
        "demo",
        "cifar10",
        4,
        91.5,
    )
    assert first["task"] == "classification" and first["paper_cite"].startswith("A. Author, A paper")
    assert df.iloc[1]["notation"] == "ter/ter"
    seg = df.iloc[2]
    assert seg["task"] == "segmentation" and seg["size_mb"] == 6.65


def _mutate(old: str, new: str) -> str:
    assert old in GOOD
    return GOOD.replace(old, new, 1)


@pytest.mark.parametrize(
    "text, where, words",
    [
        (_mutate("w_bits: 4,", "w_bits: 0,"), "rows[0].w_bits", "1..32"),
        (_mutate("w_bits: 4,", "w_bits: 33,"), "rows[0].w_bits", "1..32"),
        (_mutate("w_bits: 4,", "w_bits: '4',"), "rows[0].w_bits", "integer"),
        (_mutate("a_bits: 2,", "a_bits: ter,"), "rows[1].a_bits", "notation"),
        (_mutate("value: 91.5", "value: high"), "rows[0].value", "number"),
        (_mutate("value: 91.5", "value: 191.5"), "rows[0].value", "percent"),
        (_mutate("metric: top1,", "metric: acc,"), "rows[0].metric", "top1"),
        (_mutate(', source: "Table 1"', ""), "rows[0]", "source"),
        (_mutate('source: "Table 1"', 'source: ""'), "rows[0].source", "source"),
        (_mutate('source: "Table 1"', 'source: "T1", colour: red'), "rows[0]", "colour"),
        (_mutate("size_mb: 6.65", "size_mb: -1"), "rows[2].size_mb", "non-negative"),
        (_mutate("year: 2020", "year: twenty"), "paper.year", "integer"),
        (_mutate('title: "A paper", ', ""), "paper", "title"),
        (_mutate("rows:", "rows: []\nextra:"), "demo.yaml", "unknown key"),
        ("rows: [1, 2", "demo.yaml", "YAML"),
        ("- just a list", "demo.yaml", "mapping"),
    ],
)
def test_malformed_file_names_file_and_row(text, where, words):
    with pytest.raises(QbenchError) as e:
        load_reported([("methods/reported/demo.yaml", text)])
    msg = str(e.value)
    assert msg.startswith("methods/reported/demo.yaml"), msg
    assert where in msg and words in msg, msg


def test_duplicate_row_and_duplicate_paper_key():
    row = GOOD.splitlines()[3:5]
    with pytest.raises(QbenchError, match=r"demo\.yaml: rows\[3\].*duplicate of rows\[0\]"):
        parse_reported(GOOD + "\n".join(row) + "\n", "methods/reported/demo.yaml")
    with pytest.raises(QbenchError, match=r"other\.yaml: paper\.key.*already used by .*demo\.yaml"):
        load_reported([("methods/reported/demo.yaml", GOOD), ("methods/reported/other.yaml", GOOD)])


def test_real_rows_of_one_configuration_are_told_apart():
    """Two rows of one dataset/model/method/bits/metric must differ in `notation` (a run then
    meets only the row of its own) or `variant` (shown side by side); a difference written only
    in the comment would set both numbers against every run of that configuration."""
    df = load_reported()
    key = ["dataset", "model", "method", "w_bits", "a_bits", "metric"]
    for k, rows in df.groupby(key):
        labels = list(zip(rows["notation"], rows["variant"], strict=True))
        assert len(set(labels)) == len(labels), (k, list(rows["file"]), labels)


def test_product_quantization_rows_name_their_regime_and_size():
    """BGD and PQF: W8A32 (an 8-bit index per subvector, k = 256; activations in float), the
    regime as notation, the paper's size and ratio on every row, both regimes of both ResNets."""
    df = load_reported()
    pq = df[df["method"].isin(["bgd", "pqf"])]
    assert set(pq["paper"]) == {"bgd", "pqf"} and set(pq["file"]) == {
        "methods/reported/bgd.yaml",
        "methods/reported/pqf.yaml",
    }
    assert (pq["w_bits"] == 8).all() and (pq["a_bits"] == 32).all() and (pq["metric"] == "top1").all()
    assert pq["size_mb"].gt(0).all() and pq["compression_ratio"].gt(1).all()
    for method, rows in pq.groupby("method"):
        configs = sorted(zip(rows["model"], rows["notation"], strict=True))
        assert configs == [
            ("resnet18", "large blocks"),
            ("resnet18", "small blocks"),
            ("resnet50", "large blocks"),
            ("resnet50", "small blocks"),
        ], method
        # larger blocks: fewer bits per weight, a smaller model
        size = {(m, n): s for m, n, s in zip(rows["model"], rows["notation"], rows["size_mb"], strict=True)}
        for model in ("resnet18", "resnet50"):
            assert size[(model, "large blocks")] < size[(model, "small blocks")], (method, model)
