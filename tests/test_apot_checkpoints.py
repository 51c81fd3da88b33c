"""The official APoT CIFAR-10 checkpoints, imported by ``qbench evaluate``, score what the
official code scores on the same images.

How the official code was run. The official repository (github.com/yhhhli/APoT_Quantization
at its last commit, 13204f1; CIFAR10/models/resnet.py and quant_layer.py, run unmodified
outside this project) was driven exactly as its CIFAR10/main.py does for ``-e --init
<checkpoint> --bit <b>``: ``resnet20_cifar(float=b == 32)``, the quantizers replaced for
bits < 32 as main.py does, the ``module.``-prefixed state_dict loaded into
``nn.DataParallel(model)``, ``model.eval()``, batches of 100 in file order,
``transforms.ToTensor()`` + ``Normalize(mean=[0.491, 0.482, 0.447],
std=[0.247, 0.243, 0.262])``; the only change is the images: the 10,000 JPEGs of
../shared/data/cifar10-jpeg/test.tar.gz read by ``torchvision.datasets.ImageFolder`` (PIL)
instead of the PNG-derived pickle batches. CPU, torch 2.14.1, 2026-11-27. The README's
numbers (92.96 / 92.45 / 92.49 / 90.96) are for the original test images.

Why a tolerance, and how large. The quantized networks are sensitive to the last bit of a
convolution's result: an activation that lands on a quantization boundary rounds either
way, and which way depends on the CPU convolution backend and kernel (oneDNN, NNPACK or
im2col + GEMM, chosen by flags, batch size, instruction set). qbench's CPU evaluation pins
all of this (``qbench.harness.determinism``: one thread, oneDNN and NNPACK off, sums of
products and reductions in float64 and rounded back to float32, so that the result is
the correctly rounded one whatever the algorithm; ``tests/test_determinism.py``): its
numbers are bit-for-bit the same with 1 or 2 threads, under load, on any CPU. The official
code's top-1 under each setting (2 cores of a machine shared with other jobs, load average
4-7 during these runs; "." where a setting was not run for that checkpoint; earlier runs of
the official code on 2026-11-22 gave 82.82 and 82.85 at 4 bits):

==========================================  ======  ======  ======  ======
official code, top-1 %                      32 bit  4 bit   3 bit   2 bit
==========================================  ======  ======  ======  ======
pinned as qbench (``deterministic_cpu()``)  82.36   82.85   83.01   80.60
oneDNN (default), 2 threads                 82.36   82.90   83.05   80.61
oneDNN, 1 thread                            82.36   82.90   .       .
oneDNN off (NNPACK), 1 thread               82.36   82.84   83.03   80.72
oneDNN off (NNPACK), 2 threads              82.36   82.84   .       .
spread (max - min)                          0.00    0.06    0.04    0.12
==========================================  ======  ======  ======  ======

OFFICIAL_TOP1 is the first row (the official code under the same pinned setting as qbench),
and TOLERANCE the largest spread of the official code across these settings (0.12 points,
12 images, at 2 bits: NNPACK's convolution against the others). qbench pinned scores
82.36 / 82.88 / 83.02 / 80.58; its remaining 0-3 images of difference to the official code
under the same pinning come from the input normalisation (qbench's fused
``x * (1/(255 std)) - mean/std`` and torchvision's ``(x/255 - mean)/std`` differ in the
last bit for 71 % of the input values): fed the official code's input tensors, qbench's
4-bit network gives the official predictions on all 10,000 images.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

#: top-1 (%) of the official code on the CIFAR-10-JPEG test split, per checkpoint bits, on
#: the CPU pinned as qbench evaluates (``qbench.harness.determinism.deterministic_cpu``)
OFFICIAL_TOP1 = {32: 82.36, 4: 82.85, 3: 83.01, 2: 80.60}
#: the largest spread (max - min, points) of the official code's own top-1 across CPU
#: settings (backend, threads, load): see the module docstring
TOLERANCE = 0.12
#: the checkpoints' own ``best_prec`` (the authors' number on the original test images)
BEST_PREC = {32: 92.96, 4: 92.47, 3: 92.51, 2: 90.96}
OFFICIAL_NORM = {"mean": [0.491, 0.482, 0.447], "std": [0.247, 0.243, 0.262]}
#: the checkpoints evaluated: every one with ``QBENCH_ALL_CHECKPOINTS=1``; else the 4-bit
#: (the README's example) and the 2-bit (the other level set), one round of two pinned
#: evaluations on a 2-core CI machine instead of two rounds (about two minutes)
CHECKED = (32, 4, 3, 2) if os.environ.get("QBENCH_ALL_CHECKPOINTS") == "1" else (4, 2)


@pytest.fixture(scope="module")
def apot_data(shared_data):
    ckpts = shared_data / "apot"
    jpeg = shared_data / "cifar10-jpeg"
    if not (ckpts / "res20_4bit.pth.tar").is_file() or not (jpeg / "test.tar.gz").is_file():
        pytest.skip(f"APoT checkpoints or CIFAR-10-JPEG not found under {shared_data}")
    return ckpts, {"path": str(jpeg), "format": "jpeg", **OFFICIAL_NORM}


_EVALUATE = """
import json, sys
from qbench.harness.evaluate import evaluate_checkpoint
bits = int(sys.argv[2])
m = evaluate_checkpoint(sys.argv[1], model="resnet20", dataset="cifar10", method="apot", bits=f"W{bits}A{bits}",
                        dataset_options=json.loads(sys.argv[3]), batch_size=1000, device="cpu", track=False)
print(json.dumps(m))
"""


@pytest.fixture(scope="module")
def official_scores(apot_data) -> dict[int, dict]:
    """The four checkpoints evaluated, each in its own process, as many at a time as there
    are cores: the pinned evaluation is single-threaded and gives the same result whatever
    runs beside it, so running them side by side only saves time."""
    ckpts, dataset_options = apot_data

    def one(bits: int) -> dict:
        res = subprocess.run(
            [sys.executable, "-c", _EVALUATE, str(ckpts / f"res20_{bits}bit.pth.tar"), str(bits)]
            + [json.dumps(dataset_options)],
            capture_output=True,
            text=True,
            timeout=1800,
        )
        assert res.returncode == 0, res.stderr[-3000:]
        return json.loads(res.stdout.strip().splitlines()[-1])

    with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        return dict(zip(CHECKED, pool.map(one, CHECKED), strict=True))


@pytest.mark.parametrize("bits", [32, 4, 3, 2])
def test_official_checkpoint_matches_official_code(official_scores, bits, record_property):
    if bits not in CHECKED:
        pytest.skip(f"{bits}-bit checkpoint: with QBENCH_ALL_CHECKPOINTS=1 (CI checks {CHECKED} for time)")
    m = official_scores[bits]
    record_property("top1", m["top1"])
    assert m["n_images"] == 10000
    assert abs(m["top1"] - OFFICIAL_TOP1[bits]) <= TOLERANCE + 1e-9, (m["top1"], OFFICIAL_TOP1[bits])
    if bits < 32:
        assert m["bit_audit_ok"] == 1.0


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qbench.harness.cli", *args], capture_output=True, text=True)


def test_evaluate_cli_records_the_run(apot_data, tmp_path):
    ckpts, opts = apot_data
    out = tmp_path / "out"
    r = _cli(
        "evaluate", str(ckpts / "res20_2bit.pth.tar"), "--model", "resnet20",
        "--dataset", "cifar10", "--method", "apot", "--bits", "W2A2", "--device", "cpu",
        "--dataset-option", f"path={opts['path']}", "--dataset-option", "format=jpeg",
        "--dataset-option", "mean=[0.491,0.482,0.447]", "--dataset-option", "std=[0.247,0.243,0.262]",
        "--dataset-option", "test_limit=1000", "--dataset-option", "limit=1000",
        "--out", str(out),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "top-1" in r.stdout and "recorded" in r.stdout
    from qbench.harness.tracking import Tracker, default_uri

    runs = list(Tracker(default_uri(out)).runs().values())
    assert len(runs) == 1
    run = runs[0]
    assert run.status == "done"
    assert run.tags["qbench.method"] == "apot" and run.tags["qbench.w_bits"] == "2"
    assert run.tags["qbench.suite"] == "imported"
    assert 50.0 < run.metrics["top1"] < 95.0 and run.metrics["n_images"] == 1000
    assert run.metrics["compression_ratio"] > 10  # 2-bit weights, 8-bit first/last


def test_corrupt_or_mismatched_checkpoint_exits_2(apot_data, tmp_path):
    ckpts, opts = apot_data
    bad = tmp_path / "bad.pth.tar"
    bad.write_bytes((ckpts / "res20_4bit.pth.tar").read_bytes()[:5000])  # truncated
    base = [
        "--model", "resnet20", "--dataset", "cifar10", "--method", "apot", "--device", "cpu",
        "--dataset-option", f"path={opts['path']}", "--dataset-option", "format=jpeg",
        "--dataset-option", "limit=10", "--dataset-option", "test_limit=10", "--no-track",
    ]  # fmt: skip
    r = _cli("evaluate", str(bad), "--bits", "W4A4", *base)
    assert r.returncode == 2
    assert "bad.pth.tar" in r.stderr and "cannot read the checkpoint" in r.stderr
    assert "Traceback" not in r.stderr
    # a 32-bit checkpoint has no clipping thresholds: it does not fit a W4A4 model
    r = _cli("evaluate", str(ckpts / "res20_32bit.pth.tar"), "--bits", "W4A4", *base)
    assert r.returncode == 2 and "does not fit" in r.stderr, r.stderr
