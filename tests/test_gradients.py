"""Straight-through gradients and basis updates pinned to hand-computed values.

1. ``fake_quant`` (uniform): the gradient w.r.t. the input is 1 for every integer code in
   ``[-Q_N, Q_P]``, both end codes included, and 0 for clipped codes, as
   ``torch.fake_quantize_per_tensor_affine``.
2. APoT, CIFAR code (``CIFAR10/models/quant_layer.py``, ``act_quantization._uq``):
   activations are clipped with ``clamp(max=1)`` only, so on the uniform path a negative
   input rounds to a negative level; gradients as ``_uq.backward``.
3. LQ-Nets (``learned_quantization.py``): the basis follows TensorFlow's zero-debiased
   moving average (``assign_moving_average``, ``zero_debias=True`` by default), so the first
   update is the least-squares basis; conv1 and a projection shortcut reading the same
   tensor share one activation quantizer.

Every expected number is written out here (worked by hand in the comments), not computed
by the code under test.
"""

from __future__ import annotations

import pytest
import torch
from qbench.harness.models import create_model
from qbench.methods import get_method
from qbench.methods.apot import APoTQuantizer
from qbench.methods.functional import fake_quant
from qbench.methods.lqnet import SETTLED_STEP, LQQuantizer
from qbench.methods.uniform import MinMaxAct, MinMaxWeight

# --- 1. uniform fake-quantization ------------------------------------------------------


def test_fake_quant_gradient_passes_at_the_end_codes_and_stops_beyond():
    # signed 2 bits: codes {-2, -1, 0, 1}, s = 0.5. v / s and its code:
    #  -1.3 -> -2.6 -> -3 (clipped)   -1.0 -> -2 (end)   -0.8 -> -1.6 -> -2 (end)
    #  -0.2 -> -0.4 -> 0              0.3 -> 0.6 -> 1 (end)   0.5 -> 1 (end)
    #   0.7 -> 1.4 -> 1 (end)         0.76 -> 1.52 -> 2 (clipped)   1.1 -> 2.2 -> 2 (clipped)
    v = torch.tensor([-1.3, -1.0, -0.8, -0.2, 0.3, 0.5, 0.7, 0.76, 1.1], requires_grad=True)
    y = fake_quant(v, torch.tensor(0.5), 2, 1)
    assert y.tolist() == [-1.0, -1.0, -1.0, 0.0, 0.5, 0.5, 0.5, 0.5, 0.5]
    y.backward(torch.ones(9))
    assert v.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0]

    ref = v.detach().clone().requires_grad_(True)
    r = torch.fake_quantize_per_tensor_affine(ref, 0.5, 0, -2, 1)
    r.backward(torch.ones(9))
    assert torch.equal(r, y.detach())
    assert torch.equal(ref.grad, v.grad)


def test_fake_quant_with_zero_point_gradients_of_input_scale_and_zero_point():
    # unsigned 3 bits: codes 0..7, s = 0.25, z = 3; code = round(x / s) + z:
    #  -1.3 -> round(-5.2) + 3 = -2 (clipped to 0)   -0.75 -> -3 + 3 = 0 (end)
    #  -0.4 -> round(-1.6) + 3 = 1    0.05 -> round(0.2) + 3 = 3    1.0 -> 4 + 3 = 7 (end)
    #   1.1 -> round(4.4) + 3 = 7 (end)   1.2 -> round(4.8) + 3 = 8 (clipped to 7)
    x = torch.tensor([-1.3, -0.75, -0.4, 0.05, 1.0, 1.1, 1.2])
    g = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0])
    v = x.clone().requires_grad_(True)
    s = torch.tensor(0.25, requires_grad=True)
    z = torch.tensor(3.0, requires_grad=True)
    y = fake_quant(v, s, 0, 7, z)
    # (code - z) s: (0-3), (0-3), (1-3), 0, 4, 4, 4 times 0.25
    assert y.tolist() == [-0.75, -0.75, -0.5, 0.0, 1.0, 1.0, 1.0]
    y.backward(g)
    assert v.grad.tolist() == [0.0, 2.0, 3.0, 4.0, 5.0, 6.0, 0.0]
    # d/ds: inside (code - z) - x/s: 0 - 0 = 0, -2 + 1.6 = -0.4, 0 - 0.2 = -0.2, 4 - 4 = 0,
    # 4 - 4.4 = -0.4; clipped: the bound minus z, 0 - 3 = -3 and 7 - 3 = 4.
    # sum g * d: -3 + 0 - 1.2 - 0.8 + 0 - 2.4 + 28 = 20.6
    assert s.grad.item() == pytest.approx(20.6, abs=1e-5)
    # d/dz: 0 inside, -s where clipped: -0.25 (1 + 7) = -2
    assert z.grad.item() == pytest.approx(-2.0, abs=1e-6)

    ref = x.clone().requires_grad_(True)
    torch.fake_quantize_per_tensor_affine(ref, 0.25, 3, 0, 7).backward(g)
    assert torch.equal(ref.grad, v.grad)


def test_min_max_weight_channel_extremes_keep_their_gradient():
    # 4-bit symmetric per channel, Q_P = 7: s_0 = 1/7, s_1 = 2/7; the channel's largest
    # magnitude lands on the end code (+7 / -7) and must still pass the gradient
    w = torch.tensor([[0.3, -0.25, 1.0], [-2.0, 0.6, 0.1]], requires_grad=True)
    y = MinMaxWeight(4, 2)(w)
    # codes: 2.1 -> 2, -1.75 -> -2, 7 | -7, 2.1 -> 2, 0.35 -> 0
    expected = [[2 / 7, -2 / 7, 1.0], [-2.0, 4 / 7, 0.0]]
    torch.testing.assert_close(y, torch.tensor(expected))
    y.sum().backward()
    assert w.grad.tolist() == [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]


def test_min_max_activation_range_ends_keep_their_gradient():
    q = MinMaxAct(2)  # codes 0..3
    q.observing = True
    q(torch.tensor([-0.3, 0.0, 0.45, 0.9]))  # lo = -0.3, hi = 0.9
    q.observing = False
    q.eval()
    # s = 1.2 / 3 = 0.4, z = round(0.3 / 0.4) = round(0.75) = 1; code = round(x / s) + 1:
    # -0.9 -> round(-2.25) + 1 = -1 (clipped)   -0.3 -> round(-0.75) + 1 = 0 (end)
    #  0.1 -> 0 + 1 = 1    0.9 -> round(2.25) + 1 = 3 (end)    1.3 -> round(3.25) + 1 = 4 (clipped)
    x = torch.tensor([-0.9, -0.3, 0.1, 0.9, 1.3], requires_grad=True)
    y = q(x)
    torch.testing.assert_close(y, torch.tensor([-0.4, -0.4, 0.0, 0.8, 0.8]))
    y.sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]


# --- 2. APoT: the CIFAR code's activation clipping ---------------------------------------


def test_apot_uniform_cifar_activations_negative_inputs_as_the_official_code():
    # CIFAR10/models/quant_layer.py, act_quantization(power=False): u = x / alpha,
    # c = u.clamp(max=1), q = round(c * 15) / 15 (4 bits), output q * alpha;
    # _uq.backward: dx = g (u <= 1), dalpha = g * (1 if u > 1 else q - u).
    q = APoTQuantizer(4, "act", "uniform", "cifar", alpha_init=2.0)
    x = torch.tensor([-0.7, -0.1, 0.3, 2.5], requires_grad=True)
    # u = -0.35, -0.05, 0.15, 1.25 -> c * 15 = -5.25, -0.75, 2.25, 15 -> -5, -1, 2, 15
    y = q(x)
    torch.testing.assert_close(y, torch.tensor([-2 / 3, -2 / 15, 4 / 15, 2.0]))
    y.backward(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert x.grad.tolist() == [1.0, 2.0, 3.0, 0.0]
    # q - u: -1/3 + 0.35 = 1/60, -1/15 + 0.05 = -1/60, 2/15 - 0.15 = -1/60; above: 1
    # 1/60 - 2/60 - 3/60 + 4 = 4 - 4/60 = 59/15
    assert q.alpha.grad.item() == pytest.approx(59 / 15, abs=1e-5)


def test_apot_uniform_imagenet_activations_still_clip_at_zero():
    # ImageNet/models/quant_layer.py, uniform_quantization(is_weight=False): clamp(0, 1)
    q = APoTQuantizer(4, "act", "uniform", "imagenet", alpha_init=2.0)
    x = torch.tensor([-0.7, -0.1, 0.3, 2.5], requires_grad=True)
    y = q(x)
    torch.testing.assert_close(y, torch.tensor([0.0, 0.0, 4 / 15, 2.0]))
    y.backward(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert x.grad.tolist() == [0.0, 0.0, 3.0, 0.0]
    # 3 (2/15 - 0.15) + 4 = 4 - 3/60 = 3.95
    assert q.alpha.grad.item() == pytest.approx(3.95, abs=1e-5)


def test_apot_cifar_activations_negative_inputs_project_to_zero():
    # power=True: the nearest level of a negative u is 0; dx = 1, dalpha = 0 - u
    q = APoTQuantizer(3, "act", "apot", "cifar", alpha_init=2.0)
    x = torch.tensor([-0.6, -0.2], requires_grad=True)
    y = q(x)
    assert y.tolist() == [0.0, 0.0]
    y.backward(torch.tensor([1.0, 2.0]))
    assert x.grad.tolist() == [1.0, 2.0]
    assert q.alpha.grad.item() == pytest.approx(0.3 + 2 * 0.1, abs=1e-6)


# --- 3. LQ-Nets: zero-debiased moving average, shared activation basis ---------------------

# 2-bit activations, initial basis (official): v = 0.6745 * 2/3 * (1, 2) = (0.449667, 0.899333);
# levels 0, 0.449667, 0.899333, 1.349; thresholds 0.224833, 0.6745, 1.12450.
LQ_X = torch.tensor([0.0, 0.5, 0.6, 1.0, 1.2, 2.0])
# codes e (bit 0, bit 1): 0 -> (0,0); 0.5, 0.6 -> (1,0); 1.0 -> (0,1); 1.2, 2.0 -> (1,1).
# B^T B = [[4, 2], [2, 3]], B^T x = [4.3, 4.2]; without the ridge v* = [[3, -2], [-2, 4]] / 8
# (4.3, 4.2) = (4.5 / 8, 8.2 / 8) = (0.5625, 1.025). With the ridge delta = 1e-4
# ((B^T B + delta I) v = B^T x + delta v_old), solved exactly with fractions:
LQ_V1 = [0.56249891, 1.02499654]
# the old rule (version 1): 0.9 v_old + 0.1 v* = (0.46094989, 0.91189965)
LQ_OLD_RULE = [0.46094989, 0.91189965]
# squared errors of LQ_X, /6 (levels 0, .5625, 1.025, 1.5875 vs 0, .46095, .91190, 1.37285):
# new: .0625^2 + .0375^2 + .025^2 + .175^2 + .4125^2 = 0.206719 (ridge-exact 0.2067235) / 6
LQ_MSE_NEW = 0.0344539149
# old: .03905^2 + .13905^2 + .08810^2 + .17285^2 + .62715^2 = 0.451816 / 6
LQ_MSE_OLD = 0.0753026956
# second step on the same x: codes (0,0), (1,0), (1,0), (0,1), (0,1), (1,1):
# B^T B = [[3, 1], [1, 3]], B^T x = [3.1, 4.2] -> v*_2 = (5.1 / 8, 9.5 / 8) = (0.6375, 1.1875)
# (ridge: 0.63749922, 1.18749484); debiased average (0.09 v*_1 + 0.1 v*_2) / (1 - 0.81):
LQ_V2 = [0.60197276, 1.11052196]


def _act_quantizer() -> LQQuantizer:
    q = LQQuantizer(2, signed=False)
    torch.testing.assert_close(q.basis.flatten(), torch.tensor([0.6745 * 2 / 3, 0.6745 * 4 / 3]))
    return q


def _mse(q: LQQuantizer) -> float:
    q.eval()
    with torch.no_grad():
        return float((q(LQ_X) - LQ_X).pow(2).mean())


def test_lq_first_update_is_the_least_squares_basis():
    q = _act_quantizer().train()
    q(LQ_X)
    torch.testing.assert_close(q.basis.flatten(), torch.tensor(LQ_V1), rtol=0, atol=1e-6)
    assert int(q.local_step) == 1
    # TF's biased accumulator after one step: 0.1 v*
    torch.testing.assert_close(q.biased.flatten(), 0.1 * torch.tensor(LQ_V1), rtol=0, atol=1e-7)
    q.train()
    q(LQ_X)
    torch.testing.assert_close(q.basis.flatten(), torch.tensor(LQ_V2), rtol=0, atol=1e-6)
    assert int(q.local_step) == 2


def test_lq_two_bit_error_after_one_step_vs_the_plain_average():
    q = _act_quantizer().train()
    q(LQ_X)
    assert _mse(q) == pytest.approx(LQ_MSE_NEW, abs=1e-6)
    old = _act_quantizer()
    with torch.no_grad():
        old.basis.copy_(torch.tensor(LQ_OLD_RULE).view(2, 1))
    assert _mse(old) == pytest.approx(LQ_MSE_OLD, abs=1e-6)


def test_lq_weight_first_update_is_the_least_squares_basis_per_channel():
    # signed 1-bit, 2 channels: levels {-v, v}, codes e = sign(w), so B^T B = M = 3 and
    # B^T w = sum |w|; with the official ridge, v* = (sum |w| + delta v_old) / (M + delta),
    # v_old = 0.6745 sqrt(2 / fan) = 0.6745 (fan = 2):
    # channel 0: |w| = .2, .4, .6: (1.2 + 0.00006745) / 3.0001 = 0.40000915 (0.4 without ridge)
    # channel 1: |w| = .1, .1, .7: (0.9 + 0.00006745) / 3.0001 = 0.30001248 (0.3 without ridge)
    w = torch.tensor([[0.2, -0.4, 0.6], [-0.1, 0.1, -0.7]])
    q = LQQuantizer(1, signed=True, groups=2, fan=2).train()
    q(w)
    torch.testing.assert_close(q.basis.flatten(), torch.tensor([0.40000915, 0.30001248]), rtol=0, atol=1e-6)


def test_lq_moving_average_state_is_saved_and_old_checkpoints_load():
    q = _act_quantizer().train()
    q(LQ_X)
    state = q.state_dict()
    assert {"basis", "biased", "local_step"} <= set(state)
    assert q.scale_count() == 2  # only the basis is stored for inference
    resumed = _act_quantizer()
    resumed.load_state_dict(state)
    resumed.train()
    resumed(LQ_X)
    torch.testing.assert_close(resumed.basis.flatten(), torch.tensor(LQ_V2), rtol=0, atol=1e-6)

    # a version-1 checkpoint (basis only): a settled average that continues from its basis
    old = {k: v for k, v in state.items() if k not in ("biased", "local_step")}
    legacy = _act_quantizer()
    legacy.load_state_dict(old)  # strict: the missing state is filled in
    assert int(legacy.local_step) == SETTLED_STEP
    torch.testing.assert_close(legacy.biased, legacy.basis)
    legacy.train()
    legacy(LQ_X)  # codes from LQ_V1 as in the second step: v*_2 = (0.63749922, 1.18749484)
    expected = [0.9 * 0.56249891 + 0.1 * 0.63749922, 0.9 * 1.02499654 + 0.1 * 1.18749484]
    torch.testing.assert_close(legacy.basis.flatten(), torch.tensor(expected), rtol=0, atol=1e-6)

    # a parent at other bits (basis filtered out by shape): the state stays the quantizer's
    fresh = _act_quantizer()
    fresh.load_state_dict({"local_step": torch.tensor(7)}, strict=False)
    assert int(fresh.local_step) == 0


@pytest.mark.parametrize(
    "model, kwargs, blocks",
    [
        ("resnet20", {"num_classes": 10}, ["layer2.0", "layer3.0"]),
        ("resnet18", {"num_classes": 10, "image_size": 32}, ["layer2.0", "layer3.0", "layer4.0"]),
    ],
)
def test_lq_conv1_and_projection_shortcut_share_one_activation_basis(model, kwargs, blocks):
    torch.manual_seed(0)
    net = get_method("lqnet")(2, 2).prepare(create_model(model, **kwargs), None)
    for name in blocks:
        block = net.get_submodule(name)
        a, b = block.conv1.act_quantizer, block.downsample[0].act_quantizer
        assert a is b and a.basis is b.basis and a.readers == 2
        assert a.basis.data_ptr() == net.state_dict()[f"{name}.downsample.0.act_quantizer.basis"].data_ptr()
    plain = net.get_submodule("layer2.1")
    assert plain.conv1.act_quantizer.readers == 1  # identity shortcut: nothing to share
    weights = {id(m.weight_quantizer) for m in (net.layer2[0].conv1, net.layer2[0].downsample[0])}
    assert len(weights) == 2  # weight bases stay per layer

    shared = net.get_submodule(blocks[0]).conv1.act_quantizer
    seen: list[torch.Tensor] = []
    hook = shared.register_forward_hook(lambda m, i, o: seen.append(o))
    net.train()
    net(torch.rand(2, 3, 32, 32)).sum().backward()
    hook.remove()
    assert len(seen) == 2 and seen[0] is seen[1]  # one quantized tensor for both readers
    assert int(shared.local_step) == 1  # one basis update per forward pass
    assert shared._pending is None


def test_changed_methods_have_version_2():
    assert get_method("uniform").version == 2
    assert get_method("apot_uniform").version == 2
    assert get_method("lqnet").version == 2
