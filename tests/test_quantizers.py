"""Quantizer modules, the layer swapper and the footprint: initialisation rules, gradient
scales, the QEM update, first/last-layer policies, byte counts, BOPs and the bit audit,
channels_last, and torch.compile without graph breaks in the steady state."""

from __future__ import annotations

import math

import pytest
import torch
from qbench.methods.dorefa import DoReFaAct, DoReFaWeight
from qbench.methods.footprint import count_macs, footprint
from qbench.methods.functional import binary_codes, lq_levels, lq_quantize
from qbench.methods.lqnet import LQQuantizer
from qbench.methods.lsq import LSQQuantizer, weight_quantizer
from qbench.methods.modules import Identity, QuantConv2d, Quantizer, quantize_model
from qbench.methods.pact import PACTAct
from qbench.methods.uniform import MinMaxAct, MinMaxWeight
from torch import nn


def _randn(*shape: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


class Net(nn.Module):
    """conv(1->4) - BN - ReLU - conv(4->8) - BN - ReLU - pool - linear(8->3)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.b1 = nn.BatchNorm2d(4)
        self.c2 = nn.Conv2d(4, 8, 3, padding=1, bias=False)
        self.b2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        x = torch.relu(self.b2(self.c2(x)))
        return self.fc(x.mean((2, 3)))


# --- LSQ -------------------------------------------------------------------------------


def test_lsq_weight_init_and_gradient_scale():
    """Init s = 2<|v|>/sqrt(Q_P); the step's gradient is scaled by 1/sqrt(N_W Q_P)."""
    w = _randn(8, 4, 3, 3, scale=0.1).requires_grad_()
    q = weight_quantizer(3)
    q.train()
    q._init(w)
    qp = 3
    assert torch.isclose(q.step.detach(), 2 * w.detach().abs().mean() / math.sqrt(qp))
    q(w).sum().backward()
    s = float(q.step.detach())
    r = w.detach() / s
    inside = (r > -4) & (r < qp)
    raw = torch.where(inside, -r + r.round(), torch.where(r <= -4, -4.0, float(qp))).sum()
    assert torch.isclose(q.step.grad, raw / math.sqrt(w.numel() * qp), rtol=1e-4)


def test_lsq_activation_init_on_first_batch_only_and_gradient_scale():
    q = LSQQuantizer(2, signed=None)
    q.train()
    x1 = _randn(5, 6, 4, 4).relu().requires_grad_()
    y = q(x1)
    assert q.is_initialized() and not bool(q.is_signed)  # non-negative input: unsigned grid
    assert torch.isclose(q.step.detach(), 2 * x1.detach().abs().mean() / math.sqrt(3))
    first = q.step.detach().clone()
    y.sum().backward()
    s = float(first)
    r = x1.detach() / s
    raw = torch.where(r < 3, -r + r.round(), torch.tensor(3.0)).sum()
    # N_F: features per example
    assert torch.isclose(q.step.grad, raw / math.sqrt(x1[0].numel() * 3), rtol=1e-4)
    q(_randn(5, 6, 4, 4, seed=1).relu() * 10)  # a second batch does not re-initialise
    assert torch.equal(q.step.detach(), first)


def test_lsq_signed_activation_grid_when_input_has_negatives():
    q = LSQQuantizer(4, signed=None)
    q.train()
    y = q(_randn(4, 3, 5, 5))
    assert bool(q.is_signed)
    assert (y < 0).any() and torch.unique(y).numel() <= 16


def test_initialized_flag_survives_state_dict_round_trip():
    q = LSQQuantizer(2, signed=None)
    q.train()
    q(_randn(2, 3, 4, 4).relu())
    fresh = LSQQuantizer(2, signed=None)
    assert not fresh.is_initialized()
    fresh.load_state_dict(q.state_dict())
    assert fresh.is_initialized() and torch.equal(fresh.step, q.step)
    # and a loaded uninitialised state resets the mirror
    q.load_state_dict(LSQQuantizer(2, signed=None).state_dict())
    assert not q.is_initialized()


# --- PACT / DoReFa modules ---------------------------------------------------------------


def test_pact_module_alpha_gradient():
    q = PACTAct(2, alpha_init=1.0)
    x = torch.tensor([[0.2, 0.5, 1.0, 3.0]])
    q(x).sum().backward()
    assert torch.isclose(q.alpha.grad, torch.tensor(2.0))  # two elements at or above alpha
    assert q.scale_count() == 1  # alpha is stored (it scales the codes)


def test_dorefa_modules_store_no_scale_beyond_1_bit():
    assert DoReFaWeight(2).scale_count() == 0 and DoReFaAct(2).scale_count() == 0
    assert DoReFaWeight(1).scale_count() == 1


# --- LQ-Net ------------------------------------------------------------------------------


def test_lq_weight_init_follows_official_code():
    q = LQQuantizer(2, signed=True, groups=8, fan=3 * 3 * 8)
    base = 0.6745 * math.sqrt(2 / 72) / 2
    assert torch.allclose(q.basis, torch.tensor([[base] * 8, [2 * base] * 8]))
    a = LQQuantizer(2, signed=False)
    assert torch.allclose(a.basis.flatten(), torch.tensor([0.6745 * 2 / 3, 0.6745 * 4 / 3]))


def test_lq_qem_moving_average_step_in_training_only():
    """One training forward: codes from the current basis, then the basis moves to v*, the
    ridge least-squares basis (official delta) for those codes, per channel: the first
    update of TF's zero-debiased moving average (0.1 v* / (1 - 0.9)) is v* itself."""
    torch.manual_seed(0)
    w = _randn(4, 2, 3, 3, scale=0.2)
    q = LQQuantizer(2, signed=True, groups=4, fan=36)
    old = q.basis.clone()
    q.eval()
    y_eval = q(w)
    assert torch.equal(q.basis, old)  # eval: no update
    q.train()
    y = q(w)
    assert torch.equal(y, y_eval)  # quantized with the basis before the update
    rows = w.reshape(4, -1)
    levels, sorted_codes = lq_levels(old, binary_codes(2, True))
    _, idx = lq_quantize(rows, levels)
    for c in range(4):
        b = sorted_codes[c][idx[c]]  # [M, K]
        lhs = b.t() @ b + 1e-4 * torch.eye(2)
        rhs = b.t() @ rows[c] + 1e-4 * old[:, c]
        v_star = torch.linalg.solve(lhs, rhs)
        assert torch.allclose(q.basis[:, c], v_star, atol=1e-6)
    # per-channel scale groups hold at most 2^K values
    assert all(torch.unique(g).numel() <= 4 for g in q.groups(y))


def test_lq_gradients_weights_identity_activations_clipped_at_top_level():
    w = _randn(3, 2, 1, 1).requires_grad_()
    LQQuantizer(2, signed=True, groups=3, fan=3)(w).sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))
    a = LQQuantizer(2, signed=False)
    a.eval()
    top = float(lq_levels(a.basis, a.codes)[0][0, -1])
    x = torch.tensor([0.1, 0.5, top - 0.01, top + 0.5, 9.0], requires_grad=True)
    a(x).sum().backward()
    assert torch.equal(x.grad, torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0]))


def test_lq_ternary_levels():
    w = _randn(6, 3, 3, 3, scale=0.3)
    q = LQQuantizer(2, signed=True, groups=6, fan=54, ternary=True)
    q.train()
    for _ in range(30):
        y = q(w)
    assert q.max_levels() == 3
    for g in q.groups(y):
        vals = torch.unique(g)
        assert vals.numel() <= 3
        assert torch.allclose(vals, -vals.flip(0))  # {-v, 0, v}
    a = LQQuantizer(2, signed=False, ternary=True)
    a.train()
    x = _randn(4, 3, 5, 5).relu()
    a(x)
    a.eval()
    vals = torch.unique(a(x))
    v = float(a.basis)
    assert vals.numel() <= 3
    assert all(min(abs(float(u) - t) for t in (0.0, v, 2 * v)) < 1e-6 for u in vals)


@pytest.mark.parametrize("bits", [2, 3])
def test_lq_qem_reduces_quantization_error(bits):
    w = _randn(8, 16, 3, 3, scale=0.05)
    q = LQQuantizer(bits, signed=True, groups=8, fan=72)
    q.train()
    err0 = (q(w) - w).pow(2).mean()
    for _ in range(50):
        q(w)
    q.eval()
    assert (q(w) - w).pow(2).mean() < 0.8 * err0


# --- every quantizer: channels_last, idempotence, compile ----------------------------------


def _quantizers() -> dict[str, tuple[Quantizer, Quantizer]]:
    def lsq_w():
        q = weight_quantizer(4)
        q._init(_randn(8, 4, 3, 3, scale=0.1))
        return q

    return {
        "lsq": (lsq_w(), LSQQuantizer(4, signed=None)),
        "dorefa": (DoReFaWeight(4), DoReFaAct(4)),
        "pact": (DoReFaWeight(4), PACTAct(4, alpha_init=2.0)),
        "lqnet": (LQQuantizer(2, True, groups=8, fan=72), LQQuantizer(2, False)),
        "uniform": (MinMaxWeight(4, 8), MinMaxAct(4)),
    }


def _layer(wq: Quantizer, aq: Quantizer) -> QuantConv2d:
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 8, 3, padding=1, bias=False)
    model = quantize_model(nn.Sequential(conv), lambda m, n, b: wq, lambda m, n, b: aq, 4, 4, first_last="same")
    return model[0]


@pytest.mark.parametrize("name", ["lsq", "dorefa", "pact", "lqnet", "uniform"])
def test_channels_last_gives_the_same_output(name):
    wq, aq = _quantizers()[name]
    layer = _layer(wq, aq)
    x = _randn(2, 4, 6, 6).relu()
    layer.train()
    layer(x)  # initialise
    layer.eval()
    ref = layer(x)
    layer_cl = layer.to(memory_format=torch.channels_last)
    out = layer_cl(x.contiguous(memory_format=torch.channels_last))
    assert torch.allclose(out, ref, atol=1e-5)
    # the activation quantizer keeps the input's memory format
    q = aq(x.contiguous(memory_format=torch.channels_last))
    assert q.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("name", ["lsq", "dorefa", "pact", "lqnet", "uniform"])
def test_activation_quantizers_are_idempotent(name):
    _, aq = _quantizers()[name]
    x = _randn(3, 4, 5, 5).relu()
    aq.train()
    aq(x)
    aq.eval()
    y = aq(x)
    assert torch.allclose(aq(y), y, atol=1e-6)


@pytest.mark.parametrize("name", ["lsq", "dorefa", "pact", "lqnet", "uniform"])
def test_compiles_without_graph_breaks_in_steady_state(name):
    """After the first (initialising) call, a training step and an eval step each trace
    into one graph: no host reads, no data-dependent Python branches."""
    torch._dynamo.reset()
    wq, aq = _quantizers()[name]
    layer = _layer(wq, aq)
    x = _randn(2, 4, 6, 6).relu()
    layer.train()
    layer(x)  # eager: data-driven initialisation
    compiled = torch.compile(layer, backend="eager", fullgraph=True)
    compiled(x).sum().backward()  # raises on a graph break
    layer.eval()
    with torch.no_grad():
        compiled(x)


# --- the swapper's first/last-layer policies ---------------------------------------------


@pytest.mark.parametrize(
    "policy, expect",
    [
        ("fp", {"c1": None, "c2": (2, 2), "fc": None}),
        ("8bit", {"c1": (8, 8), "c2": (2, 2), "fc": (8, 8)}),
        ("same", {"c1": (2, 2), "c2": (2, 2), "fc": (2, 2)}),
        ("fp_weights", {"c1": None, "c2": (2, 2), "fc": (32, 2)}),
    ],
)
def test_first_last_policies(policy, expect):
    net = quantize_model(
        Net(),
        lambda m, n, b: DoReFaWeight(b),
        lambda m, n, b: DoReFaAct(b),
        2,
        2,
        first_last=policy,
    )
    for name, bits in expect.items():
        layer = getattr(net, name)
        if bits is None:
            assert type(layer) in (nn.Conv2d, nn.Linear)
        else:
            assert (layer.weight_quantizer.bits, layer.act_quantizer.bits) == bits
            if bits[0] == 32:
                assert isinstance(layer.weight_quantizer, Identity)


def test_first_last_8bit_keeps_higher_precision():
    net = quantize_model(Net(), lambda m, n, b: DoReFaWeight(b), lambda m, n, b: DoReFaAct(b), 16, 32, "8bit")
    assert net.c1.weight_quantizer.bits == 16 and isinstance(net.c1.act_quantizer, Identity)


# --- footprint: bytes, BOPs, audit ---------------------------------------------------------


def _lsq_net(w_bits: int, a_bits: int) -> nn.Module:
    net = quantize_model(
        Net(),
        lambda m, n, b: weight_quantizer(b),
        lambda m, n, b: LSQQuantizer(b, signed=None),
        w_bits,
        a_bits,
        first_last="fp",
    )
    net.c2.weight_quantizer._init(net.c2.weight)
    return net


def test_footprint_bytes_and_compression_ratio():
    net = _lsq_net(2, 2)
    fp = footprint(net.eval())
    # FP32 model: convs 36 + 288, BN 2 x (4+4+4+4) + 2 x (8+8+8+8) ... all float tensors
    n_float = sum(t.numel() for t in Net().state_dict().values() if t.is_floating_point())
    assert fp.fp32_bytes == 4 * n_float
    # stored: c2 weights at 2 bits + two LSQ steps at 32 bits; everything else at 32 bits
    expected = 4 * (n_float - 288) + 288 * 2 / 8 + 2 * 4
    assert fp.total_bytes == expected
    assert fp.compression_ratio == pytest.approx(fp.fp32_bytes / expected)
    layer = {lf.name: lf for lf in fp.layers}
    assert layer["c2"].bytes == 288 * 2 / 8 + 2 * 4


def test_footprint_bops_are_macs_times_bits():
    net = _lsq_net(4, 2)
    x = _randn(1, 1, 5, 5)
    fp = footprint(net.eval(), x)
    layer = {lf.name: lf for lf in fp.layers}
    assert layer["c1"].macs == 5 * 5 * 4 * 9 and layer["c1"].bops == layer["c1"].macs * 32 * 32
    assert layer["c2"].macs == 5 * 5 * 8 * 4 * 9 and layer["c2"].bops == layer["c2"].macs * 4 * 2
    assert layer["fc"].macs == 8 * 3 and layer["fc"].bops == 24 * 32 * 32
    assert fp.bops == sum(lf.bops for lf in fp.layers)
    assert count_macs(net, x)["c2"] == 5 * 5 * 8 * 4 * 9


def test_bit_audit_counts_distinct_values_per_scale_group():
    net = _lsq_net(2, 2)
    fp = footprint(net.eval())
    c2 = {lf.name: lf for lf in fp.layers}["c2"]
    assert fp.audit_ok and c2.distinct_max <= 4 and c2.levels_allowed == 4

    class Leaky(Quantizer):  # claims 2 bits, stores full precision
        def forward(self, w):
            return w

    net.c2.weight_quantizer = Leaky(2)
    fp = footprint(net)
    assert not fp.audit_ok
    assert {lf.name: lf for lf in fp.layers}["c2"].distinct_max == 288


def test_audit_does_not_move_quantizer_state():
    net = quantize_model(
        Net(),
        lambda m, n, b: LQQuantizer(b, True, groups=m.weight.shape[0], fan=9),
        lambda m, n, b: LQQuantizer(b, False),
        2,
        2,
        first_last="fp",
    )
    net.train()  # even in training mode the audit is read-only
    before = {k: v.clone() for k, v in net.state_dict().items()}
    fp = footprint(net, _randn(1, 1, 5, 5))
    assert fp.audit_ok
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
