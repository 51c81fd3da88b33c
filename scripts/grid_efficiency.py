"""Grid efficiency of ``qbench run`` on one GPU against several (the scale-out figure).

    python scripts/grid_efficiency.py --data-root DATA --devices cuda:0,cuda:1 [--suite suites/grid8_cifar10_gpu.yaml]

Runs the suite twice into two fresh output folders, first on the first device alone, then
on all of them, and prints both wall times and the efficiency ``T1 / (N x TN)`` (1.0:
perfect; the acceptance asks for >= 0.9 on two GPUs). The dataset's decoded cache is built
by a first untimed dry pass (``--warm``), so neither timing includes it.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(suite: str, data_root: str, devices: str, out: Path) -> float:
    cmd = [sys.executable, "-m", "qbench.harness.cli", "run", suite, "--out", str(out), "--data-root", data_root]
    cmd += ["--device", devices, "--no-leaderboard"]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", default="suites/grid8_cifar10_gpu.yaml")
    ap.add_argument("--data-root", required=True)
    ap.add_argument("--devices", default="cuda:0,cuda:1")
    ap.add_argument("--warm", action="store_true", help="Run the suite once on all devices first (untimed).")
    args = ap.parse_args()
    devices = args.devices.split(",")
    root = Path(tempfile.mkdtemp(prefix="grid-"))
    try:
        if args.warm:
            run(args.suite, args.data_root, args.devices, root / "warm")
        t1 = run(args.suite, args.data_root, devices[0], root / "one")
        tn = run(args.suite, args.data_root, args.devices, root / "many")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    n = len(devices)
    print(f"1 device ({devices[0]}): {t1:.1f} s; {n} devices ({args.devices}): {tn:.1f} s")
    print(f"speed-up {t1 / tn:.2f}x, grid efficiency {t1 / (n * tn):.3f}")


if __name__ == "__main__":
    main()
