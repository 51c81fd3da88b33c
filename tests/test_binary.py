"""Binary primitives, XNOR-Net (``xnor``) and XNOR-Net++ (``xnorpp``) against hand-computed
values: sign and its gradient rules (pass, STE, triangle), the per-output-channel mean-abs
weight scale and its gradient rules, XNOR-Net's input scale K, XNOR-Net++'s learned
channel / factorised / full scales and their gradients, and a small CNN prepared by each
method: forward/backward, no ReLU left, 1-bit layers in the footprint, a passing bit audit."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from qbench.harness.models import create_model
from qbench.methods.base import MethodContext
from qbench.methods.binary import (
    BinaryConv2d,
    BinaryLinear,
    SignActivation,
    SignWeight,
    binary_weight,
    sign_ste,
    xnor_input_scale,
)
from qbench.methods.footprint import footprint
from qbench.methods.recipe import Recipe
from qbench.methods.xnor import LearnedSignWeight, Xnor, XnorPP
from torch import nn


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One thread for this file's small tensors (faster under load), restored after it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _ctx(batch: torch.Tensor | None = None) -> MethodContext:
    batches = [] if batch is None else [(batch, torch.zeros(len(batch), dtype=torch.long))]
    return MethodContext(device=torch.device("cpu"), recipe=Recipe(), calib_batches=lambda: iter(batches))


def _close(a: torch.Tensor, b) -> None:
    torch.testing.assert_close(a, torch.as_tensor(b, dtype=a.dtype), rtol=1e-6, atol=1e-6)


# -- sign and its gradient rules ----------------------------------------------------------
X = torch.tensor([-1.5, -1.0, -0.5, 0.0, 0.25, 2.0])
UPSTREAM = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])


@pytest.mark.parametrize(
    ("rule", "grad"),
    [
        ("pass", [1, 2, 3, 4, 5, 6]),
        ("STE", [0, 2, 3, 4, 5, 0]),  # 1 where |x| <= 1, the bound included
        ("triangle", [0, 0, 3, 8, 7.5, 0]),  # max(0, 2 - 2|x|) = [0, 0, 1, 2, 1.5, 0]
    ],
)
def test_sign_forward_and_gradient_rule(rule, grad):
    x = X.clone().requires_grad_()
    y = sign_ste(x, rule)
    assert y.tolist() == [-1, -1, -1, 1, 1, 1]  # sign(0) = +1: two values only
    y.backward(UPSTREAM)
    _close(x.grad, grad)


def test_sign_activation_quantizer_uses_its_rule_and_stores_nothing():
    q = SignActivation("triangle")
    x = X.clone().requires_grad_()
    q(x).backward(UPSTREAM)
    _close(x.grad, [0, 0, 3, 8, 7.5, 0])
    assert (q.bits, q.max_levels(), q.scale_count(), q.is_initialized()) == (1, 2, 0, True)
    with pytest.raises(ValueError, match="triangle"):
        SignActivation("tri")


# -- per-output-channel weights -----------------------------------------------------------
W = torch.tensor([[0.5, -1.5, 0.25], [-0.2, 0.4, -3.0]])
G = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
# alpha = mean |W| per row: (0.5 + 1.5 + 0.25) / 3 = 0.75, (0.2 + 0.4 + 3.0) / 3 = 1.2
W_BIN = [[0.75, -0.75, 0.75], [-1.2, 1.2, -1.2]]


@pytest.mark.parametrize(
    ("rule", "grad"),
    [
        ("pass", G.tolist()),
        ("STE", [[1, 0, 3], [4, 5, 0]]),  # |W| <= 1 mask [[1, 0, 1], [1, 1, 0]]
        # XNOR-Net sec. 3.2: G (1/n + alpha 1_{|W|<=1}), n = 3
        ("paper", [[13 / 12, 2 / 3, 3 * 13 / 12], [4 * 23 / 15, 5 * 23 / 15, 6 / 3]]),
    ],
)
def test_channel_weight_forward_and_gradient(rule, grad):
    w = W.clone().requires_grad_()
    y = binary_weight(w, "channel", rule)
    _close(y, W_BIN)
    y.backward(G)
    _close(w.grad, grad)


def test_tensor_and_unscaled_weights():
    _close(binary_weight(W, "tensor"), torch.tensor([[1, -1, 1], [-1, 1, -1]]) * 0.975)  # 5.85 / 6
    _close(binary_weight(W, "none"), [[1, -1, 1], [-1, 1, -1]])


def test_sign_weight_quantizer_groups_and_scales():
    q = SignWeight(channels=2)
    out = q(W)
    assert q.scale_count() == 2 and q.max_levels() == 2
    groups = q.groups(out)
    assert len(groups) == 2
    _close(groups[0].unique(), [-0.75, 0.75])
    _close(groups[1].unique(), [-1.2, 1.2])
    assert SignWeight(2, "tensor").scale_count() == 1 and len(SignWeight(2, "tensor").groups(out)) == 1
    with pytest.raises(ValueError, match="scaling"):
        SignWeight(2, "row")


# -- XNOR-Net layers ----------------------------------------------------------------------
def _linear_stack() -> nn.Module:
    net = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2, bias=False), nn.Linear(2, 2))
    with torch.no_grad():
        net[1].weight.copy_(W)
    return net


H = torch.tensor([[0.3, -2.0, 0.0]])  # sign: [1, -1, 1]


def test_xnor_linear_forward_without_and_with_input_scale():
    net = Xnor(1, 1).prepare(_linear_stack(), _ctx())
    assert isinstance(net[1], BinaryLinear)
    assert not isinstance(net[0], BinaryLinear) and not isinstance(net[2], BinaryLinear)  # first/last: fp
    # [0.75 (1 + 1 + 1), 1.2 (-1 - 1 - 1)]
    _close(net[1](H), [[2.25, -3.6]])
    net = Xnor(1, 1, act_scale=True).prepare(_linear_stack(), _ctx())
    _close(net[1](H), [[2.25 * 2.3 / 3, -3.6 * 2.3 / 3]])  # K = mean |h| = 2.3 / 3


def test_xnor_input_scale_is_a_box_filter_of_the_channel_mean():
    conv = nn.Conv2d(2, 1, 3, padding=1, bias=False)
    x = torch.cat([torch.ones(1, 1, 3, 3), -3 * torch.ones(1, 1, 3, 3)], 1)  # A = 2 everywhere
    k = xnor_input_scale(x, conv)
    # corner: 4 of 9 taps inside, edge 6, centre 9 (zero padding)
    _close(k[0, 0], [[8 / 9, 4 / 3, 8 / 9], [4 / 3, 2, 4 / 3], [8 / 9, 4 / 3, 8 / 9]])


def test_xnor_conv_with_input_scale():
    net = nn.Sequential(nn.Conv2d(2, 1, 3, padding=1, bias=False))
    with torch.no_grad():
        net[0].weight.fill_(0.5)  # alpha = 0.5, sign = +1
    net = Xnor(1, 1, act_scale=True, first_last="same").prepare(net, _ctx())
    assert isinstance(net[0], BinaryConv2d)
    x = torch.cat([torch.ones(1, 1, 3, 3), 3 * torch.ones(1, 1, 3, 3)], 1)  # sign +1, A = 2
    # sign conv: corner 2 x 4 taps = 8, edge 12, centre 18; times alpha 0.5 times K
    _close(net(x)[0, 0], [[32 / 9, 8, 32 / 9], [8, 18, 8], [32 / 9, 8, 32 / 9]])


# -- XNOR-Net++ ---------------------------------------------------------------------------
def test_xnorpp_channel_scale_is_learned_from_mean_abs():
    net = XnorPP(1, 1, scale="channel").prepare(_linear_stack(), _ctx())
    wq = net[1].weight_quantizer
    assert isinstance(wq, LearnedSignWeight)
    _close(wq.alpha.detach(), [0.75, 1.2])  # initialised at XNOR-Net's value
    w = net[1].weight
    out = wq(w)
    _close(out, W_BIN)
    out.backward(G)
    _close(wq.alpha.grad, [1 - 2 + 3, -4 + 5 - 6])  # sum_j G_oj sign(W_oj)
    _close(w.grad, G * torch.tensor([[0.75], [1.2]]))  # "pass" through sign, times alpha
    assert wq.scale_count() == 2


def _factorised() -> tuple[nn.Module, torch.Tensor]:
    net = nn.Sequential(nn.Conv2d(1, 2, 1, bias=False))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([0.3, -0.7]).view(2, 1, 1, 1))
    x = torch.tensor([[0.5, -1.0, 2.0], [-0.1, 0.0, 3.0]]).view(1, 1, 2, 3)
    return net, x


def test_xnorpp_factorised_scales_forward_and_gradients():
    net, x = _factorised()
    net = XnorPP(1, 1, scale="factorised", first_last="same").prepare(net, _ctx(x))
    wq = net[0].weight_quantizer
    assert wq.beta.shape == (2,) and wq.gamma.shape == (3,)  # shaped from the calibration batch
    with torch.no_grad():
        wq.alpha.copy_(torch.tensor([1.0, 2.0]))
        wq.beta.copy_(torch.tensor([1.0, 0.5]))
        wq.gamma.copy_(torch.tensor([1.0, 2.0, 3.0]))
    out = net(x)
    # sign(x) = [[1, -1, 1], [-1, 1, 1]], sign(W) = [+1, -1]; Gamma = alpha (x) beta (x) gamma
    _close(out[0, 0], [[1, -2, 3], [-0.5, 1, 1.5]])
    _close(out[0, 1], [[-2, 4, -6], [1, -2, -3]])
    out.sum().backward()
    _close(wq.alpha.grad, [4, -4])  # sign(W_o) sum_hw sign(x) beta gamma = +-(2 + 2)
    _close(wq.beta.grad, [-2, -4])  # (1 - 2 + 3) (1 - 2), (-1 + 2 + 3) (1 - 2)
    _close(wq.gamma.grad, [-0.5, 0.5, -1.5])
    assert wq.scale_count() == 2 + 2 + 3


def test_xnorpp_full_scale_starts_at_the_channel_scale():
    net, x = _factorised()
    ref, _ = _factorised()
    full = XnorPP(1, 1, scale="full", first_last="same").prepare(net, _ctx(x))
    chan = XnorPP(1, 1, scale="channel", first_last="same").prepare(ref, _ctx(x))
    assert full[0].weight_quantizer.gamma_full.shape == (2, 2, 3)
    _close(full(x), chan(x).detach())  # alpha = [0.3, 0.7] broadcast over h, w


def test_xnorpp_spatial_scales_load_into_a_fresh_model():
    net, x = _factorised()
    net = XnorPP(1, 1, first_last="same").prepare(net, _ctx(x))
    with torch.no_grad():
        net[0].weight_quantizer.gamma.copy_(torch.tensor([1.0, 2.0, 3.0]))
    fresh, _ = _factorised()
    fresh = XnorPP(1, 1, first_last="same").prepare(fresh, _ctx())  # no batch: unshaped
    assert fresh[0].weight_quantizer.gamma.numel() == 0
    fresh.load_state_dict(net.state_dict())
    _close(fresh(x), net(x).detach())


# -- methods on a small model ---------------------------------------------------------------
@pytest.mark.parametrize(
    ("cls", "options", "scales"),
    [
        (Xnor, {}, lambda c, hw: c),
        (Xnor, {"fm_grad": "STE", "wt_grad": "paper", "act_scale": True}, lambda c, hw: c),
        (XnorPP, {}, lambda c, hw: c + 2 * hw),
        (XnorPP, {"scale": "full"}, lambda c, hw: c * hw * hw),
    ],
)
def test_small_cnn_binarised_footprint(cls, options, scales):
    torch.manual_seed(0)
    x = torch.randn(4, 1, 8, 8)
    model = create_model("small_cnn", num_classes=10, in_channels=1, image_size=8, width=8)
    model = cls(1, 1, **options).prepare(model, _ctx(x))
    assert not any(isinstance(m, nn.ReLU) for m in model.modules())  # No-ReLU
    out = model(x)
    out.logsumexp(1).sum().backward()
    assert torch.isfinite(out).all()
    binary = [m for m in model.modules() if isinstance(m, BinaryConv2d)]
    assert len(binary) == 2 and all(m.weight.grad.abs().sum() > 0 for m in binary)
    fp = footprint(model.eval(), x)
    assert fp.audit_ok
    by_name = {layer.name: layer for layer in fp.layers}
    assert (by_name["features.0"].w_bits, by_name["fc"].w_bits) == (32, 32)  # first/last fp
    for name, c, hw in (("features.3", 16, 8), ("features.7", 32, 4)):  # maxpool before .7
        layer = by_name[name]
        assert (layer.w_bits, layer.a_bits, layer.distinct_max, layer.levels_allowed) == (1, 1, 2, 2)
        assert layer.bops == layer.macs  # 1 x 1 bit operations per MAC
        assert layer.bytes == (layer.params + 32 * scales(c, hw)) / 8


def test_weights_only_keeps_relus_and_full_precision_inputs():
    model = create_model("small_cnn", num_classes=10, in_channels=1, image_size=8, width=8)
    model = Xnor(1, 32).prepare(model, _ctx())
    assert any(isinstance(m, nn.ReLU) for m in model.modules())
    layer = {f.name: f for f in footprint(model).layers}["features.3"]
    assert (layer.w_bits, layer.a_bits) == (1, 32)


def test_options_are_validated():
    with pytest.raises(ValidationError):
        Xnor(1, 1, fm_grad="tri")
    with pytest.raises(ValidationError):
        XnorPP(1, 1, wt_grad="paper")
    with pytest.raises(ValidationError):
        XnorPP(1, 1, scale="spatial")
    assert Xnor.name == "xnor" and XnorPP.name == "xnorpp" and Xnor.paper.year == 2016
