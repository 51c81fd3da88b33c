"""Time the compression step of BGD and PQF on an ImageNet ResNet-18, layer by layer.

BGD: gather each layer's input activations on the calibration images through the partially
quantized network, then EM on the activation-weighted objective (``em_iterations``, 100 in
the paper); its layer-wise fine-tuning is not timed here (``layer_steps: 0``: it is training,
2,500 steps per layer in the paper). PQF: the permutation search (greedy + ``sls`` swaps per
group) and annealed k-means (10 iterations) per layer.

The weights: torchvision's ResNet-18 architecture carrying the decoded weights of a released
compressed model (``--weights``, e.g. ../shared/data/compressed/bgd_resnet18_small_blocks.pth)
plus Gaussian noise of a tenth of each layer's standard deviation (decoded weights alone hold
only k distinct blocks per layer, a degenerate input for clustering) as the "full-precision"
network (no download needed); calibration images from the ImageNet
sample (``--sample``). The times depend on the layer sizes and iteration counts, not on the
weights' values.

    python scripts/time_pq_compression.py --sample ../shared/data/imagenet-sample \\
        --weights ../shared/data/compressed/bgd_resnet18_small_blocks.pth --out timing.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from qbench.harness.data import load_dataset
from qbench.harness.models import create_model
from qbench.harness.models.weights import safe_load
from qbench.methods.base import MethodContext
from qbench.methods.bgd import BGD
from qbench.methods.pq import pq_layers
from qbench.methods.pqf import PQF
from qbench.methods.recipe import Recipe


def fp_resnet18(weights: str, device: torch.device) -> torch.nn.Module:
    model = create_model("resnet18", num_classes=1000, image_size=224)
    BGD(8, 32).prepare(model)
    BGD(8, 32).import_checkpoint(safe_load(weights, weights), model, weights)
    g = torch.Generator().manual_seed(0)
    for _, layer in pq_layers(model):  # back to full precision: the decoded weights as the source,
        w = layer.weight.detach().clone()  # plus noise (10% of their spread) so that the layer
        layer.source = w + 0.1 * w.std() * torch.randn(w.shape, generator=g)  # has many distinct blocks
        layer.compressed.fill_(False)
    return model.to(device).eval()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sample", required=True, help="ImageNet sample folder (val/ + synsets.txt)")
    ap.add_argument("--weights", required=True, help="a released BGD compressed ResNet-18")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--n-activations", type=int, default=500)
    ap.add_argument("--em-iterations", type=int, default=100)
    ap.add_argument("--sls", type=int, default=10_000)
    ap.add_argument("--regime", default="small", choices=["small", "large"])
    ap.add_argument("--out", default=None, help="write the per-layer times as JSON")
    args = ap.parse_args()
    dev = torch.device(args.device)
    data = load_dataset("imagenet", None, "--sample", path=args.sample)
    split = data.splits["test"]
    images = [x.to(dev) for x, _ in split.batches(100, train=False, device=dev)]
    result: dict = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "torch": torch.__version__,
    }

    # BGD: EM per layer on the partially quantized network
    rows: dict[int, dict] = {}

    def log(metrics, step=None):
        if step is not None:
            rows.setdefault(step, {}).update(metrics)

    ctx = MethodContext(device=dev, recipe=Recipe(), calib_batches=lambda: ((x, None) for x in images), log=log)
    bgd = BGD(
        8, 32, regime=args.regime, em_iterations=args.em_iterations, n_activations=args.n_activations, layer_steps=0
    )
    model = fp_resnet18(args.weights, dev)
    model = bgd.prepare(model)
    names = [(n, m) for n, m in pq_layers(model)]
    sync(dev)
    t0 = time.perf_counter()
    bgd.quantize_layers(model, ctx)
    sync(dev)
    result["bgd_total_s"] = time.perf_counter() - t0
    result["bgd_layers"] = [
        {"layer": n, "k": m.k, "d": m.d, "subvectors": m.n_subvectors, **rows.get(i, {})}
        for i, (n, m) in enumerate(names)
    ]

    # PQF: permutation + annealed k-means
    pqf = PQF(8, 32, regime=args.regime, sls_iterations=args.sls)
    model = fp_resnet18(args.weights, dev)
    model = pqf.prepare(model)
    rows.clear()
    sync(dev)
    t0 = time.perf_counter()
    pqf.calibrate(model, ctx)
    sync(dev)
    result["pqf_total_s"] = time.perf_counter() - t0
    result["pqf_rows"] = rows.copy()
    print(json.dumps({k: v for k, v in result.items() if not k.endswith(("layers", "rows"))}, indent=1))
    for r in result["bgd_layers"]:
        print(
            f"{r['layer']:24s} k={r['k']:5d} d={r['d']:3d} n={r['subvectors']:7d} EM {r.get('bgd/em_seconds', 0):.2f} s"
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1, default=float)


if __name__ == "__main__":
    main()
