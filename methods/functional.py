"""Differentiable quantization primitives: plain functions, testable and compilable.

Notation follows the papers: ``v`` is the real value, ``s`` a step size (scale),
``Q_N``/``Q_P`` the number of negative/positive levels, so the integer code is
``clip(round(v / s), -Q_N, Q_P)`` and the fake-quantized value ``v_hat = code * s``.

Straight-through estimator (STE, Bengio et al. 2013): ``round`` passes the gradient
through unchanged; ``clamp`` passes it inside the range and blocks it outside.
"""

from __future__ import annotations

import torch


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) in the forward pass, identity in the backward pass."""
    return (x.round() - x).detach() + x


def grad_scale(x: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """x in the forward pass; the gradient reaching x is multiplied by ``scale``."""
    y = x * scale
    return (x - y).detach() + y


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
    (per tensor: a scalar; per channel: shape [C, 1, 1, 1])."""
    code = torch.clamp(round_ste(v / scale) + zero_point, -qn, qp)
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
