"""The quantization primitives against the papers' formulas, on fixed tensors and on
random ones (hypothesis): forward values, levels and range, gradients, idempotence."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from qbench.methods import functional as Fq

SETTINGS = settings(max_examples=40, deadline=None)


def _tensor(seed: int, shape: tuple[int, ...], scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * scale


shapes = st.lists(st.integers(1, 6), min_size=1, max_size=4).map(tuple)


# --- straight-through helpers ---------------------------------------------------------


def test_round_ste_forward_exact_backward_identity():
    x = torch.tensor([-1.5, -0.49, 0.2, 0.5, 2.7, 3.49], requires_grad=True)
    y = Fq.round_ste(x)
    assert torch.equal(y, x.detach().round())
    y.backward(torch.arange(6.0))
    assert torch.equal(x.grad, torch.arange(6.0))


def test_grad_scale_forward_identity_backward_scaled():
    x = torch.tensor([0.3, -1.7], requires_grad=True)
    y = Fq.grad_scale(x, 0.25)
    assert torch.equal(y, x.detach())
    y.sum().backward()
    assert torch.allclose(x.grad, torch.full((2,), 0.25))


def test_forward_value_is_exact():
    # x + (v - x) is not always v in floating point; the audit needs v exactly
    x = _tensor(0, (10000,), 3.0).requires_grad_()
    v = (x.detach() * 7.3).round() / 7.3
    y = Fq.forward_value(x, v)
    assert torch.equal(y, v)
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_int_range():
    assert Fq.int_range(2, True) == (2, 1)
    assert Fq.int_range(4, True) == (8, 7)
    assert Fq.int_range(2, False) == (0, 3)
    assert Fq.int_range(8, False) == (0, 255)
    with pytest.raises(ValueError):
        Fq.int_range(0, True)


# --- LSQ -------------------------------------------------------------------------------


def test_lsq_forward_and_step_gradient_match_eq_3():
    """Esser et al. eq. 1-3: v_hat = round(clip(v/s)) s; dv_hat/ds = -v/s + round(v/s)
    inside, -Q_N / Q_P outside; times the gradient scale g."""
    s = torch.tensor(0.5, requires_grad=True)
    v = torch.tensor([-3.0, -0.6, 0.1, 0.74, 1.3, 5.0], requires_grad=True)
    qn, qp, g = 2, 1, 0.1  # signed 2-bit grid {-2, -1, 0, 1}
    y = Fq.lsq_quantize(v, s, qn, qp, g)
    assert torch.allclose(y, torch.tensor([-1.0, -0.5, 0.0, 0.5, 0.5, 0.5]))
    y.sum().backward()
    r = v.detach() / 0.5
    inside = (r > -qn) & (r < qp)
    expected = torch.where(inside, -r + r.round(), torch.where(r <= -qn, -float(qn), float(qp)))
    assert torch.allclose(s.grad, g * expected.sum())
    assert torch.equal(v.grad, inside.float())


@SETTINGS
@given(shape=shapes, bits=st.integers(2, 8), signed=st.booleans(), seed=st.integers(0, 10**6))
def test_lsq_levels_range_idempotence(shape, bits, signed, seed):
    v = _tensor(seed, shape, 2.0)
    s = torch.tensor(0.3)
    qn, qp = Fq.int_range(bits, signed)
    y = Fq.lsq_quantize(v, s, qn, qp, 1.0)
    codes = y / s
    assert torch.allclose(codes, codes.round(), atol=1e-4)
    assert codes.min() >= -qn - 1e-4 and codes.max() <= qp + 1e-4
    assert torch.unique(y).numel() <= 2**bits
    assert torch.equal(Fq.lsq_quantize(y, s, qn, qp, 1.0), y)


# --- DoReFa -----------------------------------------------------------------------------


def test_quantize_k_values_and_ste():
    r = torch.tensor([0.0, 0.1, 0.2, 0.5, 0.84, 1.0], requires_grad=True)
    y = Fq.quantize_k(r, 2)  # levels {0, 1/3, 2/3, 1}
    assert torch.allclose(y, torch.tensor([0.0, 0.0, 1 / 3, 2 / 3, 1.0, 1.0]))
    y.sum().backward()
    assert torch.equal(r.grad, torch.ones(6))


def test_dorefa_weight_transform_eq_9():
    w = torch.tensor([[-1.2, -0.3, 0.0], [0.05, 0.4, 2.0]], requires_grad=True)
    k = 2
    y = Fq.dorefa_weight(w, k)
    t = torch.tanh(w.detach())
    r = t / (2 * t.abs().max()) + 0.5
    expected = 2 * torch.round(r * 3) / 3 - 1
    assert torch.allclose(y, expected)
    # STE: the gradient is that of the un-rounded transform tanh(w)/max|tanh(w)|,
    # including the max's dependence on w (official code)
    y.sum().backward()
    w2 = w.detach().clone().requires_grad_()
    t2 = torch.tanh(w2)
    (2 * (t2 / (2 * t2.abs().amax()) + 0.5) - 1).sum().backward()
    assert torch.allclose(w.grad, w2.grad)


@SETTINGS
@given(shape=shapes, k=st.integers(2, 8), seed=st.integers(0, 10**6))
def test_dorefa_weight_levels_and_range(shape, k, seed):
    w = _tensor(seed, shape, 0.5)
    y = Fq.dorefa_weight(w, k)
    n = 2**k - 1
    i = (y + 1) / 2 * n  # y = 2 i / n - 1 with integer i in [0, n]
    assert torch.allclose(i, i.round(), atol=1e-4)
    assert y.min() >= -1 - 1e-6 and y.max() <= 1 + 1e-6
    assert torch.unique(y).numel() <= 2**k
    # the element of largest |tanh(w)| sits at an end of the range
    j = w.abs().flatten().argmax()
    assert abs(abs(float(y.flatten()[j])) - 1.0) < 1e-6 or float(w.flatten()[j]) == 0.0


def test_dorefa_binary_weight_eq_8():
    w = torch.tensor([-0.5, 0.0, 0.25, 1.25], requires_grad=True)
    y = Fq.dorefa_weight(w, 1)
    e = 0.5  # mean |w|
    assert torch.equal(y, torch.tensor([-e, e, e, e]))
    y.sum().backward()
    assert torch.equal(w.grad, torch.ones(4))


def test_dorefa_activation_clip_and_gradient():
    x = torch.tensor([-0.5, 0.01, 0.3, 0.6, 0.99, 1.7], requires_grad=True)
    y = Fq.dorefa_activation(x, 2)
    assert torch.allclose(y, torch.tensor([0.0, 0.0, 1 / 3, 2 / 3, 1.0, 1.0]))
    y.sum().backward()
    assert torch.equal(x.grad, torch.tensor([0.0, 1.0, 1.0, 1.0, 1.0, 0.0]))


@SETTINGS
@given(shape=shapes, k=st.integers(1, 8), seed=st.integers(0, 10**6))
def test_dorefa_activation_levels_idempotent(shape, k, seed):
    x = _tensor(seed, shape, 1.0)
    y = Fq.dorefa_activation(x, k)
    assert y.min() >= 0 and y.max() <= 1
    assert torch.unique(y).numel() <= 2**k
    assert torch.equal(Fq.dorefa_activation(y, k), y)


# --- PACT -------------------------------------------------------------------------------


def test_pact_forward_eq_1_2():
    alpha = torch.tensor(2.0)
    x = torch.tensor([-1.0, 0.0, 0.4, 0.9, 1.99, 2.0, 7.0])
    y = Fq.pact_quantize(x, alpha, 2)  # step alpha/3
    s = 2.0 / 3
    expected = torch.tensor([0.0, 0.0, s, s, 2.0, 2.0, 2.0])
    assert torch.allclose(y, expected)
    # eq. 1 as written in the paper, before quantization
    clip = 0.5 * (x.abs() - (x - alpha).abs() + alpha)
    assert torch.allclose(Fq.pact_clip(x, alpha), clip)


def test_pact_alpha_gradient_eq_3():
    """dL/dalpha = sum of dL/dy_q over the elements with x >= alpha, nothing else (the
    quantization scale's dependence on alpha is not differentiated)."""
    alpha = torch.tensor(1.5, requires_grad=True)
    x = torch.tensor([-2.0, 0.2, 0.7, 1.49, 1.5, 3.0], requires_grad=True)
    upstream = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    Fq.pact_quantize(x, alpha, 3).backward(upstream)
    assert torch.isclose(alpha.grad, torch.tensor(5.0 + 6.0))
    assert torch.equal(x.grad, torch.tensor([0.0, 2.0, 3.0, 4.0, 0.0, 0.0]))


@SETTINGS
@given(shape=shapes, k=st.integers(1, 8), seed=st.integers(0, 10**6), a=st.floats(0.1, 8.0))
def test_pact_levels_range_idempotent(shape, k, seed, a):
    alpha = torch.tensor(a)
    x = _tensor(seed, shape, 3.0)
    y = Fq.pact_quantize(x, alpha, k)
    assert y.min() >= 0 and y.max() <= a * (1 + 1e-6)
    assert torch.unique(y).numel() <= 2**k
    assert torch.allclose(Fq.pact_quantize(y, alpha, k), y)


# --- LQ-Net -----------------------------------------------------------------------------


def test_binary_and_ternary_codes():
    assert Fq.binary_codes(2, signed=True).tolist() == [[-1, -1], [1, -1], [-1, 1], [1, 1]]
    assert Fq.binary_codes(2, signed=False).tolist() == [[0, 0], [1, 0], [0, 1], [1, 1]]
    assert Fq.ternary_codes(True).flatten().tolist() == [-1, 0, 1]
    assert Fq.ternary_codes(False).flatten().tolist() == [0, 1, 2]


def test_lq_levels_sorted_with_their_codes():
    basis = torch.tensor([[0.3, 1.0], [0.1, -0.5]])  # K=2, G=2
    codes = Fq.binary_codes(2, signed=True)
    levels, sorted_codes = Fq.lq_levels(basis, codes)
    assert torch.all(levels[:, 1:] >= levels[:, :-1])
    for g in range(2):
        assert torch.allclose((sorted_codes[g] * basis[:, g]).sum(1), levels[g])
    assert torch.allclose(levels[0], torch.tensor([-0.4, -0.2, 0.2, 0.4]))


@SETTINGS
@given(
    groups=st.integers(1, 4),
    m=st.integers(1, 50),
    k=st.integers(1, 4),
    signed=st.booleans(),
    seed=st.integers(0, 10**6),
)
def test_lq_quantize_is_nearest_level_and_idempotent(groups, m, k, signed, seed):
    g = torch.Generator().manual_seed(seed)
    basis = torch.rand(k, groups, generator=g) + 0.05
    levels, _ = Fq.lq_levels(basis, Fq.binary_codes(k, signed))
    x = torch.randn(groups, m, generator=g)
    q, idx = Fq.lq_quantize(x, levels)
    brute = (x.unsqueeze(2) - levels.unsqueeze(1)).abs()
    assert torch.allclose((q - x).abs(), brute.min(2).values, atol=1e-6)
    assert torch.equal(torch.gather(levels, 1, idx), q)
    for row in q:
        assert torch.unique(row).numel() <= 2**k
    assert torch.equal(Fq.lq_quantize(q, levels)[0], q)


def test_qem_basis_is_least_squares_on_fixed_codes():
    """Algorithm 1, step 2: v* = (B^T B)^-1 B^T x for the codes B of the current levels,
    checked against an explicit least-squares solve on the (M x K) code matrix."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 200, generator=g) * torch.tensor([[0.5], [1.0], [2.0]])
    basis = torch.tensor([[0.2, 0.4, 0.8], [0.6, 1.2, 2.4]])
    codes = Fq.binary_codes(2, signed=True)
    levels, sorted_codes = Fq.lq_levels(basis, codes)
    _, idx = Fq.lq_quantize(x, levels)
    new = Fq.qem_basis(x, idx, sorted_codes, basis, delta=0.0)
    for c in range(3):
        b = sorted_codes[c][idx[c]]  # [M, K], each element's code
        ls = torch.linalg.lstsq(b, x[c].unsqueeze(1)).solution.squeeze(1)
        assert torch.allclose(new[:, c], ls, atol=1e-4)
    # the ridge (official delta) keeps an unused bit at its old value
    only_low = torch.zeros(1, 10, dtype=torch.long)  # every element at the lowest level
    ridge = Fq.qem_basis(
        torch.zeros(1, 10),
        only_low,
        Fq.lq_levels(basis[:, :1], Fq.binary_codes(2, False))[1],
        basis[:, :1],
        delta=1e-4,
    )
    assert torch.allclose(ridge, basis[:, :1], atol=1e-6)


def test_qem_recovers_the_basis_of_data_on_its_levels():
    true = torch.tensor([[0.25], [0.5]])
    levels, _ = Fq.lq_levels(true, Fq.binary_codes(2, signed=False))
    g = torch.Generator().manual_seed(1)
    x = levels[0][torch.randint(0, 4, (1, 500), generator=g)]
    start = torch.tensor([[0.3], [0.45]])
    basis = start
    for _ in range(5):  # alternate codes and basis
        lv, sc = Fq.lq_levels(basis, Fq.binary_codes(2, signed=False))
        _, idx = Fq.lq_quantize(x, lv)
        basis = Fq.qem_basis(x, idx, sc, basis, delta=0.0)
    assert torch.allclose(basis, true, atol=1e-5)
    assert not math.isclose(float(start[0]), 0.25)


@pytest.mark.parametrize("groups,m", [(1, 10_000), (3, 200), (5000, 7)])
def test_level_counts_and_sums_match_a_one_hot_reduction(groups, m):
    """The per-level counts and sums that QEM solves from, spread over partial sums (one
    group of 10,000 elements: 4,096 of them; 5,000 groups: one each), equal the plain
    one-hot reduction: counts exactly, sums to float32 rounding."""
    g = torch.Generator().manual_seed(3)
    levels = 8
    x = torch.randn(groups, m, generator=g)
    idx = torch.randint(0, levels, (groups, m), generator=g)
    idx[:, : m // 2] = 0  # most elements at one level, as after a ReLU
    counts, sums = Fq.level_counts_and_sums(x, idx, levels)
    onehot = torch.nn.functional.one_hot(idx, levels).double()  # [G, M, L]
    assert torch.equal(counts.double(), onehot.sum(1))
    assert torch.allclose(sums.double(), (onehot * x.double().unsqueeze(-1)).sum(1), atol=1e-4)
