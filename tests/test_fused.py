"""The fused fake-quantizers (methods/fused.py) against the reference functions.

Every case runs one quantizer module twice on the same inputs: once on the reference path
(``set_fused(q, False)``), once on the fused ops. Forward values must be equal bit for bit
(compared as integers, so -0 and +0 differ), input gradients too; the step / clipping-level
gradients, the only reductions, may differ by summation order: within ``ULPS`` units in
the last place of the input's dtype (the precision the terms were summed and rounded in)
at the reference's magnitude, or, where the two sums differ by more, within the error
bound of a float32 tree sum, ``ceil(log2 n) * 2^-24 * sum |t_i|`` for each side, with the
reference path's own per-element terms ``t_i`` (one backward per input element).

* On the CPU the fused ops run their torch implementations (the quantizers only take them
  on CUDA, so ``fused.supported`` is patched to say yes).
* Through Triton's interpreter (a child process with ``TRITON_INTERPRET=1``, set before
  the kernels are defined) the Triton kernels run on the CPU.
* On a GPU (skipped without one): the default path is the fused one; also compiled with
  ``fullgraph=True``.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
from qbench.methods import fused
from qbench.methods.apot import APoTQuantizer
from qbench.methods.dorefa import DoReFaAct, DoReFaWeight
from qbench.methods.lqnet import LQQuantizer
from qbench.methods.lsq import LSQQuantizer
from qbench.methods.modules import set_fused
from qbench.methods.pact import PACTAct
from qbench.methods.uniform import MinMaxAct, MinMaxWeight
from torch import nn

#: allowed difference of a reduced gradient (step, alpha): ``ULPS`` units in the last place
#: of the input's dtype, else the summation bound (module docstring)
ULPS = 2
CHILD = os.environ.get("QBENCH_FUSED_INTERPRETER") == "1"
CUDA = torch.cuda.is_available()
DTYPES = (torch.float32, torch.bfloat16)


def _values(n: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g) * scale


def _special(step: float, lo: float, hi: float) -> torch.Tensor:
    """Values on rounding ties (half-integer multiples of the step), on the clipping bounds
    and just around them, zeros of both signs, and far outside."""
    k = torch.arange(int(lo * 2) - 3, int(hi * 2) + 4, dtype=torch.float32)
    ties = k * (step / 2)
    ends = torch.tensor([lo, hi, lo - 0.5, hi + 0.5, 0.0, -0.0, lo * 5 - 1, hi * 5 + 1]) * step
    return torch.cat([ties, ends, ends.nextafter(torch.tensor(float("inf")))])


def _act_input(step: float, lo: float, hi: float, dtype: torch.dtype, n: int = 700, seed: int = 0) -> torch.Tensor:
    x = torch.cat([_special(step, lo, hi), _values(n, seed, scale=step * (hi - lo) / 3)])
    return x[: len(x) // 2 * 2].reshape(2, -1).to(dtype)


def _weight_input(dtype: torch.dtype, seed: int = 1) -> torch.Tensor:
    w = _values(6 * 4 * 3 * 3, seed, scale=0.2).reshape(6, 4, 3, 3)
    w[0, 0, 0, :2] = torch.tensor([0.5, -0.5])  # the channel's extremes, then ties below
    w[1, 0, 0, :3] = torch.tensor([0.3, 0.1, -0.1])
    return w.to(dtype)


# --- the cases: (name, quantizer factory, input factory, per dtype) -----------------------


def _lsq(signed):
    def make():
        q = LSQQuantizer(4, signed=signed, weight=signed)
        q.step.data.fill_(0.25)
        q.is_signed.fill_(signed)
        q.mark_initialized()
        return q

    return make


def _minmax_act():
    q = MinMaxAct(4)
    q.lo.fill_(-0.75)
    q.hi.fill_(3.0)
    q.mark_initialized()
    return q.eval()  # fixed range: the EMA would move it between the two runs


def _lq(signed, bits=2, ternary=False):
    def make():
        q = LQQuantizer(bits, signed=signed, groups=6 if signed else 1, fan=54, ternary=ternary)
        return q.eval()  # eval: no QEM step, so both runs see the same basis

    return make


def _apot(role, bits, kind="apot", variant="cifar", grad_scale=None):
    def make():
        q = APoTQuantizer(bits, role, kind, variant, grad_scale=grad_scale)
        q.alpha.data.fill_(1.5 if role == "act" else 2.0)
        return q

    return make


ACT = "act"
WEIGHT = "weight"
CASES = {
    "lsq_unsigned": (_lsq(False), ACT, (0.25, 0, 15)),
    "lsq_signed": (_lsq(True), ACT, (0.25, -8, 7)),
    "uniform_act": (_minmax_act, ACT, (0.25, -3, 12)),
    "uniform_weight": (lambda: MinMaxWeight(4, 6), WEIGHT, None),
    "pact": (lambda: PACTAct(3, alpha_init=1.75), ACT, (0.25, 0, 7)),
    "dorefa_act": (lambda: DoReFaAct(3), ACT, (1 / 7, 0, 7)),
    "dorefa_weight": (lambda: DoReFaWeight(3), WEIGHT, None),
    "apot_act_cifar": (_apot("act", 4), ACT, (0.1, -1, 15)),
    "apot_act_imagenet": (_apot("act", 4, variant="imagenet", grad_scale=0.5), ACT, (0.1, -1, 15)),
    "apot_uniform_act_cifar": (_apot("act", 3, kind="uniform"), ACT, (1.5 / 7, -2, 7)),
    "apot_weight_cifar": (_apot("weight", 4), WEIGHT, None),
    "apot_weight_imagenet": (_apot("weight", 3, kind="pot", variant="imagenet"), WEIGHT, None),
    "apot_weight_2bit": (_apot("weight", 2, variant="imagenet"), WEIGHT, None),
    "lq_act": (_lq(False), ACT, (0.3, 0, 6)),
    "lq_act_ternary": (_lq(False, ternary=True), ACT, (0.3, 0, 6)),
    "lq_weight": (_lq(True, bits=3), WEIGHT, None),
}


def _input(case: str, dtype: torch.dtype, device: str) -> torch.Tensor:
    _, kind, grid = CASES[case]
    x = _weight_input(dtype) if kind == WEIGHT else _act_input(*grid, dtype)
    if case == "lq_act":  # also exactly on the top level (torch.minimum's tie)
        q = CASES[case][0]()
        top = q.basis.sum().to(dtype)
        x.view(-1)[:3] = top
    return x.to(device).requires_grad_()


def _strided(g: torch.Tensor) -> torch.Tensor:
    """The same values in another memory layout (what a transpose or channels_last conv
    hands back), so the kernels must re-lay the gradient out as their saved tensors."""
    if g.dim() == 4:
        return g.contiguous(memory_format=torch.channels_last)
    return g.t().contiguous().t()


def _run(
    q: nn.Module, x: torch.Tensor, enabled: bool, strided: bool = False
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    set_fused(q, enabled)
    x = x.detach().clone().requires_grad_()
    out = q(x)
    g = _values(out.numel(), 7).reshape(out.shape).to(out.dtype).to(out.device)
    out.backward(_strided(g) if strided else g)
    grads = {n: p.grad.clone() for n, p in q.named_parameters() if p.grad is not None}
    return out.detach(), x.grad, grads


def _bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().cpu()
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


def _assert_bitwise(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape, f"{what}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
    same = _bits(a) == _bits(b)
    if not bool(same.all()):
        i = (~same).nonzero()[0].tolist()
        raise AssertionError(
            f"{what}: {int((~same).sum())} elements differ, first at {i}: {a[tuple(i)]} vs {b[tuple(i)]}"
        )


def _assert_standardised_grad(a: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    """APoT standardises the weight, ``(W - mean) / std`` in torch: the input gradient
    passes through that backward's two means, reductions whose order follows the memory
    layout and the compiler, so two runs may differ within a float32 tree sum's bound."""
    bound = 4 * math.ceil(math.log2(ref.numel())) * 2.0**-24 * ref.abs().max()
    diff = (a - ref).abs().max()
    assert diff <= bound, f"{what}: max |diff| {diff} > {bound}"


def _ulp(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One unit in the last place of ``dtype`` at ``|t|``, in float32."""
    a = t.detach().abs().to(dtype)
    return (a.nextafter(torch.tensor(float("inf"), dtype=dtype, device=a.device)).float() - a.float()).clamp_min(1e-30)


def _abs_terms(q: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """``sum_i |t_i|`` of each reduced parameter gradient on the reference path, ``t_i`` the
    term input element i adds (its backward alone, with the same output gradient)."""
    set_fused(q, False)
    x = x.detach().clone().requires_grad_()
    out = q(x)
    g = _values(out.numel(), 7).reshape(out.shape).to(out.dtype).to(out.device)
    params = dict(q.named_parameters())
    total = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    for i in range(out.numel()):
        one = torch.zeros_like(g).view(-1)
        one[i] = g.view(-1)[i]
        grads = torch.autograd.grad(out, list(params.values()), one.view(g.shape), retain_graph=True, allow_unused=True)
        for n, t in zip(params, grads, strict=True):
            if t is not None:
                total[n] += t.float().abs()
    return total


def compare(case: str, dtype: torch.dtype, device: str, strided: bool = False) -> None:
    make = CASES[case][0]
    q = make().to(device)
    x = _input(case, dtype, device)
    ref_out, ref_gx, ref_gp = _run(q, x, False, strided)
    q2 = make().to(device)
    out, gx, gp = _run(q2, x, True, strided)
    _assert_bitwise(out, ref_out, f"{case} {dtype} forward")
    if strided and case.startswith("apot_weight"):  # the means summed in another layout
        _assert_standardised_grad(gx, ref_gx, f"{case} {dtype} input gradient")
    else:
        _assert_bitwise(gx, ref_gx, f"{case} {dtype} input gradient")
    assert gp.keys() == ref_gp.keys()
    terms = None
    for name, ref in ref_gp.items():
        diff = (gp[name].float() - ref.float()).abs()
        if bool((diff <= ULPS * _ulp(ref, dtype)).all()):
            continue
        terms = terms if terms is not None else _abs_terms(make().to(device), x)
        n = max(x.numel() // max(ref.numel(), 1), 2)
        bound = 2 * math.ceil(math.log2(n)) * 2.0**-24 * terms[name] + ULPS * _ulp(ref, dtype)
        assert bool((diff <= bound).all()), (
            f"{case} {dtype} d{name}: {gp[name]} vs {ref} (reference), |diff| {diff} > bound {bound}"
        )


@pytest.fixture
def fused_on_cpu(monkeypatch):
    """Let the quantizers take the fused ops on CPU tensors (their default, torch, kernels)."""
    monkeypatch.setattr(fused, "supported", lambda t: t.dtype in fused._DTYPES and t.numel() > 0)


# --- (a) the ops' torch implementations vs the reference, on the CPU ----------------------


@pytest.mark.skipif(CHILD, reason="the interpreter child runs the Triton cases only")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", sorted(CASES))
def test_cpu_ops_match_the_reference(fused_on_cpu, case, dtype):
    compare(case, dtype, "cpu")


@pytest.mark.skipif(CHILD, reason="the interpreter child runs the Triton cases only")
def test_special_values_hit_ties_and_bounds():
    """The inputs do exercise the edge cases the comparisons are about."""
    q = CASES["lsq_unsigned"][0]()
    u = _input("lsq_unsigned", torch.float32, "cpu").detach() / q.step.detach()
    assert bool(((u - u.floor()) == 0.5).any())  # rounding ties
    assert bool((u == 0).any()) and bool((u == 15).any())  # both clipping bounds
    assert bool((torch.signbit(u) & (u == 0)).any())  # -0


@pytest.mark.skipif(CHILD, reason="the interpreter child runs the Triton cases only")
def test_set_fused_false_takes_the_reference_path(fused_on_cpu, monkeypatch):
    calls = []
    real = fused.fused_lsq
    monkeypatch.setattr(fused, "fused_lsq", lambda *a: calls.append(1) or real(*a))
    model = nn.Sequential(CASES["lsq_unsigned"][0]())
    x = _input("lsq_unsigned", torch.float32, "cpu")
    model(x)
    assert len(calls) == 1
    set_fused(model, False)
    model(x)
    assert len(calls) == 1


# --- (b) the Triton kernels through Triton's interpreter, on the CPU ----------------------


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


@pytest.mark.skipif(CHILD, reason="this is the parent")
@pytest.mark.skipif(not _triton_importable(), reason="triton is not installed: no kernels to interpret")
def test_triton_kernels_in_the_interpreter():
    """Runs this file's ``test_interpreted_*`` in a fresh interpreter with
    ``TRITON_INTERPRET=1`` (it must be set before the kernels are defined)."""
    env = dict(os.environ, TRITON_INTERPRET="1", QBENCH_FUSED_INTERPRETER="1")
    res = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__, "-k", "interpreted"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-3000:]


@pytest.fixture
def triton_on_cpu(monkeypatch):
    """The Triton implementations registered as the ops' CPU kernels, for this test only."""
    monkeypatch.setattr(fused, "supported", lambda t: t.dtype in fused._DTYPES and t.numel() > 0)
    lib = torch.library.Library("qbench", "IMPL")
    for name, impl in fused.TRITON_IMPLS.items():
        lib.impl(name, impl, "CPU")
    yield
    lib._destroy()


@pytest.mark.skipif(not CHILD, reason="runs in the interpreter child (test_triton_kernels_in_the_interpreter)")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", sorted(CASES))
def test_interpreted_kernels_match_the_reference(triton_on_cpu, case, dtype):
    compare(case, dtype, "cpu")


@pytest.mark.skipif(not CHILD, reason="runs in the interpreter child (test_triton_kernels_in_the_interpreter)")
@pytest.mark.parametrize("case", sorted(CASES))
def test_interpreted_kernels_take_a_strided_gradient(triton_on_cpu, case):
    """A gradient laid out otherwise than the output (uniform's backward once failed on it:
    the re-laid copy took its uint8 mask's dtype)."""
    compare(case, torch.float32, "cpu", strided=True)


# --- (c) on a GPU ---------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not CUDA or CHILD, reason="no CUDA device")


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", sorted(CASES))
def test_cuda_fused_matches_the_reference(case, dtype, monkeypatch):
    monkeypatch.setattr(fused, "CUDA_ENABLED", True)
    assert fused.supported(torch.zeros(1, device="cuda")), "triton missing on the GPU machine"
    compare(case, dtype, "cuda")
    if dtype == torch.float32:
        compare(case, dtype, "cuda", strided=True)


@needs_cuda
@pytest.mark.parametrize("case", ["lsq_signed", "uniform_weight", "pact", "dorefa_act", "apot_weight_cifar", "lq_act"])
def test_cuda_compiled_without_graph_break(case, monkeypatch):
    """With ``QBENCH_FUSED_COMPILED=1`` the custom ops stay in the compiled graph."""
    monkeypatch.setattr(fused, "CUDA_ENABLED", True)
    monkeypatch.setattr(fused, "COMPILED_KERNELS", True)
    torch._dynamo.reset()
    make = CASES[case][0]
    q = make().cuda()
    x = _input(case, torch.float32, "cuda")
    ref_out, ref_gx, _ = _run(q, x, True)
    compiled = torch.compile(q, fullgraph=True)
    x2 = x.detach().clone().requires_grad_()
    out = compiled(x2)
    out.backward(_values(out.numel(), 7).reshape(out.shape).cuda())
    _assert_bitwise(out.detach(), ref_out, f"{case} compiled forward")
    if case.startswith("apot_weight"):  # inductor orders the standardisation's means otherwise
        _assert_standardised_grad(x2.grad, ref_gx, f"{case} compiled input gradient")
    else:
        _assert_bitwise(x2.grad, ref_gx, f"{case} compiled input gradient")


@needs_cuda
def test_cuda_set_fused_false_takes_the_reference_path(monkeypatch):
    monkeypatch.setattr(fused, "CUDA_ENABLED", True)
    calls = []
    real = fused.fused_pact
    monkeypatch.setattr(fused, "fused_pact", lambda *a: calls.append(1) or real(*a))
    model = nn.Sequential(PACTAct(3)).cuda()
    x = _input("pact", torch.float32, "cuda")
    model(x)
    assert len(calls) == 1
    set_fused(model, False)
    model(x)
    assert len(calls) == 1


@pytest.mark.skipif(CHILD, reason="the interpreter child runs the Triton cases only")
@pytest.mark.parametrize("keep", [False, True])
def test_compiled_graphs_take_the_reference_unless_told(keep, monkeypatch):
    """Eager takes the fused ops where the kernels handle the tensor; a graph torch.compile
    traces takes the reference functions (inductor fuses them), unless COMPILED_KERNELS."""
    monkeypatch.setattr(fused, "handles", lambda t: True)
    monkeypatch.setattr(fused, "COMPILED_KERNELS", keep)
    torch._dynamo.reset()
    q = LSQQuantizer(4, signed=True)
    calls = []
    real = fused.fused_lsq
    monkeypatch.setattr(fused, "fused_lsq", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(64)
    q(x)
    assert len(calls) == 1, "eager: the fused op"
    torch.compile(q, backend="eager", fullgraph=True)(x)
    assert len(calls) == (2 if keep else 1), "compiled: the custom op only when kept"
