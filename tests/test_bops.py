"""BOPs and relative BOPs (Bayesian Bits' measure of cost), the same for every method:
per layer MACs x weight bits x activation bits, in percent of the model at 32 x 32 bits;
0 bits means pruned (no storage, no BOPs); a channel-pruning quantizer's keep ratio
scales its layer. Values below are computed by hand from the layer shapes."""

from __future__ import annotations

import json
import math

import pytest
import torch
from qbench.harness.data import load_dataset
from qbench.harness.models import create_model
from qbench.harness.runner import measure
from qbench.methods.footprint import footprint
from qbench.methods.fp32 import FP32
from qbench.methods.lsq import LSQQuantizer, weight_quantizer
from qbench.methods.modules import Quantizer, quantize_model
from qbench.methods.recipe import Recipe
from torch import nn


class Net(nn.Module):
    """conv(1->4, 3x3) - ReLU - conv(4->8, 3x3) - ReLU - mean - linear(8->3); on a 5x5
    input: MACs 25*4*9 = 900, 25*8*36 = 7200, 8*3 = 24."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.c2 = nn.Conv2d(4, 8, 3, padding=1, bias=False)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = torch.relu(self.c2(torch.relu(self.c1(x))))
        return self.fc(x.mean((2, 3)))


MACS = {"c1": 900, "c2": 7200, "fc": 24}
FP32_BOPS = (900 + 7200 + 24) * 32 * 32


def _net(w_bits: int = 4, a_bits: int = 2) -> nn.Module:
    """c1 and fc in full precision, c2 at LSQ W{w_bits}A{a_bits}."""
    net = quantize_model(
        Net(),
        lambda m, n, b: weight_quantizer(b),
        lambda m, n, b: LSQQuantizer(b, signed=None),
        w_bits,
        a_bits,
        first_last="fp",
    )
    net.c2.weight_quantizer._init(net.c2.weight)
    return net.eval()


def _x() -> torch.Tensor:
    return torch.randn(1, 1, 5, 5, generator=torch.Generator().manual_seed(0))


class Pruned(Quantizer):
    """A tensor at 0 bits: every value removed (keeps a learnable scale, as a gated quantizer does)."""

    def __init__(self):
        super().__init__(0)
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, w):
        return torch.zeros_like(w)


class HalfChannels(Quantizer):
    """4 bits on the first half of the output channels, the rest pruned (``keep_ratio``)."""

    def __init__(self):
        super().__init__(4)

    def forward(self, w):
        q = torch.round(w.clamp(-1, 1) * 7) / 7
        q[w.shape[0] // 2 :] = 0
        return q

    def keep_ratio(self) -> float:
        return 0.5


def test_relative_bops_by_hand():
    fp = footprint(_net(4, 2), _x())
    bops = 900 * 32 * 32 + 7200 * 4 * 2 + 24 * 32 * 32
    assert fp.bops == bops
    assert fp.fp32_bops == FP32_BOPS == 8_318_976
    assert fp.rel_bops == pytest.approx(100 * bops / FP32_BOPS)
    assert fp.rel_bops == pytest.approx(12.0661, abs=1e-4)  # 1,003,776 / 8,318,976
    d = fp.to_dict()
    assert d["fp32_bops"] == FP32_BOPS and d["rel_bops"] == pytest.approx(fp.rel_bops)
    json.dumps(d, allow_nan=False)  # footprint.json stays strict JSON


def test_full_precision_model_is_100_percent():
    fp = footprint(Net().eval(), _x())
    assert fp.bops == fp.fp32_bops == FP32_BOPS and fp.rel_bops == 100.0


def test_without_an_example_there_are_no_macs_and_no_relative_bops():
    fp = footprint(_net())
    assert fp.fp32_bops == 0 and math.isnan(fp.rel_bops)
    d = fp.to_dict()
    assert d["rel_bops"] is None
    json.dumps(d, allow_nan=False)


def test_zero_bit_weights_store_nothing_and_cost_no_bops():
    net = _net(4, 2)
    net.c2.weight_quantizer = Pruned()
    fp = footprint(net, _x())
    c2 = {lf.name: lf for lf in fp.layers}["c2"]
    assert (c2.w_bits, c2.bops, c2.kept) == (0, 0, 0.0)
    # no codes, no weight scale: only the input quantizer's LSQ step (one float) is stored
    assert c2.bytes == net.c2.act_quantizer.scale_count() * 4 == 4
    assert fp.audit_ok and c2.distinct_max == 1 and c2.levels_allowed == 1
    assert fp.bops == (900 + 24) * 32 * 32
    assert fp.rel_bops == pytest.approx(100 * 924 / 8124)


def test_keep_ratio_scales_bytes_and_bops():
    net = _net(4, 2)
    net.c2.weight_quantizer = HalfChannels()
    fp = footprint(net, _x())
    c2 = {lf.name: lf for lf in fp.layers}["c2"]
    assert c2.kept == 0.5 and c2.bops == 7200 * 4 * 2 // 2
    assert c2.bytes == 288 * 4 * 0.5 / 8 + 4  # half the 4-bit codes, plus the input step


def test_runner_logs_relative_bops_next_to_bops():
    data = load_dataset("digits")
    model = create_model("small_cnn", num_classes=10, in_channels=1, image_size=8)
    r = Recipe(eval_batch_size=512, amp=False, channels_last=False)
    _, metrics, fp = measure(model, FP32(), data, "test", r, torch.device("cpu"))
    assert metrics["bops"] == fp.bops > 0
    assert metrics["rel_bops"] == pytest.approx(100.0)  # full precision: 32 x 32 everywhere


def test_keep_ratio_counts_at_full_precision_too():
    """A learned width of 32 bits with pruned channels (a gated quantizer's 32-bit choice)."""

    class Wide(Quantizer):
        def __init__(self):
            super().__init__(32)

        def forward(self, w):
            return w

        def keep_ratio(self) -> float:
            return 0.25

    net = _net(4, 2)
    net.c2.weight_quantizer = Wide()
    c2 = {lf.name: lf for lf in footprint(net, _x()).layers}["c2"]
    assert (c2.w_bits, c2.kept, c2.bops) == (32, 0.25, 7200 * 32 * 2 // 4)
    assert c2.bytes == 288 * 32 * 0.25 / 8 + 4


def test_prune_only_bayesian_bits_counts_its_kept_channels_at_32_bits():
    """Bayesian Bits' pruning-only variant: full-precision weights, half the output channels off."""
    from qbench.methods.bayesian_bits import BayesianBitsQuantizer

    net = _net(4, 2)
    wq = BayesianBitsQuantizer(weight=True, channels=8, prune_only=True)
    wq.log_alpha_2.data = torch.tensor([6.0, -6.0] * 4)
    wq.freeze()
    net.c2.weight_quantizer = wq
    fp = footprint(net, _x())
    c2 = {lf.name: lf for lf in fp.layers}["c2"]
    assert (c2.w_bits, c2.kept, c2.bops) == (32, 0.5, 7200 * 32 * 2 // 2)
    assert c2.bytes == 288 * 32 * 0.5 / 8 + 4  # half the weights at 32 bits, plus the input step
