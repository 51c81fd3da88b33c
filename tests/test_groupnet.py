"""Group-Net: the binarizers and their straight-through gradients, a K=2 layer-wise
decomposition and a K=2 group-wise basic block against hand-computed values, the options,
and a small model prepared by the method (forward, backward, footprint, BOPs, bit audit)."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError
from qbench.harness.models import create_model
from qbench.methods import MethodContext, Recipe
from qbench.methods.footprint import count_macs, footprint
from qbench.methods.groupnet import (
    BinaryBases,
    GroupNet,
    GroupNetBlock,
    act_quantizer,
    residual_bases,
    weight_quantizer,
)
from qbench.methods.modules import QuantConv2d
from torch import nn
from torchvision.models.resnet import BasicBlock


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One thread for this file's small tensors (faster under load), restored after it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


X = torch.tensor([-1.5, -0.5, 0.0, 0.5, 2.0])


def test_sign_forward_and_straight_through_gradients():
    for ste, mask in (("identity", [1.0, 1, 1, 1, 1]), ("clipped", [0.0, 1, 1, 1, 0])):
        x = X.clone().requires_grad_(True)
        y = 0.5 * act_quantizer(ste)(x)
        assert y.tolist() == [-0.5, -0.5, 0.5, 0.5, 0.5]  # sign(0) = +1
        y.backward(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]))
        assert x.grad.tolist() == [0.5 * g * m for g, m in zip([1.0, 2, 3, 4, 5], mask, strict=True)]
    w = X.clone().requires_grad_(True)
    weight_quantizer(1, ste="identity")(w).backward(torch.ones(5))
    assert w.grad.tolist() == [1.0] * 5  # a weight's gradient is not times its scale E


def test_binary_weight_scales_per_tensor_and_per_channel():
    w = torch.tensor([[0.5, -0.25], [-1.0, 0.0]])
    # E = (0.5 + 0.25 + 1 + 0) / 4 = 0.4375
    assert weight_quantizer(2)(w).tolist() == [[0.4375, -0.4375], [-0.4375, 0.4375]]
    # rows: E = 0.375, 0.5
    q = weight_quantizer(2, per_channel=True)(w)
    assert q.tolist() == [[0.375, -0.375], [-0.5, 0.5]]
    assert weight_quantizer(2, per_channel=True).scale_count() == 2 and weight_quantizer(2).scale_count() == 1


def test_residual_bases():
    r1, r2 = residual_bases(torch.tensor([[0.5, -0.25]]), 2, per_channel=False)
    assert r1.tolist() == [[0.5, -0.25]]
    assert r2.tolist() == [[0.125, 0.125]]  # [0.5, -0.25] - 0.375 [1, -1]


def test_layerwise_k2_output_and_gradients():
    fc = nn.Linear(2, 1)
    with torch.no_grad():
        fc.weight.copy_(torch.tensor([[0.5, -0.25]]))
        fc.bias.fill_(0.1)
    layer = BinaryBases(fc, 2)
    # bases: 0.375 [1, -1] and 0.125 [1, 1]; lambda = 1, 1: their sum is the FP weight
    x = torch.tensor([[0.3, -2.0]])  # sign: [1, -1]
    assert layer(x).item() == pytest.approx(0.5 + 0.25 + 0.1)
    with torch.no_grad():
        layer.lambdas.copy_(torch.tensor([0.5, 2.0]))
    x.requires_grad_(True)
    y = layer(x)
    # 0.5 (0.375 + 0.375) + 2 (0.125 - 0.125) + bias (once, after the sum)
    assert y.item() == pytest.approx(0.375 + 0.1)
    y.backward()
    assert layer.lambdas.grad.tolist() == pytest.approx([0.75, 0.0])
    # dy/dx = sum_k lambda_k What_k (straight through sign(x))
    assert x.grad[0].tolist() == pytest.approx([0.5 * 0.375 + 2 * 0.125, -0.5 * 0.375 + 2 * 0.125])
    # dy/dW_k = lambda_k sign(x) (straight through E sign(W_k), not times E)
    assert layer.branches[0].weight.grad[0].tolist() == pytest.approx([0.5, -0.5])
    assert layer.branches[1].weight.grad[0].tolist() == pytest.approx([2.0, -2.0])
    assert layer.bias.grad.item() == 1.0 and layer.branches[0].bias is None


def test_layerwise_clipped_ste_blocks_large_inputs():
    fc = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        fc.weight.copy_(torch.tensor([[0.5, -0.25]]))
    layer = BinaryBases(fc, 2, ste="clipped")
    x = torch.tensor([[0.3, -2.0]], requires_grad=True)
    layer(x).backward()
    assert x.grad[0].tolist() == pytest.approx([0.5, 0.0])  # sum What = [0.5, -0.25]; |-2| > 1


def _const_block() -> GroupNetBlock:
    block = BasicBlock(1, 1).eval()
    g = GroupNetBlock(block, 2).eval()
    with torch.no_grad():
        for b, (w1, w2) in zip(g.branches, ((0.2, -0.1), (-0.3, 0.4)), strict=True):
            b.conv1.weight.fill_(w1)
            b.conv2.weight.fill_(w2)
    return g


def test_groupwise_k2_block_cabs_bireal():
    g = _const_block()
    assert g.lambdas.tolist() == [0.5, 0.5]
    x = torch.full((1, 1, 1, 1), 0.7)  # 1x1 input: a padded 3x3 conv sees its centre tap only
    bn = 1 / math.sqrt(1 + 1e-5)  # BN at its initial statistics
    # branch 1: h = BN(ReLU(0.2 * 1)) + 0.7; out = BN(ReLU(-0.1 * sign(h))) + h = h
    b1 = 0.2 * bn + 0.7
    # branch 2: h = BN(ReLU(-0.3)) + 0.7 = 0.7; out = BN(ReLU(0.4 * 1)) + 0.7
    b2 = 0.4 * bn + 0.7
    assert g(x).item() == pytest.approx(0.5 * b1 + 0.5 * b2, abs=1e-6)


def test_groupwise_block_without_bireal():
    block = BasicBlock(1, 1).eval()
    g = GroupNetBlock(block, 2, bireal=False).eval()
    with torch.no_grad():
        for b, (w1, w2) in zip(g.branches, ((0.2, 0.5), (-0.3, 0.4)), strict=True):
            b.conv1.weight.fill_(w1)
            b.conv2.weight.fill_(w2)
    x = torch.full((1, 1, 1, 1), 0.7)
    bn = 1 / math.sqrt(1 + 1e-5)
    # branch 1: BN(ReLU(0.5 * sign(BN(ReLU(0.2))))) = 0.5 bn; branch 2: sign(0) = +1 -> 0.4 bn
    assert g(x).item() == pytest.approx(0.5 * 0.5 * bn + 0.5 * 0.4 * bn + 0.7, abs=1e-6)


def test_options():
    assert GroupNet(1, 1).options.base == 5
    with pytest.raises(ValidationError):
        GroupNet(1, 1, softgate=True)
    with pytest.raises(ValidationError):
        GroupNet(1, 1, base=0)
    with pytest.raises(ValidationError):
        GroupNet(1, 1, cabs=True)


def _ctx(x: torch.Tensor | None = None) -> MethodContext:
    batches = [] if x is None else [(x, torch.zeros(len(x), dtype=torch.long))]
    return MethodContext(device=torch.device("cpu"), recipe=Recipe(), calib_batches=lambda: iter(batches))


def test_small_cnn_prepared_trains_and_footprint_counts_k_binary_bases():
    torch.manual_seed(0)
    model = create_model("small_cnn", num_classes=10, in_channels=1, image_size=8, width=8)
    x = torch.randn(4, 1, 8, 8)
    macs_fp = count_macs(model, x)
    ref = footprint(model, x[:1])
    k = 3
    method = GroupNet(1, 1, base=k)
    model = method.prepare(model, _ctx(x))
    assert isinstance(model.features[0], nn.Conv2d) and not isinstance(model.features[0], QuantConv2d)
    assert isinstance(model.fc, nn.Linear)
    assert isinstance(model.features[3], BinaryBases) and isinstance(model.features[7], BinaryBases)
    out = model(x)
    out.sum().backward()
    assert out.shape == (4, 10)
    assert model.features[3].lambdas.grad is not None and model.features[3].branches[2].weight.grad is not None

    fp = footprint(model, x)
    binary = [layer for layer in fp.layers if layer.w_bits == 1]
    assert len(binary) == 2 * k  # K binary weight tensors per binarised layer
    assert fp.audit_ok and all(layer.distinct_max == 2 and layer.a_bits == 1 for layer in binary)
    for layer in binary:
        assert layer.bytes == (layer.params + 32) / 8  # 1 bit per weight + E
    # BOPs: each base at 1 x 1, full-precision ends at 32 x 32
    expect = k * (macs_fp["features.3"] + macs_fp["features.7"]) + 1024 * (macs_fp["features.0"] + macs_fp["fc"])
    assert fp.bops == expect
    # everything else at 32 bits: ends, BN, and the K lambdas of each binarised layer
    weights = sum(layer.bytes for layer in fp.layers)
    rest = sum(t.numel() for n, t in model.state_dict().items() if t.is_floating_point() and "branches" not in n)
    rest -= model.features[0].weight.numel() + model.fc.weight.numel() + model.fc.bias.numel()
    assert fp.total_bytes == pytest.approx(weights + 4 * rest)
    # the run's figures compare with the full-precision model it was built from, not with
    # K full-precision copies of each layer
    assert fp.fp32_bytes > 2 * ref.fp32_bytes  # what the plain measurement would take as 32-bit
    ours = method.footprint(model, x[:1])
    assert ours.fp32_bytes == ref.fp32_bytes and ours.fp32_bops == ref.fp32_bops
    assert ours.rel_bops == pytest.approx(100 * fp.bops / ref.fp32_bops)
    assert ours.compression_ratio == pytest.approx(ref.fp32_bytes / fp.total_bytes)


def test_resnet_blocks_become_groupnet_blocks():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        BasicBlock(4, 4),
        BasicBlock(4, 8, 2, downsample=nn.Sequential(nn.Conv2d(4, 8, 1, 2, bias=False), nn.BatchNorm2d(8))),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 3),
    )
    model = GroupNet(1, 1, base=2).prepare(model, _ctx())
    assert isinstance(model[1], GroupNetBlock) and isinstance(model[2], GroupNetBlock)
    assert isinstance(model[2].downsample[0], QuantConv2d)  # one binary shortcut conv, shared
    model(torch.randn(2, 1, 8, 8)).sum().backward()
    fp = footprint(model, torch.randn(1, 1, 8, 8))
    assert fp.audit_ok and sum(layer.w_bits == 1 for layer in fp.layers) == 2 * 2 * 2 + 1
    layerwise = GroupNet(1, 1, base=2, decomposition="layer").prepare(
        nn.Sequential(nn.Conv2d(1, 4, 3), BasicBlock(4, 4), nn.Flatten(), nn.Linear(10, 3)), _ctx()
    )
    assert isinstance(layerwise[1].conv1, BinaryBases)
