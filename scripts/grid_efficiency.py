"""Grid efficiency of ``qbench run`` on one GPU against several (the scale-out figure).

    python scripts/grid_efficiency.py --data-root DATA --devices cuda:0,cuda:1 [--suite suites/grid8_cifar10_gpu.yaml]

Runs the suite twice into two fresh output folders, first on the first device alone, then
on all of them, and prints both wall times and the efficiency ``T1 / (N x TN)`` (1.0:
perfect; the acceptance asks for >= 0.9 on two GPUs). With ``--warm``, an untimed copy of
the suite cut to one seed and one epoch runs first on each device (one single-device run per
device, side by side): it builds the dataset's decoded cache and the compiler's caches (one
per device index), so neither timing includes them; ``--warm-only`` does just that.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml


def command(suite: str, data_root: str, devices: str, out: Path) -> list[str]:
    cmd = [sys.executable, "-m", "qbench.harness.cli", "run", suite, "--out", str(out), "--data-root", data_root]
    return cmd + ["--device", devices, "--no-leaderboard"]


def run(suite: str, data_root: str, devices: str, out: Path, what: str) -> float:
    t0 = time.perf_counter()
    subprocess.run(command(suite, data_root, devices, out), check=True)
    took = time.perf_counter() - t0
    print(f"{what} on {devices}: {took:.1f} s", flush=True)
    breakdown(out)
    return took


def breakdown(out: Path) -> None:
    """Where the cells' time went: each cell's wall time (inside its worker) against its
    training epochs (the MLflow store's ``wall_time_s`` and ``epoch_time_s``); the rest is
    the cell's fixed cost (data, model, calibration, compilation, evaluation, records)."""
    import mlflow
    from qbench.harness.tracking import default_uri

    client = mlflow.MlflowClient(tracking_uri=default_uri(out))
    walls, epochs = [], []
    for exp in client.search_experiments():
        for r in client.search_runs([exp.experiment_id]):
            if "wall_time_s" not in r.data.metrics:
                continue
            walls.append(r.data.metrics["wall_time_s"])
            epochs.append(sum(m.value for m in client.get_metric_history(r.info.run_id, "epoch_time_s")))
    if walls:
        n = len(walls)
        print(
            f"  {n} cells: wall {sum(walls) / n:.1f} s a cell, of which epochs {sum(epochs) / n:.1f} s, "
            f"fixed cost {(sum(walls) - sum(epochs)) / n:.1f} s; cells' walls sum to {sum(walls):.1f} s",
            flush=True,
        )


def warm_copy(suite: str, folder: Path) -> str:
    """The suite with one seed and one epoch (same cells, same code paths)."""
    spec = yaml.safe_load(Path(suite).read_text())
    spec["name"] = f"{spec['name']}_warm"
    spec.setdefault("defaults", {})["seeds"] = [0]
    spec["defaults"].setdefault("recipe", {})["epochs"] = 1
    path = folder / "warm.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", default="suites/grid8_cifar10_gpu.yaml")
    ap.add_argument("--data-root", required=True)
    ap.add_argument("--devices", default="cuda:0,cuda:1")
    ap.add_argument("--warm", action="store_true", help="Run the suite once on each device first (untimed).")
    ap.add_argument(
        "--one-time",
        type=float,
        help="Seconds the grid took on the first device in an earlier call on the same machine: time only all devices.",
    )
    ap.add_argument("--warm-only", action="store_true", help="Only the untimed warm-up, on --devices.")
    ap.add_argument("--one-only", action="store_true", help="Only time the grid on the first device (for --one-time).")
    args = ap.parse_args()
    devices = args.devices.split(",")
    root = Path(tempfile.mkdtemp(prefix="grid-"))
    try:
        if args.warm or args.warm_only:
            # on each device alone: the compiler's caches are keyed by the device index, so
            # a graph compiled for cuda:0 is compiled again on cuda:1 (measured: the second
            # GPU's first cells took twice as long when only cuda:0 had been warmed); one
            # single-device run per device, side by side
            suite = warm_copy(args.suite, root)
            t0 = time.perf_counter()
            procs = [
                subprocess.Popen(command(suite, args.data_root, d, root / f"warm{i}")) for i, d in enumerate(devices)
            ]
            if any([p.wait() != 0 for p in procs]):  # every one waited for
                sys.exit("the warm-up failed")
            print(f"warm-up (untimed) on each of {args.devices}: {time.perf_counter() - t0:.1f} s", flush=True)
            if args.warm_only:
                return
        t1 = args.one_time or run(args.suite, args.data_root, devices[0], root / "one", "the grid")
        if args.one_only:
            print(f"1 device ({devices[0]}): {t1:.1f} s (pass --one-time {t1:.1f} to time {args.devices})")
            return
        tn = run(args.suite, args.data_root, args.devices, root / "many", "the grid")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    n = len(devices)
    print(f"1 device ({devices[0]}): {t1:.1f} s; {n} devices ({args.devices}): {tn:.1f} s")
    print(f"speed-up {t1 / tn:.2f}x, grid efficiency {t1 / (n * tn):.3f}")


if __name__ == "__main__":
    main()
