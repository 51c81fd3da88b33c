"""APoT's quantizers pinned to the official formulas (github.com/yhhhli/APoT_Quantization,
CIFAR10/models/quant_layer.py and ImageNet/models/quant_layer.py) on fixed tensors.

The expected values are written out here from the official definitions (level tables as
fractions, the gradient rules as formulas), not computed by the code under test.
"""

from __future__ import annotations

from fractions import Fraction as F

import pytest
import torch
from pydantic import ValidationError
from qbench.harness.errors import QbenchError
from qbench.harness.models import create_model
from qbench.methods import Recipe, get_method
from qbench.methods.apot import (
    APoT,
    APoTQuantizer,
    MaxScaled8bit,
    apot_quantize,
    decision_thresholds,
    level_set,
    official_to_qbench,
    project,
)
from torch import nn


def _normalised(fracs: list[F]) -> list[float]:
    """The official normalisation: float32 values times float32(1 / max)."""
    v = torch.tensor([float(f) for f in fracs], dtype=torch.float32)
    return sorted((v * (1.0 / v.max())).tolist())


# --- level sets -------------------------------------------------------------------------


def test_apot_levels_2_3_4_bits_are_the_official_sums():
    # B=2: {0, 1/2, 1/4, 1/8} / (1/2)
    assert level_set("apot", 2).tolist() == [0.0, 0.25, 0.5, 1.0]
    # B=3: p0 in {0, 1/2, 1/4, 1/16}, p1 in {0, 1/8}; largest 5/8
    sums3 = sorted({a + b for a in (F(0), F(1, 2), F(1, 4), F(1, 16)) for b in (F(0), F(1, 8))})
    assert level_set("apot", 3).tolist() == _normalised(sums3)
    assert [round(x, 6) for x in level_set("apot", 3).tolist()] == [
        0,
        0.1,
        0.2,
        0.3,
        0.4,
        0.6,
        0.8,
        1.0,
    ]
    # B=4: p0 in {0, 1/2, 1/8, 1/32}, p1 in {0, 1/4, 1/16, 1/64}; largest 3/4
    p0, p1 = (F(0), F(1, 2), F(1, 8), F(1, 32)), (F(0), F(1, 4), F(1, 16), F(1, 64))
    sums4 = sorted({a + b for a in p0 for b in p1})
    assert len(sums4) == 16
    assert level_set("apot", 4).tolist() == _normalised(sums4)


def test_apot_levels_5_6_bits():
    # B=5: {0,1/2,1/8,1/64} + {0,1/4,1/16,1/128} + {0,1/32}; B=6: three 2-bit terms
    p = [(F(0), F(1, 2), F(1, 8), F(1, 64)), (F(0), F(1, 4), F(1, 16), F(1, 128)), (F(0), F(1, 32))]
    sums5 = sorted({a + b + c for a in p[0] for b in p[1] for c in p[2]})
    assert level_set("apot", 5).tolist() == _normalised(sums5)
    q = [tuple([F(0)] + [F(1, 2 ** (t + 1 + 3 * j)) for j in range(3)]) for t in range(3)]
    sums6 = sorted({a + b + c for a in q[0] for b in q[1] for c in q[2]})
    assert len(sums6) == 64
    assert level_set("apot", 6).tolist() == _normalised(sums6)


def test_pot_and_uniform_levels():
    # PoT, B=3: {0, 2^-1, ..., 2^-7} / 2^-1
    assert level_set("pot", 3).tolist() == [0.0] + [2.0**-k for k in range(6, -1, -1)]
    assert level_set("uniform", 2).tolist() == pytest.approx([0, 1 / 3, 2 / 3, 1])


@pytest.mark.parametrize("B", range(1, 9))
def test_extended_level_sets_have_2_to_the_B_levels(B):
    lv = level_set("apot", B)
    assert len(lv) == 2**B and lv[0] == 0 and lv[-1] == pytest.approx(1.0)
    assert len(level_set("uniform", B)) == 2**B


def test_projection_is_nearest_with_the_official_tie_order():
    lv = level_set("apot", 2)  # 0, 1/4, 1/2, 1
    from qbench.methods.apot import _tie_up, decision_thresholds

    tie = decision_thresholds(lv, _tie_up("apot", 2, lv))
    x = torch.tensor([0.0, 0.1, 0.13, 0.37, 0.76, 0.74, 1.0])
    assert project(x, lv, tie).tolist() == [0.0, 0.0, 0.25, 0.25, 1.0, 0.5, 1.0]
    # exact midpoints: the official table is list(set([0, .5, .25, .125])), which iterates
    # as [0, .5, .25, .125] -> normalised [0, 1, .5, .25]; its argmin takes the level that
    # comes first: 0 (before .25), .5 (before .25), 1 (before .5)
    mids = torch.tensor([0.125, 0.375, 0.75])
    assert project(mids, lv, tie).tolist() == [0.0, 0.5, 1.0]


def test_projection_equals_the_official_argmin_bit_for_bit():
    # the official table for 4 activation bits, built as its code does (nested loops, a
    # Python set, float32, times float32(1/max)); its projection is the argmin of the float32
    # distances to every level, the first level winning a tie
    p0, p1 = [0.0, 2**-1, 2**-3, 2**-5], [0.0, 2**-2, 2**-4, 2**-6]
    table = torch.tensor(list({a + b for a in p0 for b in p1}), dtype=torch.float32)
    table = table * (1.0 / torch.max(table))
    q = APoTQuantizer(4, "act")
    # every float32 within 2000 ulps of each decision point, plus the midpoints and levels
    bits = q.thresholds.view(torch.int32)
    x = (bits[:, None] + torch.arange(-2000, 2001, dtype=torch.int32)).flatten()
    x = torch.cat([x.view(torch.float32), (q.levels[1:] + q.levels[:-1]) / 2, q.levels])
    reference = table[(x[:, None] - table[None, :]).abs().argmin(dim=1)]
    assert torch.equal(project(x, q.levels, q.thresholds), reference)


# --- the quantization function: values and gradients ------------------------------------


def _weight_reference(w_hat: torch.Tensor, alpha: float, levels: list[float]):
    """Official forward: alpha * sign(c) * nearest(|c|), c = clip(w/alpha, -1, 1)."""
    lv = torch.tensor(levels)
    c = (w_hat / alpha).clamp(-1, 1)
    idx = (c.abs().unsqueeze(-1) - lv).abs().argmin(-1)
    return lv[idx] * c.sign() * alpha


def test_weight_quantizer_values_and_gradients_cifar():
    torch.manual_seed(0)
    w = torch.randn(8, 4, 3, 3)
    q = APoTQuantizer(4, "weight", "apot", "cifar")
    assert q.alpha.item() == 3.0  # official init
    with torch.no_grad():
        q.alpha.fill_(1.5)
    w_ = w.clone().requires_grad_(True)
    out = q(w_)
    w_hat = (w - w.mean()) / w.std()
    expected = _weight_reference(w_hat, 1.5, level_set("apot", 3).tolist())
    torch.testing.assert_close(out, expected)
    g = torch.linspace(-1, 1, w.numel()).view_as(w)
    (out * g).sum().backward()
    u = w_hat / 1.5
    q_u = expected / 1.5
    # official CIFAR _pq.backward: d/dalpha = sign(u) outside, q - u inside; weights' gradient
    # is not clipped; mean/std are constants, so dW = g / std
    d_alpha = torch.where(u.abs() > 1, u.sign(), q_u - u)
    torch.testing.assert_close(q.alpha.grad, (g * d_alpha).sum())
    torch.testing.assert_close(w_.grad, g / w.std())
    assert (u.abs() > 1).any()  # the clipped branch is exercised


def test_weight_quantizer_imagenet_clips_gradient_and_scales_alpha():
    torch.manual_seed(1)
    w_hat = torch.randn(64) * 1.5  # already standardised enough; feed the function directly
    lv = level_set("apot", 4)
    tie = decision_thresholds(lv, torch.zeros(len(lv) - 1, dtype=torch.bool))
    x = w_hat.clone().requires_grad_(True)
    alpha = torch.tensor(2.0, requires_grad=True)
    out = apot_quantize(x, alpha, lv, tie, signed=True, clip_x_grad=True, grad_scale=0.5)
    g = torch.ones_like(out)
    (out * g).sum().backward()
    u = w_hat / 2.0
    inside = u.abs() <= 1
    torch.testing.assert_close(x.grad, inside.float())
    d_alpha = torch.where(~inside, u.sign(), out.detach() / 2.0 - u)
    torch.testing.assert_close(alpha.grad, 0.5 * d_alpha.sum())


def test_two_bit_weights_use_the_calibrated_gradient():
    # 2 bits: {-alpha, 0, alpha} (uniform, round) and the weights' gradient is never clipped,
    # in both official codes, while alpha's gradient keeps the same rule
    for variant in ("cifar", "imagenet"):
        q = APoTQuantizer(2, "weight", "apot", variant)
        with torch.no_grad():
            q.alpha.fill_(1.0)
        x = torch.tensor([-2.5, -0.7, -0.4, 0.0, 0.49, 0.51, 3.0])
        w = x.clone().requires_grad_(True)
        # feed pre-normalised values through the function the module uses
        out = apot_quantize(
            w,
            q.alpha,
            q.levels,
            q.thresholds,
            signed=True,
            n_uniform=q.n_uniform,
            clip_x_grad=False,
        )
        assert out.tolist() == [-1.0, -1.0, -0.0, 0.0, 0.0, 1.0, 1.0]
        out.sum().backward()
        assert w.grad.tolist() == [1.0] * 7
        expected_alpha = sum([-1.0, -1 + 0.7, 0.4, 0.0, -0.49, 1 - 0.51, 1.0])
        assert q.alpha.grad.item() == pytest.approx(expected_alpha, abs=1e-6)
        assert q.max_levels() == 3


@pytest.mark.parametrize("variant", ["cifar", "imagenet"])
def test_activation_quantizer_values_and_gradients(variant):
    q = APoTQuantizer(3, "act", "apot", variant)
    assert q.alpha.item() == (8.0 if variant == "cifar" else 6.0)
    with torch.no_grad():
        q.alpha.fill_(2.0)
    x = torch.tensor([-0.5, 0.0, 0.15, 0.45, 0.9, 1.3, 1.9, 2.5], requires_grad=True)
    out = q(x)
    # levels (B=3) x 2: 0, .2, .4, .6, .8, 1.2, 1.6, 2
    assert out.tolist() == pytest.approx([0.0, 0.0, 0.2, 0.4, 0.8, 1.2, 2.0, 2.0], abs=1e-6)
    out.sum().backward()
    u = x.detach() / 2.0
    qn = out.detach() / 2.0
    if variant == "cifar":  # clamp(max=1) only: below 0 passes
        dx = (u <= 1).float()
        da = torch.where(u > 1, torch.ones_like(u), qn - u)
    else:  # clamp(0, 1)
        dx = ((u <= 1) & (u >= 0)).float()
        da = torch.where(u > 1, torch.ones_like(u), torch.where(u < 0, torch.zeros_like(u), qn - u))
    torch.testing.assert_close(x.grad, dx)
    torch.testing.assert_close(q.alpha.grad, da.sum())


def test_uniform_activation_levels():
    q = APoTQuantizer(2, "act", "uniform", "imagenet")
    with torch.no_grad():
        q.alpha.fill_(3.0)
    x = torch.tensor([0.4, 0.6, 1.6, 2.6, 4.0])
    assert q(x).tolist() == pytest.approx([0.0, 1.0, 2.0, 3.0, 3.0])


def test_max_scaled_first_last_weights():
    w = torch.tensor([-0.5, 0.1, 0.2, 0.4], requires_grad=True)
    out = MaxScaled8bit()(w)
    expected = torch.round(w.detach() / 0.4 * 127) / 127 * 0.4
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    assert w.grad.tolist() == [1.0] * 4


def test_channels_last_and_buffers():
    q = APoTQuantizer(4, "act")
    x = torch.rand(2, 8, 5, 5) * 10
    xc = x.contiguous(memory_format=torch.channels_last)
    out = q(xc)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, q(x))
    assert "levels" in dict(q.named_buffers()) and "levels" not in q.state_dict()
    w = torch.randn(8, 4, 3, 3).contiguous(memory_format=torch.channels_last)
    wq = APoTQuantizer(4, "weight")
    torch.testing.assert_close(wq(w), wq(w.contiguous()))


# --- the method on a model --------------------------------------------------------------


def test_method_registered_and_prepares_resnet20():
    assert get_method("apot") is APoT
    model = create_model("resnet20", num_classes=10)
    m = APoT(4, 4).prepare(model)
    assert isinstance(m.conv1.weight_quantizer, MaxScaled8bit)
    assert m.conv1.a_bits == 32 and m.fc.a_bits == 32
    assert m.layer1[0].conv1.w_bits == 4 and m.layer2[0].downsample[0].a_bits == 4
    x = torch.randn(2, 3, 32, 32)
    y = m(x)
    y.sum().backward()
    assert m.layer1[0].conv1.act_quantizer.alpha.grad is not None
    groups = APoT(4, 4).param_groups(m, Recipe(weight_decay=1e-4, lr=0.04))
    lrs = sorted(g.get("lr", 0.04) for g in groups)
    assert lrs == [0.02, 0.04, 0.1]  # official CIFAR: act alpha 0.1, weight alpha 0.02


def test_options_rejected():
    with pytest.raises(ValidationError):
        APoT(4, 4, levels="nope")
    with pytest.raises(ValidationError):
        APoT(4, 4, grad_scale=-1)


def test_official_key_mapping_and_import_errors():
    mapped = official_to_qbench(
        {
            "module.layer1.0.conv1.act_alpha": torch.tensor(1.0),
            "module.layer1.0.conv1.weight_quant.wgt_alpha": torch.tensor(2.0),
            "module.fc.weight": torch.zeros(1),
        }
    )
    assert set(mapped) == {
        "layer1.0.conv1.act_quantizer.alpha",
        "layer1.0.conv1.weight_quantizer.alpha",
        "fc.weight",
    }
    from qbench.methods.apot import import_checkpoint

    model = APoT(4, 4).prepare(create_model("resnet20", num_classes=10))
    with pytest.raises(QbenchError, match="does not fit"):
        import_checkpoint({"state_dict": {"module.fc.weight": torch.zeros(10, 64)}}, model, "x.pth")
    with pytest.raises(QbenchError, match="not an APoT checkpoint"):
        import_checkpoint({"state_dict": [1, 2]}, model, "x.pth")


def test_trains_a_few_steps_on_cpu():
    torch.manual_seed(0)
    model = APoT(3, 3).prepare(create_model("resnet20", num_classes=10))
    opt = torch.optim.SGD(APoT(3, 3).param_groups(model, Recipe(weight_decay=1e-4)), lr=0.01, momentum=0.9)
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    a0 = model.layer1[0].conv1.act_quantizer.alpha.item()
    for _ in range(3):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.isfinite(loss)
    assert model.layer1[0].conv1.act_quantizer.alpha.item() != a0


def test_cifar_resnet_layout_matches_the_official_names():
    m = create_model("resnet20", num_classes=10)
    names = set(m.state_dict())
    # the official CIFAR10/models/resnet.py names (projection shortcut, option B)
    for k in ("conv1.weight", "bn1.running_mean", "layer1.2.conv2.weight", "layer2.0.downsample.0.weight",
              "layer3.0.downsample.1.running_var", "fc.bias"):  # fmt: skip
        assert k in names
    assert sum(p.numel() for p in m.parameters()) == 272_474
    pad = create_model("resnet20", num_classes=10, shortcut="pad")  # option A, no parameters
    assert sum(p.numel() for p in pad.parameters()) == 269_722
    assert pad(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match="shortcut"):
        create_model("resnet20", num_classes=10, shortcut="nope")
    assert len([n for n in create_model("resnet56", num_classes=10).state_dict() if n.endswith("conv1.weight")]) == 28
