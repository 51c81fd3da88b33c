"""Bi-Real Net: the binarisers' forward values and gradients on fixed tensors (hand-computed),
the Bi-Real models (structure, parameter counts of the official models, forward/backward),
and a model prepared by the ``bireal`` method (1-bit weights, the bit audit, BOPs)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from qbench.harness.models import bireal as models
from qbench.methods import bireal
from qbench.methods.base import MethodContext
from qbench.methods.errors import QbenchError
from qbench.methods.footprint import footprint
from qbench.methods.modules import QuantConv2d
from qbench.methods.recipe import Recipe
from torch import nn


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One thread for this file's small tensors (faster under load), restored after it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


X = [-1.5, -1.0, -0.75, -0.25, 0.0, 0.5, 0.9, 1.0, 2.0]


def _grad(fn, values, upstream=None):
    x = torch.tensor(values, requires_grad=True)
    y = fn(x)
    y.backward(torch.ones_like(y) if upstream is None else upstream)
    return y.detach(), x.grad


# -- activations ------------------------------------------------------------------------------
def test_approx_sign_forward_and_gradient_by_hand():
    y, g = _grad(bireal.approx_sign, X)
    assert y.tolist() == [-1, -1, -1, -1, 1, 1, 1, 1, 1]  # sign(0) = +1
    # 2 + 2x on [-1, 0), 2 - 2x on [0, 1), 0 elsewhere
    expected = [0.0, 0.0, 0.5, 1.5, 2.0, 1.0, 0.2, 0.0, 0.0]
    torch.testing.assert_close(g, torch.tensor(expected))


def test_approx_sign_gradient_is_the_derivative_of_the_piecewise_polynomial():
    """The paper's ApproxSign: -1 below -1, x^2 + 2x on [-1, 0), 2x - x^2 on [0, 1), 1 above."""

    def poly(x):
        return torch.where(
            x < -1, -torch.ones_like(x), torch.where(x < 0, x * x + 2 * x, torch.where(x < 1, 2 * x - x * x, 1.0))
        )

    x = torch.linspace(-1.9, 1.9, 39)
    _, g_ours = _grad(bireal.approx_sign, x.tolist())
    _, g_poly = _grad(poly, x.tolist())
    torch.testing.assert_close(g_ours, g_poly)


def test_ste_sign_gradient_by_hand():
    y, g = _grad(bireal.ste_sign, X)
    assert y.tolist() == [-1, -1, -1, -1, 1, 1, 1, 1, 1]
    torch.testing.assert_close(g, torch.tensor([0.0, 1, 1, 1, 1, 1, 1, 1, 0]))


def test_clip_in_front_of_approx_sign_changes_nothing():
    """The bireal_* blocks' clip(-1, 1) before the binariser: same values, same gradient."""
    y1, g1 = _grad(lambda x: bireal.approx_sign(F.hardtanh(x)), X)
    y2, g2 = _grad(bireal.approx_sign, X)
    assert torch.equal(y1, y2) and torch.equal(g1, g2)
    y3, g3 = _grad(lambda x: bireal.approx_sign(models.LeakyClip(0.1)(x)), X)
    assert torch.equal(y3, y2) and torch.equal(g3, g2)


# -- weights ----------------------------------------------------------------------------------
W = [[[[0.5, -1.5, 0.1]]], [[[-0.2, 0.0, 0.4]]]]  # (2, 1, 1, 3): two output channels
G = torch.tensor([[[[1.0, 2.0, 3.0]]], [[[4.0, 5.0, 6.0]]]])


def test_weight_forward_by_hand():
    # alpha_0 = (0.5 + 1.5 + 0.1) / 3 = 0.7, alpha_1 = (0.2 + 0 + 0.4) / 3 = 0.2
    wb, _ = _grad(bireal.magnitude_aware_sign, W, G)
    expected = torch.tensor([[[[0.7, -0.7, 0.7]]], [[[-0.2, 0.2, 0.2]]]])
    torch.testing.assert_close(wb, expected)


def test_magnitude_aware_weight_gradient_by_hand():
    # dL/dW = dL/dW_b * alpha_t * 1_{|W| < 1}
    _, g = _grad(bireal.magnitude_aware_sign, W, G)
    expected = torch.tensor([[[[0.7, 0.0, 2.1]]], [[[0.8, 1.0, 1.2]]]])
    torch.testing.assert_close(g, expected)


def test_ste_weight_gradient_by_hand_and_as_the_official_pytorch_code():
    _, g = _grad(lambda w: bireal.magnitude_aware_sign(w, magnitude_aware=False), W, G)
    torch.testing.assert_close(g, torch.tensor([[[[1.0, 0.0, 3.0]]], [[[4.0, 5.0, 6.0]]]]))

    # the official formulation: detached alpha * sign, straight-through clamp(w, -1, 1)
    torch.manual_seed(0)
    w0 = torch.randn(4, 3, 3, 3)
    up = torch.randn(4, 3, 3, 3)
    w = w0.clone().requires_grad_(True)
    alpha = w.abs().mean(dim=(1, 2, 3), keepdim=True).detach()
    c = w.clamp(-1, 1)
    ((alpha * torch.sign(w)).detach() - c.detach() + c).backward(up)
    wb, g_ours = _grad(lambda v: bireal.magnitude_aware_sign(v, False), w0.tolist(), up)
    torch.testing.assert_close(wb, (alpha * torch.sign(w0)))
    torch.testing.assert_close(g_ours, w.grad)


# -- models -----------------------------------------------------------------------------------
def _params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize(
    "fn, classes, expected",
    [
        # the official birealnet18/34 (pytorch_implementation/BiReal18_34/birealnet.py)
        (models.bireal_resnet18, 1000, 11_689_512),
        (models.bireal_resnet34, 1000, 21_797_672),
        (models.bireal_resnet18, 10, 11_181_642),
        # qbench's CIFAR adaptation: the CIFAR ResNet-20/56's layers
        (models.bireal_resnet20, 10, 272_474),
        (models.bireal_resnet56, 10, 855_770),
    ],
)
def test_parameter_counts(fn, classes, expected):
    assert _params(fn(num_classes=classes)) == expected


@pytest.mark.parametrize(
    "fn, blocks", [(models.bireal_resnet18, 16), (models.bireal_resnet34, 32), (models.bireal_resnet20, 18)]
)
def test_one_shortcut_per_3x3_conv(fn, blocks):
    m = fn(num_classes=10)
    found = [b for b in m.modules() if isinstance(b, models.BiRealBlock)]
    assert len(found) == blocks
    convs3 = [c for c in m.modules() if isinstance(c, nn.Conv2d) and c.kernel_size == (3, 3)]
    assert len(convs3) == blocks + (1 if fn is models.bireal_resnet20 else 0)  # + the CIFAR stem


def test_block_is_bn_conv_act_plus_shortcut():
    torch.manual_seed(0)
    block = models.BiRealBlock(4, 4).eval()
    x = torch.randn(1, 4, 5, 5) * 2
    expected = block.bn(block.conv(x.clamp(-1, 1))) + x
    torch.testing.assert_close(block(x), expected)
    nn.init.zeros_(block.conv.weight)  # zero conv, BN bias 0: the block is the identity
    torch.testing.assert_close(block(x), x)
    down = models.BiRealBlock(4, 8, stride=2)
    assert isinstance(down.downsample[0], nn.AvgPool2d) and down(x).shape == (1, 8, 3, 3)


def test_act_option():
    assert isinstance(models.bireal_resnet20(act="relu").layer1[0].act, nn.ReLU)
    with pytest.raises(QbenchError, match="act must be one of"):
        models.bireal_resnet20(act="tanh")
    with pytest.raises(QbenchError, match="stem must be one of"):
        models.bireal_resnet18(stem="tiny")


@pytest.mark.parametrize(
    "fn, size", [(models.bireal_resnet20, 32), (models.bireal_resnet18, 32), (models.bireal_resnet18, 64)]
)
def test_models_forward_backward(fn, size):
    torch.manual_seed(0)
    m = fn(num_classes=10, image_size=size)
    out = m(torch.randn(2, 3, size, size))
    assert out.shape == (2, 10)
    out.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())


# -- the method -------------------------------------------------------------------------------
def _prepared(**options):
    torch.manual_seed(0)
    model = models.bireal_resnet20(num_classes=10)
    ctx = MethodContext(device=torch.device("cpu"), recipe=Recipe())
    return bireal.BiReal(1, 1, **options).prepare(model, ctx)


def test_prepared_model_is_binary_with_fp_ends_and_passes_the_audit():
    model = _prepared()
    x = torch.randn(2, 3, 32, 32)
    fp = footprint(model, x)
    assert fp.audit_ok
    by_name = {layer.name: layer for layer in fp.layers}
    assert (by_name["conv1"].w_bits, by_name["fc"].w_bits) == (32, 32)
    assert by_name["layer2.0.downsample.1"].w_bits == 32  # real-valued 1x1 shortcut conv
    binary = [layer for layer in fp.layers if layer.w_bits == 1]
    assert len(binary) == 18
    for layer in binary:
        assert layer.a_bits == 1 and layer.distinct_max == 2 and layer.levels_allowed == 2
        assert layer.bops == layer.macs  # 1 x 1 bit
        out_channels = model.get_submodule(layer.name).out_channels
        assert layer.bytes == (layer.params + 32 * out_channels) / 8  # 1 bit + scales
    # forward and backward through the binarised model
    model.train()
    model(x).sum().backward()
    conv = model.layer1[0].conv
    assert isinstance(conv, QuantConv2d) and conv.weight.grad.abs().sum() > 0


def test_binarised_conv_computes_sign_inputs_and_scaled_sign_weights():
    model = _prepared().eval()
    conv = model.layer2[1].conv
    x = torch.randn(1, conv.in_channels, 6, 6)
    w = conv.weight.detach()
    alpha = w.abs().mean(dim=(1, 2, 3), keepdim=True)
    expected = F.conv2d(torch.where(x >= 0, 1.0, -1.0), alpha * torch.where(w >= 0, 1.0, -1.0), padding=1)
    torch.testing.assert_close(conv(x), expected)


def test_options():
    model = _prepared(binarize_downsample=True, first_last="same", weight_grad="ste", act_grad="ste")
    fp = footprint(model)
    assert all(layer.w_bits == 1 for layer in fp.layers) and fp.audit_ok
    assert model.layer1[0].conv.act_quantizer.grad == "STE"  # the shared rules' names
    assert model.layer1[0].conv.weight_quantizer.grad == "STE"
    default = _prepared()
    assert default.layer1[0].conv.act_quantizer.grad == "triangle"  # ApproxSign's derivative
    assert default.layer1[0].conv.weight_quantizer.grad == "magnitude"
    with pytest.raises(ValueError):
        bireal.BiReal(1, 1, first_last="8bit")


def test_relu_models_are_refused_unless_allowed():
    from qbench.harness.models.cifar_resnet import resnet20

    ctx = MethodContext(device=torch.device("cpu"), recipe=Recipe())
    with pytest.raises(QbenchError, match="ReLU"):
        bireal.BiReal(1, 1).prepare(resnet20(), ctx)
    bireal.BiReal(1, 1, allow_relu=True).prepare(resnet20(), ctx)


def test_param_groups_no_weight_decay_by_default():
    model = _prepared()
    method = bireal.BiReal(1, 1)
    groups = method.param_groups(model, Recipe(weight_decay=5e-4))
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    assert all(g["weight_decay"] == 0.0 for g in groups)
    assert bireal.BiReal(1, 1, weight_decay=None).param_groups(model, Recipe()) is None
