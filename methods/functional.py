"""Differentiable quantization primitives: plain functions, testable and compilable.

Notation follows the papers: ``v`` is the real value, ``s`` a step size (scale),
``Q_N``/``Q_P`` the number of negative/positive levels, so the integer code is
``clip(round(v / s), -Q_N, Q_P)`` and the fake-quantized value ``v_hat = code * s``.

Straight-through estimator (STE, Bengio et al. 2013): ``round`` passes the gradient
through unchanged; clipping passes it inside the range, bounds included, and blocks it
outside (:func:`fake_quant` builds that mask itself rather than relying on
``torch.clamp``'s gradient at a bound).

Every function here is shape- and memory-format-agnostic (elementwise or reducing over
explicit dimensions), takes bit-widths and level counts as Python numbers and tables
as tensors already on the input's device, and never reads a tensor back to the host,
so it traces into one graph under ``torch.compile``.
"""

from __future__ import annotations

import torch


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) in the forward pass, identity in the backward pass."""
    return forward_value(x, x.detach().round())


def grad_scale(x: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """x in the forward pass; the gradient reaching x is multiplied by ``scale``."""
    y = x * scale
    return x.detach() + (y - y.detach())


def forward_value(x: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``value`` in the forward pass, the gradient of ``x`` in the backward pass
    (the general straight-through estimator). Written as ``value + (x - x)`` with the
    second x detached, so the forward value is exactly ``value`` (``x + (value - x)``
    can be an ulp off, and the bit audit counts distinct values)."""
    return value.detach() + (x - x.detach())


def int_range(bits: int, signed: bool) -> tuple[int, int]:
    """(Q_N, Q_P) for a ``bits``-bit integer grid: signed ``[-2^(b-1), 2^(b-1)-1]``,
    unsigned ``[0, 2^b - 1]``. Q_N is returned as a non-negative count."""
    if not 1 <= bits <= 32:
        raise ValueError(f"bits must be in 1..32, got {bits}")
    if signed:
        if bits == 1:
            return 1, 0  # sign-magnitude binaries are handled by their own methods
        return 2 ** (bits - 1), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def fake_quant(
    v: torch.Tensor,
    scale: torch.Tensor,
    qn: int,
    qp: int,
    zero_point: torch.Tensor | float = 0.0,
) -> torch.Tensor:
    """Uniform affine fake-quantization with STE rounding:
    ``(clip(round(v/s) + z, -Q_N, Q_P) - z) * s``. ``scale`` broadcasts against ``v``
    (per tensor: a scalar; per channel: shape [C, 1, 1, 1]).

    Gradients (the straight-through rule of torch's own fake-quantize ops,
    ``torch.fake_quantize_per_tensor_affine``: mask ``Q_min <= round(v/s) + z <= Q_max``):

    * w.r.t. ``v``: 1 where the code ``round(v/s) + z`` lies in ``[-Q_N, Q_P]``, bounds
      included, 0 where it was clipped. The mask is built explicitly from the rounded code,
      not left to ``torch.clamp``'s gradient, whose value at exactly a bound has differed
      across torch versions (0, 1/2 or 1 depending on the version and on whether the bounds
      are numbers or tensors).
    * w.r.t. ``scale`` (when it requires grad; qbench's min-max quantizers detach it):
      ``round(v/s) - v/s`` inside (the code minus the scaled input, LSQ's eq. 3) and the
      clipped code ``-Q_N - z`` / ``Q_P - z`` outside; w.r.t. ``zero_point``: 0 inside and
      ``-s`` outside. These are the gradients of torch's learnable fake-quantize
      (``torch._fake_quantize_learnable_per_tensor_affine``) for an integer zero point.
    """
    code = round_ste(v / scale) + zero_point  # gradient 1/s w.r.t. v, as if not rounded
    c = code.detach()
    inside = (c >= -qn) & (c <= qp)
    # inside: the straight-through code; outside: the bound, a constant for v and s
    code = torch.where(inside, code, c.clamp(-qn, qp))
    return (code - zero_point) * scale


def lsq_quantize(v: torch.Tensor, s: torch.Tensor, qn: int, qp: int, g: float) -> torch.Tensor:
    """LSQ (Esser et al., ICLR 2020, eq. 1-3): ``v_hat = round(clip(v/s, -Q_N, Q_P)) * s`` with
    the step size's gradient scaled by ``g = 1/sqrt(N * Q_P)``.

    The gradient of v_hat w.r.t. s is (eq. 3) ``-v/s + round(v/s)`` inside the range and
    ``-Q_N`` / ``Q_P`` outside; w.r.t. v it is 1 inside and 0 outside (STE). Both follow
    from autograd through ``round_ste`` and ``clamp``.
    """
    s = grad_scale(s, g)
    return round_ste(torch.clamp(v / s, -qn, qp)) * s


# --- DoReFa-Net (Zhou et al., arXiv:1606.06160, 2016) and PACT (Choi et al., 2018) ------


def quantize_k(r: torch.Tensor, k: int) -> torch.Tensor:
    """DoReFa's ``quantize_k`` (eq. 5): ``round((2^k - 1) r) / (2^k - 1)`` for r in [0, 1],
    with the straight-through estimator ``dr_o/dr_i = 1``."""
    n = float(2**k - 1)
    return round_ste(r * n) / n


def dorefa_weight(w: torch.Tensor, k: int) -> torch.Tensor:
    """DoReFa's k-bit weights (eq. 9):
    ``w_q = 2 quantize_k(tanh(w) / (2 max|tanh(w)|) + 1/2) - 1``, ``max`` over the tensor.
    The gradient flows through tanh and the max, as in the official code (tensorpack
    ``dorefa.py``). k = 1 is the binary case (eq. 8, :func:`dorefa_binary_weight`)."""
    if k == 1:
        return dorefa_binary_weight(w)
    t = torch.tanh(w)
    r = t / (2 * t.abs().amax()) + 0.5
    return 2 * quantize_k(r, k) - 1


def dorefa_binary_weight(w: torch.Tensor) -> torch.Tensor:
    """DoReFa's 1-bit weights (eq. 8): ``sign(w) * E(|w|)`` with E the layer's mean absolute
    value (held constant in the backward pass); the gradient of w is passed straight
    through. ``sign(0) = +1`` as in the official code."""
    e = w.detach().abs().mean()
    b = torch.where(w >= 0, e, -e)
    return forward_value(w, b)


def dorefa_activation(x: torch.Tensor, k: int) -> torch.Tensor:
    """DoReFa's k-bit activations (sec. 2.3): clip to [0, 1] (the gradient is blocked
    outside), then ``quantize_k``."""
    return quantize_k(torch.clamp(x, 0.0, 1.0), k)


def pact_clip(x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """PACT's activation (eq. 1): ``y = 0.5 (|x| - |x - alpha| + alpha)``, i.e. x clipped to
    [0, alpha]. Gradients (eq. 3 with the STE): ``dy/dx = 1`` for 0 <= x < alpha,
    ``dy/dalpha = 1`` for x >= alpha, 0 elsewhere (no half-gradient at the kinks)."""
    a = alpha.to(x.dtype)
    return torch.where(x >= a, a, torch.relu(x))


def pact_quantize(x: torch.Tensor, alpha: torch.Tensor, k: int) -> torch.Tensor:
    """PACT (Choi et al., 2018, eq. 1-3): ``y = clip(x, 0, alpha)``,
    ``y_q = round(y (2^k - 1) / alpha) alpha / (2^k - 1)``, and the straight-through
    estimator ``dy_q/dy = 1``, so ``dL/dalpha = dL/dy_q`` where x >= alpha, else 0 (the
    quantization scale's own dependence on alpha is not differentiated, as in the paper)."""
    y = pact_clip(x, alpha)
    n = float(2**k - 1)
    s = (alpha.detach() / n).clamp_min(1e-8).to(x.dtype)
    return forward_value(y, torch.round(y.detach() / s) * s)


# --- LQ-Net (Zhang et al., ECCV 2018) ----------------------------------------------------


def binary_codes(bits: int, signed: bool) -> torch.Tensor:
    """All 2^K code vectors e_l of LQ-Net's quantizer, shape [2^K, K]: entries in {-1, +1}
    (``signed``, weights) or {0, 1} (activations); bit j of level l is ``(l >> j) & 1``."""
    idx = torch.arange(2**bits).unsqueeze(1)
    b = ((idx >> torch.arange(bits)) & 1).float()
    return 2 * b - 1 if signed else b


def ternary_codes(signed: bool) -> torch.Tensor:
    """Three-level code table for the ternary case, shape [3, 1]: {-1, 0, +1} (weights:
    levels {-v, 0, v}) or {0, 1, 2} (activations: levels {0, v, 2v})."""
    return torch.tensor([[-1.0], [0.0], [1.0]]) if signed else torch.tensor([[0.0], [1.0], [2.0]])


def lq_levels(basis: torch.Tensor, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Levels ``v^T e_l`` of every group, sorted ascending, and the codes in that order.

    ``basis`` [K, G] (one basis per group), ``codes`` [L, K]. Returns ``levels`` [G, L]
    and ``sorted_codes`` [G, L, K]. Computed with elementwise products (not matmul) so
    autocast never lowers their precision."""
    levels = (codes.unsqueeze(2) * basis.unsqueeze(0)).sum(1).t()  # [G, L]
    levels, order = torch.sort(levels, dim=1)
    return levels, codes[order]


def lq_assign(x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Index of the nearest level for every element of x (ties to the lower level, as
    the official code's ``x > threshold``). ``x`` [G, M], ``levels`` [G, L] sorted."""
    thresholds = 0.5 * (levels[:, 1:] + levels[:, :-1])  # [G, L-1]
    return torch.searchsorted(thresholds.contiguous(), x.contiguous(), side="left")


def lq_quantize(x: torch.Tensor, levels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """LQ-Net's quantizer ``Q(x) = v^T e_l`` for the nearest level l, per group.
    ``x`` [G, M], ``levels`` [G, L] sorted. Returns (values [G, M], level indices [G, M]);
    no gradient (callers attach their straight-through rule)."""
    idx = lq_assign(x, levels)
    return torch.gather(levels, 1, idx), idx


#: partial sums per group that :func:`level_counts_and_sums` spreads a group's elements over
LEVEL_SLOTS = 4096


def level_counts_and_sums(x: torch.Tensor, idx: torch.Tensor, num_levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """How many elements of each group sit at each level, and their sum: ``counts`` and
    ``sums`` [G, L] (float32) for ``x`` [G, M] and its level indices ``idx`` [G, M].

    Element m of a group adds into partial sum ``m % S`` of its level (S up to
    :data:`LEVEL_SLOTS` per group), and the partial sums are added after. A scatter straight
    into the L bins of a group makes every element of an activation tensor (one group,
    millions of elements, most of them at the zero level after a ReLU) an atomic add to the
    same few addresses on a GPU, which the GPU carries out one after another; spread over S
    partial sums they run side by side. Counts are exact either way (whole numbers below
    2^24); the sums are the same sums, added in another order."""
    g, m = x.shape
    slots = max(1, min(m, LEVEL_SLOTS // g))
    lane = torch.arange(m, device=x.device) % slots  # [M]
    where = idx + (lane * num_levels).unsqueeze(0)  # [G, M] -> one of slots * L partial sums
    counts = torch.zeros(g, slots * num_levels, dtype=torch.float32, device=x.device)
    counts.scatter_add_(1, where, torch.ones_like(x, dtype=torch.float32))
    sums = torch.zeros(g, slots * num_levels, dtype=torch.float32, device=x.device)
    sums.scatter_add_(1, where, x.float())
    return counts.view(g, slots, num_levels).sum(1), sums.view(g, slots, num_levels).sum(1)


def qem_basis(
    x: torch.Tensor,
    idx: torch.Tensor,
    sorted_codes: torch.Tensor,
    basis: torch.Tensor,
    delta: float = 1e-4,
) -> torch.Tensor:
    """LQ-Net's QEM basis step (Algorithm 1, step 2): the least-squares basis for fixed
    codes, ``v* = (B^T B + delta I)^-1 (B^T x + delta v)`` per group, where row i of B is
    the code e of element i's level. The ``delta`` terms are the official code's ridge
    (``BTxB + delta E``, ``BTxX + delta basis``): a bit no element uses keeps its old value.

    ``x`` [G, M] (float32), ``idx`` [G, M] level indices, ``sorted_codes`` [G, L, K],
    ``basis`` [K, G]. B^T B and B^T x only depend on how many elements sit at each level
    and their sum, so they are formed from per-level counts and sums (O(M), not O(M K)).
    Returns the new basis [K, G]."""
    counts, sums = level_counts_and_sums(x, idx, sorted_codes.shape[1])
    e = sorted_codes.float()  # [G, L, K]
    btb = (counts[:, :, None, None] * e[:, :, :, None] * e[:, :, None, :]).sum(1)  # [G, K, K]
    btx = (sums[:, :, None] * e).sum(1)  # [G, K]
    k = e.shape[2]
    eye = torch.eye(k, dtype=torch.float32, device=x.device)
    rhs = btx + delta * basis.t().float()
    # solve_ex: the same LU solve as linalg.solve without its singularity check, which reads
    # a status back from the GPU (a host synchronisation per quantizer per step, and an error
    # inside a CUDA graph); the ridge keeps the systems non-singular
    solution, _ = torch.linalg.solve_ex(btb + delta * eye, rhs.unsqueeze(-1))
    return solution.squeeze(-1).t()
