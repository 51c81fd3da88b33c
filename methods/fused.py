"""Fused fake-quantizers: one Triton kernel per direction, registered as torch custom ops.

Every op here computes exactly what a reference function of :mod:`.functional` (or
:mod:`.apot`, :mod:`.lqnet`) computes together with its autograd graph, but in one pass
over the tensor forward and one backward, saving for the backward only what it needs.
Each op ``qbench::<name>`` is a :func:`torch.library.custom_op` with a fake (meta)
implementation, so ``torch.compile`` keeps it as one node of the graph (no graph break,
no decomposition), and an autograd formula that calls ``qbench::<name>_backward``. The
quantizers take these ops in eager mode; in a graph that ``torch.compile`` traces they take
the reference functions, which inductor fuses with the neighbouring layers, measured faster
than the opaque ops (:data:`COMPILED_KERNELS` keeps the ops in compiled graphs).

Two implementations of every op:

* default (CPU, any device): plain torch math -- the reference function itself for the
  forward, the formulas autograd applies to the reference graph for the backward;
* CUDA (when triton imports): a Triton forward kernel and a Triton backward kernel. The
  backward writes the input's gradient and one partial sum per block for the step /
  clipping-level gradient, finished by a small ``sum`` in torch.

Bit-exactness. The kernels compute in float32 and round to the input's dtype after every
operation the reference performs in that dtype (bf16 and fp16 elementwise ops are float32
ops rounded once, so this is exact), with IEEE division (``div_rn``), round-half-to-even,
no fused multiply-add (``enable_fp_fusion=False``), and the reference's quirks: the
``+ (x - x)`` of the straight-through estimators (it turns a -0 into +0), CUDA's
``a / python_number = a * (1 / number)`` (on the CPU a true division), and
``torch.clamp``'s gradient at exactly a bound, which differs across torch versions (0 on
recent ones, 1 on older ones) and is read from the running torch at import. Reductions
differ from the reference only in summation order (float32 partial sums).

What is fused, what each op saves for the backward, and why:

* ``fake_quant`` (uniform min-max; per-tensor or per-output-channel scale, zero point):
  saves the uint8 inside-the-grid mask (1 byte per element): the gradient is the
  straight-through mask times ``(g s) / s``; the scale and zero point are statistics (no
  gradient; a learnable scale takes the reference path).
* ``lsq`` (LSQ, per-tensor step): saves the input in its own dtype: the step's gradient
  needs ``v / s``, which an integer code cannot give back. The step gradient (the two
  terms autograd sums: from ``v/s`` and from ``code * s``) is a fused partial reduction,
  then scaled by LSQ's ``g``.
* ``pact`` (PACT clip + quantize): saves an int8 code (0 blocked, 1 passes to x, 2 passes
  to alpha); dL/dalpha is a fused partial reduction. The quantization scale
  ``alpha / (2^k - 1)`` is computed in torch as the reference does (a scalar).
* ``quantize_k`` (DoReFa): activations clip to [0, 1] and save an int8 code (inside, at a
  bound, outside); weights save nothing (straight-through). DoReFa's weight transform
  (``tanh``, the whole-tensor ``max|tanh w|`` and their gradients) stays in torch: the max
  couples every element, and weights are small; only ``quantize_k`` is fused.
* ``apot`` (APoT projection onto the level set, or uniform rounding, with the official
  gradients): saves the input in its own dtype (the reference saves ``u`` and ``q`` in
  float32, 8 bytes per element) and recomputes ``u = x / alpha`` and the level; the
  alpha gradient is a fused partial reduction. The weight normalisation
  ``(W - mean) / std`` stays in torch (whole-tensor statistics with gradients through
  them in the ImageNet variant).
* ``lq`` (LQ-Net nearest level, per-group thresholds, ties to the lower level): returns
  the level index for the QEM step when training; activations save a uint8 code (below
  the top level, at it: half gradient as ``torch.minimum``'s, above: blocked); weights
  save nothing. The QEM basis fit (per-level counts and sums, a K x K solve per group,
  TF's moving average) and the levels themselves stay in torch.

Not matched: NaN inputs of APoT (``sign(NaN)`` differs between torch's CPU and CUDA).
"""

import os

import torch

from .functional import dorefa_activation, fake_quant, lsq_quantize, quantize_k

try:
    import triton
    import triton.language as tl
except Exception:  # not installed, or a broken install: the reference path is taken
    triton = None

HAS_TRITON = triton is not None

#: The CUDA kernels are the default on CUDA (with triton installed); ``QBENCH_FUSED=0`` in
#: the environment, this flag, or ``recipe: {fused: false}`` for one cell keeps the reference
#: functions. Their CUDA tests (tests/test_fused.py, every case in float32 and bf16, eager
#: and compiled) passed on an H200 on 2026-11-28 (docs/benchmarks.md).
CUDA_ENABLED = os.environ.get("QBENCH_FUSED", "1") != "0"

#: Inside a graph that ``torch.compile`` traces, the quantizers take the reference functions
#: by default, and inductor fuses them with the layers around them: on an H200 (2026-11-28,
#: docs/benchmarks.md) that compiled step was 1.4-2.3x faster than the same graph holding the
#: custom ops, which inductor cannot fuse into their neighbours (their kernels then run as in
#: eager, one launch each way). ``QBENCH_FUSED_COMPILED=1`` (or this flag) keeps the custom
#: ops in compiled graphs (they trace without a graph break).
COMPILED_KERNELS = os.environ.get("QBENCH_FUSED_COMPILED", "0") == "1"

#: dtypes the kernels handle (others take the reference path)
_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
BLOCK = 1024


def _clamp_grad_at_bounds() -> tuple[bool, bool]:
    """Whether ``torch.clamp(x, lo, hi)`` passes the gradient at ``x == lo`` and ``x == hi``
    in this torch (read once, at import: it has changed across versions)."""
    with torch.inference_mode(False), torch.enable_grad():
        x = torch.tensor([0.0, 0.5, 1.0], requires_grad=True)
        torch.clamp(x, 0, 1).sum().backward()
    lo, hi = x.grad[0].item(), x.grad[2].item()
    if lo not in (0.0, 1.0) or hi not in (0.0, 1.0):
        raise RuntimeError(f"torch.clamp's gradient at its bounds is ({lo}, {hi}); the fused kernels expect 0 or 1")
    return lo == 1.0, hi == 1.0


CLAMP_AT_LO, CLAMP_AT_HI = _clamp_grad_at_bounds()


def supported(t: torch.Tensor) -> bool:
    """Whether a quantizer takes the fused ops for ``t``: the kernels handle it
    (:func:`handles`), and either this is eager mode or compiled graphs keep the custom ops
    (:data:`COMPILED_KERNELS`)."""
    return handles(t) and (COMPILED_KERNELS or not torch.compiler.is_compiling())


def handles(t: torch.Tensor) -> bool:
    """Whether the fused CUDA kernels handle ``t``: a CUDA tensor of a float dtype they know,
    with triton importable and the kernels enabled (:data:`CUDA_ENABLED`)."""
    return CUDA_ENABLED and HAS_TRITON and t.is_cuda and t.dtype in _DTYPES and t.numel() > 0


def _inv(n: float) -> float:
    """``1 / n`` in float32, as CUDA's ``a / python_number`` computes it."""
    return float(torch.tensor(1.0) / torch.tensor(float(n)))


def _clamp_mask(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """Where ``torch.clamp(x, lo, hi)``'s backward passes the gradient."""
    mask = (x > lo) & (x < hi)
    if CLAMP_AT_LO:
        mask |= x == lo
    if CLAMP_AT_HI:
        mask |= x == hi
    return mask


def _dense(t: torch.Tensor) -> torch.Tensor:
    """``t`` when its storage is dense with dim 0 outermost (contiguous, channels_last),
    so that flat offsets walk it and ``offset // inner`` is its dim-0 index; else a copy."""
    if t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last)):
        return t
    return t.contiguous()


def _like(g: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """The incoming gradient laid out as the saved tensor ``ref`` (same flat order; ``ref``
    may be a uint8 mask: the copy keeps the gradient's dtype)."""
    return g if g.stride() == ref.stride() else torch.empty_like(ref, dtype=g.dtype).copy_(g)


def _grid(n: int) -> tuple[int]:
    return (triton.cdiv(n, BLOCK),)


# --- Triton kernels -----------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _rd(x, DT: tl.constexpr):
        """Round float32 ``x`` to the tensor dtype (0 float32, 1 bfloat16, 2 float16) and back,
        half to even (explicitly for bf16: Triton's interpreter truncates)."""
        if DT == 1:
            b = x.to(tl.uint32, bitcast=True)
            b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
            return tl.where(x != x, x, b.to(tl.float32, bitcast=True))
        elif DT == 2:
            return x.to(tl.float16).to(tl.float32)
        else:
            return x

    @triton.jit
    def _rint(x):
        """Round half to even, as ``torch.round`` (and libdevice's ``rint``, which Triton's
        interpreter lacks): ``(|x| + 2^23) - 2^23`` rounds in float32 addition, the sign
        is copied back (-0.3 gives -0); from 2^23 on every float32 is an integer."""
        a = tl.abs(x)
        r = ((a + 8388608.0) - 8388608.0).to(tl.uint32, bitcast=True)
        r = (r | (x.to(tl.uint32, bitcast=True) & 0x80000000)).to(tl.float32, bitcast=True)
        return tl.where(a < 8388608.0, r, x)

    @triton.jit
    def _div(a, b):
        """IEEE ``a / b`` (round to nearest), b broadcast to a's shape (the interpreter's
        ``div_rn`` does not broadcast)."""
        return tl.math.div_rn(a, b + tl.zeros_like(a))

    @triton.jit
    def _div_scalar(x, n, inv_n, RECIP: tl.constexpr):
        """``x / n`` for a Python number n: CUDA multiplies by the float32 reciprocal."""
        if RECIP:
            return x * inv_n
        else:
            return _div(x, n)

    @triton.jit
    def _offsets(n, BLOCK: tl.constexpr):
        off = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        return off, off < n

    @triton.jit
    def _scale(s_ptr, off, m, inner, PER_CHANNEL: tl.constexpr):
        if PER_CHANNEL:
            return tl.load(s_ptr + off // inner, mask=m, other=1.0).to(tl.float32)
        else:
            return tl.load(s_ptr).to(tl.float32)

    @triton.jit
    def _fake_quant_fwd_kernel(
        v_ptr, s_ptr, z_ptr, out_ptr, mask_ptr, n, inner, lo, hi,
        PER_CHANNEL: tl.constexpr, SAVE: tl.constexpr, DT: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        off, m = _offsets(n, BLOCK)
        v = tl.load(v_ptr + off, mask=m, other=0.0).to(tl.float32)
        s = _scale(s_ptr, off, m, inner, PER_CHANNEL)
        z = tl.load(z_ptr).to(tl.float32)
        u = _rd(_div(v, s), DT)
        code = _rd((_rint(u) + (u - u)) + z, DT)
        inside = (code >= lo) & (code <= hi)
        clipped = tl.where(code < lo, lo, tl.where(code > hi, hi, code))
        code = tl.where(inside, code, clipped)
        out = _rd(_rd(code - z, DT) * s, DT)
        tl.store(out_ptr + off, out.to(out_ptr.dtype.element_ty), mask=m)
        if SAVE:
            tl.store(mask_ptr + off, inside.to(tl.uint8), mask=m)

    @triton.jit
    def _fake_quant_bwd_kernel(
        g_ptr, mask_ptr, s_ptr, gv_ptr, n, inner, PER_CHANNEL: tl.constexpr, DT: tl.constexpr, BLOCK: tl.constexpr
    ):
        off, m = _offsets(n, BLOCK)
        g = tl.load(g_ptr + off, mask=m, other=0.0).to(tl.float32)
        inside = tl.load(mask_ptr + off, mask=m, other=0) != 0
        s = _scale(s_ptr, off, m, inner, PER_CHANNEL)
        gv = tl.where(inside, _rd(_div(_rd(g * s, DT), s), DT), 0.0)
        tl.store(gv_ptr + off, gv.to(gv_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _lsq_fwd_kernel(v_ptr, s_ptr, out_ptr, n, lo, hi, DT: tl.constexpr, BLOCK: tl.constexpr):
        off, m = _offsets(n, BLOCK)
        v = tl.load(v_ptr + off, mask=m, other=0.0).to(tl.float32)
        s = tl.load(s_ptr).to(tl.float32)
        u = _rd(_div(v, s), DT)
        c = tl.where(u < lo, lo, tl.where(u > hi, hi, u))
        out = _rd((_rint(c) + (c - c)) * s, DT)
        tl.store(out_ptr + off, out.to(out_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _lsq_bwd_kernel(
        g_ptr, v_ptr, s_ptr, gv_ptr, p1_ptr, p2_ptr, n, lo, hi,
        AT_LO: tl.constexpr, AT_HI: tl.constexpr, DT: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        off, m = _offsets(n, BLOCK)
        g = tl.load(g_ptr + off, mask=m, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + off, mask=m, other=0.0).to(tl.float32)
        s = tl.load(s_ptr).to(tl.float32)
        u = _rd(_div(v, s), DT)
        c = tl.where(u < lo, lo, tl.where(u > hi, hi, u))
        r = _rint(c) + (c - c)
        inside = (u > lo) & (u < hi)
        if AT_LO:
            inside = inside | (u == lo)
        if AT_HI:
            inside = inside | (u == hi)
        du = tl.where(inside, _rd(g * s, DT), 0.0)  # d(code * s)/d code, then clamp's mask
        gv = _rd(_div(du, s), DT)
        t1 = tl.where(m, _rd(g * r, DT), 0.0)  # d(code * s)/ds
        t2 = tl.where(m, _rd(-du * _rd(_div(u, s), DT), DT), 0.0)  # d(v / s)/ds
        tl.store(gv_ptr + off, gv.to(gv_ptr.dtype.element_ty), mask=m)
        tl.store(p1_ptr + tl.program_id(0), tl.sum(t1, axis=0))
        tl.store(p2_ptr + tl.program_id(0), tl.sum(t2, axis=0))

    @triton.jit
    def _pact_fwd_kernel(
        x_ptr, a_ptr, s_ptr, out_ptr, code_ptr, n, SAVE: tl.constexpr, DT: tl.constexpr, BLOCK: tl.constexpr
    ):
        off, m = _offsets(n, BLOCK)
        x = tl.load(x_ptr + off, mask=m, other=0.0).to(tl.float32)
        a = tl.load(a_ptr).to(tl.float32)
        s = tl.load(s_ptr).to(tl.float32)
        above = x >= a
        relu = tl.where(x < 0, 0.0, x)
        y = tl.where(above, a, relu)
        out = _rd(_rint(_rd(_div(y, s), DT)) * s, DT) + (y - y)
        tl.store(out_ptr + off, out.to(out_ptr.dtype.element_ty), mask=m)
        if SAVE:
            # relu's backward blocks where its output is <= 0 (NaN passes)
            code = tl.where(above, 2, tl.where(relu <= 0, 0, 1))
            tl.store(code_ptr + off, code.to(tl.int8), mask=m)

    @triton.jit
    def _pact_bwd_kernel(g_ptr, code_ptr, gx_ptr, p_ptr, n, BLOCK: tl.constexpr):
        off, m = _offsets(n, BLOCK)
        g = tl.load(g_ptr + off, mask=m, other=0.0).to(tl.float32)
        code = tl.load(code_ptr + off, mask=m, other=0)
        tl.store(gx_ptr + off, tl.where(code == 1, g, 0.0).to(gx_ptr.dtype.element_ty), mask=m)
        tl.store(p_ptr + tl.program_id(0), tl.sum(tl.where(code == 2, g, 0.0), axis=0))

    @triton.jit
    def _quantize_k_fwd_kernel(
        x_ptr, out_ptr, code_ptr, numel, n, inv_n,
        CLIP: tl.constexpr, SAVE: tl.constexpr, RECIP: tl.constexpr, DT: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        off, m = _offsets(numel, BLOCK)
        x = tl.load(x_ptr + off, mask=m, other=0.0).to(tl.float32)
        if CLIP:
            c = tl.where(x < 0.0, 0.0, tl.where(x > 1.0, 1.0, x))
        else:
            c = x
        cn = _rd(c * n, DT)
        out = _rd(_div_scalar(_rint(cn) + (cn - cn), n, inv_n, RECIP), DT)
        tl.store(out_ptr + off, out.to(out_ptr.dtype.element_ty), mask=m)
        if SAVE:  # 0 inside, 1 at 0, 2 at 1, 3 outside (or NaN)
            code = tl.where((x > 0.0) & (x < 1.0), 0, tl.where(x == 0.0, 1, tl.where(x == 1.0, 2, 3)))
            tl.store(code_ptr + off, code.to(tl.int8), mask=m)

    @triton.jit
    def _quantize_k_bwd_kernel(
        g_ptr, code_ptr, gx_ptr, numel, n, inv_n,
        CLIP: tl.constexpr, AT_LO: tl.constexpr, AT_HI: tl.constexpr, RECIP: tl.constexpr,
        DT: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        off, m = _offsets(numel, BLOCK)
        g = tl.load(g_ptr + off, mask=m, other=0.0).to(tl.float32)
        gx = _rd(_rd(_div_scalar(g, n, inv_n, RECIP), DT) * n, DT)  # through "/ n", then "* n"
        if CLIP:
            code = tl.load(code_ptr + off, mask=m, other=3)
            inside = code == 0
            if AT_LO:
                inside = inside | (code == 1)
            if AT_HI:
                inside = inside | (code == 2)
            gx = tl.where(inside, gx, 0.0)
        tl.store(gx_ptr + off, gx.to(gx_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _count(table_ptr, x, m, length, LOG2: tl.constexpr, RIGHT: tl.constexpr):
        """How many of the sorted ``table[0:length]`` are <= x (RIGHT, torch.bucketize's
        right=True) or < x (searchsorted's side="left"); NaN counts them all, as torch."""
        idx = tl.zeros(x.shape, dtype=tl.int32)
        for i in tl.static_range(LOG2):
            cand = idx + (1 << (LOG2 - 1 - i))
            ok = m & (cand <= length)
            t = tl.load(table_ptr + (cand - 1), mask=ok, other=0.0)
            if RIGHT:
                below = ~(t > x)
            else:
                below = ~(t >= x)
            idx = tl.where(ok & below, cand, idx)
        return idx

    @triton.jit
    def _apot_level(
        x_ptr, a_ptr, lv_ptr, th_ptr, off, m, n_th, n_uniform, inv_nu,
        SIGNED: tl.constexpr, LOWER_CLIP: tl.constexpr, UNIFORM: tl.constexpr, RECIP: tl.constexpr, LOG2: tl.constexpr,
    ):  # fmt: skip
        """u = x / alpha and its (signed) level q, as ``_APoTFunction.forward``."""
        x = tl.load(x_ptr + off, mask=m, other=0.0).to(tl.float32)
        a = tl.load(a_ptr).to(tl.float32)
        u = _div(x, a)
        if SIGNED:
            c = tl.where(u < -1.0, -1.0, tl.where(u > 1.0, 1.0, u))
            mag = tl.abs(c)
        elif LOWER_CLIP:
            c = tl.where(u < 0.0, 0.0, tl.where(u > 1.0, 1.0, u))
            mag = c
        else:
            c = tl.where(u > 1.0, 1.0, u)
            mag = c
        if UNIFORM:
            q = _div_scalar(_rint(mag * n_uniform), n_uniform, inv_nu, RECIP)
        else:
            q = tl.load(lv_ptr + _count(th_ptr, mag, m, n_th, LOG2, True), mask=m, other=0.0)
        if SIGNED:
            q = q * tl.where(c > 0.0, 1.0, tl.where(c < 0.0, -1.0, 0.0))
        return u, q, a

    @triton.jit
    def _apot_fwd_kernel(
        x_ptr, a_ptr, lv_ptr, th_ptr, out_ptr, numel, n_th, n_uniform, inv_nu,
        SIGNED: tl.constexpr, LOWER_CLIP: tl.constexpr, UNIFORM: tl.constexpr, RECIP: tl.constexpr,
        LOG2: tl.constexpr, DT: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        off, m = _offsets(numel, BLOCK)
        u, q, a = _apot_level(
            x_ptr, a_ptr, lv_ptr, th_ptr, off, m, n_th, n_uniform, inv_nu, SIGNED, LOWER_CLIP, UNIFORM, RECIP, LOG2
        )
        tl.store(out_ptr + off, _rd(q * a, DT).to(out_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _apot_bwd_kernel(
        g_ptr, x_ptr, a_ptr, lv_ptr, th_ptr, gx_ptr, p_ptr, numel, n_th, n_uniform, inv_nu,
        SIGNED: tl.constexpr, LOWER_CLIP: tl.constexpr, UNIFORM: tl.constexpr, RECIP: tl.constexpr,
        CLIP_X: tl.constexpr, LOG2: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        off, m = _offsets(numel, BLOCK)
        g = tl.load(g_ptr + off, mask=m, other=0.0).to(tl.float32)
        u, q, a = _apot_level(
            x_ptr, a_ptr, lv_ptr, th_ptr, off, m, n_th, n_uniform, inv_nu, SIGNED, LOWER_CLIP, UNIFORM, RECIP, LOG2
        )
        if SIGNED:
            outside = tl.abs(u) > 1.0
            d_alpha = tl.where(outside, tl.where(u > 0.0, 1.0, tl.where(u < 0.0, -1.0, 0.0)), q - u)
        else:
            outside = u > 1.0
            d_alpha = tl.where(outside, 1.0, q - u)
            if LOWER_CLIP:
                below = u < 0.0
                d_alpha = tl.where(below, 0.0, d_alpha)
                outside = outside | below
        if CLIP_X or not SIGNED:
            gx = tl.where(outside, 0.0, g)
        else:
            gx = g
        tl.store(gx_ptr + off, gx.to(gx_ptr.dtype.element_ty), mask=m)
        tl.store(p_ptr + tl.program_id(0), tl.sum(tl.where(m, g * d_alpha, 0.0), axis=0))

    @triton.jit
    def _lq_fwd_kernel(
        x_ptr, lv_ptr, th_ptr, top_ptr, out_ptr, idx_ptr, code_ptr, numel, inner, n_levels,
        SIGNED: tl.constexpr, SAVE_IDX: tl.constexpr, SAVE_CODE: tl.constexpr, LOG2: tl.constexpr,
        DT: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        off, m = _offsets(numel, BLOCK)
        x = tl.load(x_ptr + off, mask=m, other=0.0).to(tl.float32)
        grp = off // inner
        idx = _count(th_ptr + grp * (n_levels - 1), x, m, n_levels - 1, LOG2, False)
        q = _rd(tl.load(lv_ptr + grp * n_levels + idx, mask=m, other=0.0), DT)
        if SIGNED:
            y = x
        else:
            top = tl.load(top_ptr).to(tl.float32)
            y = tl.where(x > top, top, x)  # torch.minimum (NaN propagates)
            if SAVE_CODE:  # minimum's backward: x < top passes, a tie halves, above blocks
                code = tl.where(x == top, 1, tl.where(x > top, 2, 0))
                tl.store(code_ptr + off, code.to(tl.uint8), mask=m)
        tl.store(out_ptr + off, (q + (y - y)).to(out_ptr.dtype.element_ty), mask=m)
        if SAVE_IDX:
            tl.store(idx_ptr + off, idx.to(tl.int64), mask=m)

    @triton.jit
    def _lq_bwd_kernel(g_ptr, code_ptr, gx_ptr, numel, DT: tl.constexpr, BLOCK: tl.constexpr):
        off, m = _offsets(numel, BLOCK)
        g = tl.load(g_ptr + off, mask=m, other=0.0).to(tl.float32)
        code = tl.load(code_ptr + off, mask=m, other=2)
        gx = tl.where(code == 0, g, tl.where(code == 1, _rd(g * 0.5, DT), 0.0))
        tl.store(gx_ptr + off, gx.to(gx_ptr.dtype.element_ty), mask=m)


def _log2_size(length: int) -> int:
    """Binary-search steps over a table of ``length`` entries (at least 1)."""
    return max(1, int(length).bit_length())


# --- fake_quant: uniform min-max (scale and zero point are statistics) -------------------


def _per_channel(v: torch.Tensor, scale: torch.Tensor) -> bool:
    return scale.numel() > 1


@torch.library.custom_op("qbench::fake_quant", mutates_args=())
def fake_quant_op(
    v: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qn: int, qp: int, save: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`~.functional.fake_quant` with a constant scale (one, or one per dim-0 index)
    and zero point; returns (value, uint8 inside-the-grid mask, empty unless ``save``)."""
    s = scale.reshape(-1, *([1] * (v.dim() - 1))) if _per_channel(v, scale) else scale.reshape(())
    out = fake_quant(v, s, qn, qp, zero_point.reshape(()))
    if not save:
        return out, v.new_empty(0, dtype=torch.uint8)
    c = (torch.round(v / s) + zero_point.reshape(())).detach()
    return out, ((c >= -qn) & (c <= qp)).to(torch.uint8)


@fake_quant_op.register_fake
def _(v, scale, zero_point, qn, qp, save):
    return torch.empty_like(v), torch.empty_like(v, dtype=torch.uint8) if save else v.new_empty(0, dtype=torch.uint8)


@torch.library.custom_op("qbench::fake_quant_backward", mutates_args=())
def fake_quant_backward(g: torch.Tensor, mask: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Gradient of ``fake_quant`` w.r.t. its input: ``(g s) / s`` inside the grid, else 0."""
    s = scale.reshape(-1, *([1] * (g.dim() - 1))) if scale.numel() > 1 else scale.reshape(())
    return torch.where(mask.bool(), (g * s) / s, torch.zeros((), dtype=g.dtype, device=g.device))


@fake_quant_backward.register_fake
def _(g, mask, scale):
    return torch.empty_like(g)


def _fake_quant_setup(ctx, inputs, output):
    ctx.save_for_backward(output[1], inputs[1])


def _fake_quant_bwd(ctx, grad, _grad_mask):
    mask, scale = ctx.saved_tensors
    return fake_quant_backward(grad, mask, scale), None, None, None, None, None


torch.library.register_autograd("qbench::fake_quant", _fake_quant_bwd, setup_context=_fake_quant_setup)


def fused_fake_quant(v: torch.Tensor, scale: torch.Tensor, qn: int, qp: int, zero_point: torch.Tensor | None = None):
    """The fused :func:`~.functional.fake_quant` for a scale and zero point without
    gradient (``scale``: a scalar or shape [C, 1, ...]; both in ``v``'s dtype)."""
    z = zero_point if zero_point is not None else torch.zeros((), dtype=v.dtype, device=v.device)
    save = torch.is_grad_enabled() and v.requires_grad
    return fake_quant_op(v, scale.detach(), z.detach(), qn, qp, save)[0]


# --- LSQ ----------------------------------------------------------------------------------


@torch.library.custom_op("qbench::lsq", mutates_args=())
def lsq_op(v: torch.Tensor, s: torch.Tensor, qn: int, qp: int, g: float) -> torch.Tensor:
    """:func:`~.functional.lsq_quantize` (the value does not depend on ``g``)."""
    return lsq_quantize(v, s, qn, qp, g).detach()


@lsq_op.register_fake
def _(v, s, qn, qp, g):
    return torch.empty_like(v)


@torch.library.custom_op("qbench::lsq_backward", mutates_args=())
def lsq_backward(
    grad: torch.Tensor, v: torch.Tensor, s: torch.Tensor, qn: int, qp: int, g: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Autograd's gradients of :func:`~.functional.lsq_quantize` w.r.t. v and s, as it forms
    them: ``code * s`` gives ``grad * s`` to the code and ``sum(grad * code)`` to s; the
    clamp masks; ``v / s`` gives ``du / s`` to v and ``sum(-du * ((v / s) / s))`` to s; the
    two sums add, times g."""
    u = v / s
    r = torch.round(u.clamp(-qn, qp))
    du = torch.where(_clamp_mask(u, -qn, qp), grad * s, torch.zeros((), dtype=grad.dtype, device=grad.device))
    gs = ((grad * r).sum() + (-du * (u / s)).sum()) * g
    return du / s, gs


@lsq_backward.register_fake
def _(grad, v, s, qn, qp, g):
    return torch.empty_like(v), s.new_empty(())


def _lsq_setup(ctx, inputs, output):
    v, s, qn, qp, g = inputs
    ctx.save_for_backward(v, s)
    ctx.args = (qn, qp, g)


def _lsq_bwd(ctx, grad):
    v, s = ctx.saved_tensors
    gv, gs = lsq_backward(grad, v, s, *ctx.args)
    return gv, gs.reshape(s.shape), None, None, None


torch.library.register_autograd("qbench::lsq", _lsq_bwd, setup_context=_lsq_setup)


def fused_lsq(v: torch.Tensor, s: torch.Tensor, qn: int, qp: int, g: float) -> torch.Tensor:
    """The fused :func:`~.functional.lsq_quantize` (``s`` in ``v``'s dtype)."""
    return lsq_op(v, s, qn, qp, g)


# --- PACT ---------------------------------------------------------------------------------


def pact_scale(alpha: torch.Tensor, k: int, dtype: torch.dtype) -> torch.Tensor:
    """PACT's quantization step ``alpha / (2^k - 1)``, as :func:`~.functional.pact_quantize`."""
    return (alpha.detach() / float(2**k - 1)).clamp_min(1e-8).to(dtype)


@torch.library.custom_op("qbench::pact", mutates_args=())
def pact_op(x: torch.Tensor, a: torch.Tensor, s: torch.Tensor, save: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`~.functional.pact_quantize` given ``a = alpha.to(x.dtype)`` and the step ``s``;
    returns (value, int8 code: 0 blocked, 1 gradient to x, 2 gradient to alpha)."""
    y = torch.where(x >= a, a, torch.relu(x))
    out = torch.round(y / s) * s + (y - y)
    if not save:
        return out, x.new_empty(0, dtype=torch.int8)
    code = torch.where(x >= a, 2, torch.where(torch.relu(x) <= 0, 0, 1)).to(torch.int8)
    return out, code


@pact_op.register_fake
def _(x, a, s, save):
    return torch.empty_like(x), torch.empty_like(x, dtype=torch.int8) if save else x.new_empty(0, dtype=torch.int8)


@torch.library.custom_op("qbench::pact_backward", mutates_args=())
def pact_backward(grad: torch.Tensor, code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dL/dx, dL/da): grad where the code says x, the sum of grad where it says alpha."""
    zero = torch.zeros((), dtype=grad.dtype, device=grad.device)
    return torch.where(code == 1, grad, zero), torch.where(code == 2, grad, zero).sum()


@pact_backward.register_fake
def _(grad, code):
    return torch.empty_like(grad), grad.new_empty(())


def _pact_setup(ctx, inputs, output):
    ctx.save_for_backward(output[1])


def _pact_bwd(ctx, grad, _grad_code):
    (code,) = ctx.saved_tensors
    gx, ga = pact_backward(grad, code)
    return gx, ga, None, None


torch.library.register_autograd("qbench::pact", _pact_bwd, setup_context=_pact_setup)


def fused_pact(x: torch.Tensor, alpha: torch.Tensor, k: int) -> torch.Tensor:
    """The fused :func:`~.functional.pact_quantize`."""
    save = torch.is_grad_enabled() and (x.requires_grad or alpha.requires_grad)
    return pact_op(x, alpha.to(x.dtype), pact_scale(alpha, k, x.dtype), save)[0]


# --- DoReFa: quantize_k -------------------------------------------------------------------


@torch.library.custom_op("qbench::quantize_k", mutates_args=())
def quantize_k_op(x: torch.Tensor, k: int, clip: bool, save: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`~.functional.quantize_k` (``clip``: of ``clamp(x, 0, 1)``, DoReFa's activations);
    returns (value, int8 code: 0 inside (0, 1), 1 at 0, 2 at 1, 3 outside; empty unless
    ``clip`` and ``save``)."""
    out = (dorefa_activation(x, k) if clip else quantize_k(x, k)).detach()
    if not (clip and save):
        return out, x.new_empty(0, dtype=torch.int8)
    code = torch.where((x > 0) & (x < 1), 0, torch.where(x == 0, 1, torch.where(x == 1, 2, 3)))
    return out, code.to(torch.int8)


@quantize_k_op.register_fake
def _(x, k, clip, save):
    keep = clip and save
    return torch.empty_like(x), torch.empty_like(x, dtype=torch.int8) if keep else x.new_empty(0, dtype=torch.int8)


@torch.library.custom_op("qbench::quantize_k_backward", mutates_args=())
def quantize_k_backward(grad: torch.Tensor, code: torch.Tensor, k: int, clip: bool) -> torch.Tensor:
    """``(grad / n) * n`` (the straight-through round between ``* n`` and ``/ n``), masked
    as ``torch.clamp``'s backward when ``clip``."""
    n = float(2**k - 1)
    gx = (grad / n) * n
    if not clip:
        return gx
    inside = code == 0
    if CLAMP_AT_LO:
        inside |= code == 1
    if CLAMP_AT_HI:
        inside |= code == 2
    return torch.where(inside, gx, torch.zeros((), dtype=gx.dtype, device=gx.device))


@quantize_k_backward.register_fake
def _(grad, code, k, clip):
    return torch.empty_like(grad)


def _quantize_k_setup(ctx, inputs, output):
    ctx.save_for_backward(output[1])
    ctx.args = (inputs[1], inputs[2])


def _quantize_k_bwd(ctx, grad, _grad_code):
    (code,) = ctx.saved_tensors
    return quantize_k_backward(grad, code, *ctx.args), None, None, None


torch.library.register_autograd("qbench::quantize_k", _quantize_k_bwd, setup_context=_quantize_k_setup)


def fused_dorefa_activation(x: torch.Tensor, k: int) -> torch.Tensor:
    """The fused :func:`~.functional.dorefa_activation`."""
    return quantize_k_op(x, k, True, torch.is_grad_enabled() and x.requires_grad)[0]


def fused_dorefa_weight(w: torch.Tensor, k: int) -> torch.Tensor:
    """:func:`~.functional.dorefa_weight` for k > 1 with the fused ``quantize_k`` (the tanh
    normalisation and its gradient through the max stay in torch, as the reference)."""
    t = torch.tanh(w)
    r = t / (2 * t.abs().amax()) + 0.5
    return 2 * quantize_k_op(r, k, False, False)[0] - 1


# --- APoT ---------------------------------------------------------------------------------


@torch.library.custom_op("qbench::apot", mutates_args=())
def apot_op(
    x: torch.Tensor,
    alpha: torch.Tensor,
    levels: torch.Tensor,
    thresholds: torch.Tensor,
    signed: bool,
    n_uniform: int,
    lower_clip: bool,
    clip_x_grad: bool,
    grad_scale: float,
) -> torch.Tensor:
    """``_APoTFunction.forward`` of :mod:`.apot`: ``alpha * P(clip(x / alpha))``
    (``clip_x_grad`` and ``grad_scale``, 0 for none, only shape the backward)."""
    from .apot import apot_quantize

    return apot_quantize(
        x.detach(), alpha.detach(), levels, thresholds, signed=signed, n_uniform=n_uniform, lower_clip=lower_clip
    )


@apot_op.register_fake
def _(x, alpha, levels, thresholds, signed, n_uniform, lower_clip, clip_x_grad, grad_scale):
    return torch.empty_like(x)


@torch.library.custom_op("qbench::apot_backward", mutates_args=())
def apot_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    alpha: torch.Tensor,
    levels: torch.Tensor,
    thresholds: torch.Tensor,
    signed: bool,
    n_uniform: int,
    lower_clip: bool,
    clip_x_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``_APoTFunction.backward`` before ``grad_scale`` and the cast to alpha's dtype,
    recomputing ``u = x / alpha`` and the level from the saved input: (dL/dx, float32
    dL/dalpha)."""
    from .apot import apot_grads, apot_project

    u, q = apot_project(x, alpha, levels, thresholds, signed, n_uniform, lower_clip)
    g_x, g_alpha = apot_grads(grad, u, q, signed, clip_x_grad, lower_clip)
    # a custom op's output must not alias its input (g_x is ``grad`` itself when unclipped)
    return g_x.to(grad.dtype, copy=True), g_alpha


@apot_backward.register_fake
def _(grad, x, alpha, levels, thresholds, signed, n_uniform, lower_clip, clip_x_grad):
    return torch.empty_like(grad), grad.new_empty((), dtype=torch.float32)


def _apot_setup(ctx, inputs, output):
    x, alpha, levels, thresholds, signed, n_uniform, lower_clip, clip_x_grad, grad_scale = inputs
    ctx.save_for_backward(x, alpha, levels, thresholds)
    ctx.args = (signed, n_uniform, lower_clip, clip_x_grad)
    ctx.grad_scale = grad_scale


def _apot_bwd(ctx, grad):
    x, alpha, levels, thresholds = ctx.saved_tensors
    gx, ga = apot_backward(grad, x, alpha, levels, thresholds, *ctx.args)
    if ctx.grad_scale:
        ga = ga * ctx.grad_scale
    return gx, ga.to(alpha.dtype).reshape(alpha.shape), None, None, None, None, None, None, None


torch.library.register_autograd("qbench::apot", _apot_bwd, setup_context=_apot_setup)


def fused_apot(
    x: torch.Tensor,
    alpha: torch.Tensor,
    levels: torch.Tensor,
    thresholds: torch.Tensor,
    *,
    signed: bool,
    n_uniform: int = 0,
    clip_x_grad: bool = True,
    lower_clip: bool = True,
    grad_scale: float | None = None,
) -> torch.Tensor:
    """The fused :func:`~.apot.apot_quantize` (same arguments)."""
    gs = float(grad_scale) if grad_scale else 0.0
    return apot_op(x, alpha, levels, thresholds, signed, int(n_uniform), lower_clip, clip_x_grad, gs)


# --- LQ-Net -------------------------------------------------------------------------------


def lq_thresholds(levels: torch.Tensor) -> torch.Tensor:
    """The decision thresholds of :func:`~.functional.lq_assign` ([G, L-1])."""
    return (0.5 * (levels[:, 1:] + levels[:, :-1])).contiguous()


@torch.library.custom_op("qbench::lq", mutates_args=())
def lq_op(
    x: torch.Tensor,
    levels: torch.Tensor,
    thresholds: torch.Tensor,
    top: torch.Tensor,
    signed: bool,
    want_idx: bool,
    save: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LQ-Net's forward (``LQQuantizer._quantize`` without the QEM step): the nearest of the
    group's ``levels`` [G, L] (x's dim 0 split into G groups), as x's dtype, with the
    straight-through value ``q + (m - m)``, ``m = x`` (``signed``) or ``minimum(x, top)``.
    Returns (value, int64 level index shaped as x or empty, uint8 code for the activations'
    backward: 0 below top, 1 at it, 2 above; empty unless ``save``)."""
    from .functional import lq_quantize

    q, idx = lq_quantize(x.detach().float().reshape(levels.shape[0], -1), levels)
    q = torch.empty_like(x).copy_(q.view(x.shape))
    m = x if signed else torch.minimum(x, top)
    out = q + (m - m)
    idx_out = idx.view(x.shape).clone() if want_idx else x.new_empty(0, dtype=torch.int64)
    if signed or not save:
        return out, idx_out, x.new_empty(0, dtype=torch.uint8)
    code = torch.where(x == top, 1, torch.where(x > top, 2, 0)).to(torch.uint8)
    return out, idx_out, code


@lq_op.register_fake
def _(x, levels, thresholds, top, signed, want_idx, save):
    idx = torch.empty_like(x, dtype=torch.int64) if want_idx else x.new_empty(0, dtype=torch.int64)
    code = torch.empty_like(x, dtype=torch.uint8) if (save and not signed) else x.new_empty(0, dtype=torch.uint8)
    return torch.empty_like(x), idx, code


@torch.library.custom_op("qbench::lq_backward", mutates_args=())
def lq_backward(grad: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """``torch.minimum(x, top)``'s gradient w.r.t. x: grad below top, grad / 2 at it, 0 above."""
    return torch.where(code == 1, grad / 2, grad).masked_fill(code == 2, 0)


@lq_backward.register_fake
def _(grad, code):
    return torch.empty_like(grad)


def _lq_setup(ctx, inputs, output):
    ctx.signed = inputs[4]
    ctx.save_for_backward(output[2])


def _lq_bwd(ctx, grad, _gi, _gc):
    if ctx.signed:
        return grad, None, None, None, None, None, None
    (code,) = ctx.saved_tensors
    return lq_backward(grad, code), None, None, None, None, None, None


torch.library.register_autograd("qbench::lq", _lq_bwd, setup_context=_lq_setup)


def fused_lq(
    x: torch.Tensor, levels: torch.Tensor, top: torch.Tensor | None, signed: bool, want_idx: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """LQ-Net's quantized value of x (gradient: straight-through, activations' clipped above
    ``top``) and, when ``want_idx``, each element's level index shaped as x."""
    levels = levels.detach().float().contiguous()
    if top is None:
        top = torch.zeros((), dtype=x.dtype, device=x.device)
    save = torch.is_grad_enabled() and x.requires_grad and not signed
    out, idx, _ = lq_op(x, levels, lq_thresholds(levels), top.detach(), signed, want_idx, save)
    return out, idx


# --- the CUDA implementations: Triton kernels ---------------------------------------------


def _dt(t: torch.Tensor) -> int:
    return _DTYPES[t.dtype]


def _triton_fake_quant(v, scale, zero_point, qn, qp, save):
    v = _dense(v)
    out = torch.empty_like(v)
    mask = torch.empty_like(v, dtype=torch.uint8) if save else v.new_empty(0, dtype=torch.uint8)
    n = v.numel()
    per_channel = _per_channel(v, scale)
    inner = n // v.shape[0] if per_channel else n
    _fake_quant_fwd_kernel[_grid(n)](
        v, scale.contiguous(), zero_point, out, mask, n, inner, float(-qn), float(qp),
        PER_CHANNEL=per_channel, SAVE=save, DT=_dt(v), BLOCK=BLOCK, enable_fp_fusion=False,
    )  # fmt: skip
    return out, mask


def _triton_fake_quant_backward(g, mask, scale):
    g = _like(g, mask) if g.shape == mask.shape else g
    gv = torch.empty_like(g)
    n = g.numel()
    per_channel = scale.numel() > 1
    inner = n // g.shape[0] if per_channel else n
    _fake_quant_bwd_kernel[_grid(n)](
        g, mask, scale.contiguous(), gv, n, inner,
        PER_CHANNEL=per_channel, DT=_dt(g), BLOCK=BLOCK, enable_fp_fusion=False,
    )  # fmt: skip
    return gv


def _triton_lsq(v, s, qn, qp, g):
    v = _dense(v)
    out = torch.empty_like(v)
    n = v.numel()
    _lsq_fwd_kernel[_grid(n)](v, s, out, n, float(-qn), float(qp), DT=_dt(v), BLOCK=BLOCK, enable_fp_fusion=False)
    return out


def _triton_lsq_backward(grad, v, s, qn, qp, g):
    v = _dense(v)
    grad = _like(grad, v)
    gv = torch.empty_like(v)
    n = v.numel()
    grid = _grid(n)
    p1 = torch.empty(grid[0], dtype=torch.float32, device=v.device)
    p2 = torch.empty_like(p1)
    _lsq_bwd_kernel[grid](
        grad, v, s, gv, p1, p2, n, float(-qn), float(qp),
        AT_LO=CLAMP_AT_LO, AT_HI=CLAMP_AT_HI, DT=_dt(v), BLOCK=BLOCK, enable_fp_fusion=False,
    )  # fmt: skip
    # the reference's two reductions, each in the input's dtype, then their sum times g
    gs = (p1.sum().to(v.dtype) + p2.sum().to(v.dtype)) * g
    return gv, gs


def _triton_pact(x, a, s, save):
    x = _dense(x)
    out = torch.empty_like(x)
    code = torch.empty_like(x, dtype=torch.int8) if save else x.new_empty(0, dtype=torch.int8)
    n = x.numel()
    _pact_fwd_kernel[_grid(n)](x, a, s, out, code, n, SAVE=save, DT=_dt(x), BLOCK=BLOCK, enable_fp_fusion=False)
    return out, code


def _triton_pact_backward(grad, code):
    grad = _like(grad, code)
    gx = torch.empty_like(grad)
    n = grad.numel()
    grid = _grid(n)
    p = torch.empty(grid[0], dtype=torch.float32, device=grad.device)
    _pact_bwd_kernel[grid](grad, code, gx, p, n, BLOCK=BLOCK, enable_fp_fusion=False)
    return gx, p.sum().to(grad.dtype)


def _triton_quantize_k(x, k, clip, save):
    x = _dense(x)
    out = torch.empty_like(x)
    keep = clip and save
    code = torch.empty_like(x, dtype=torch.int8) if keep else x.new_empty(0, dtype=torch.int8)
    numel, n = x.numel(), float(2**k - 1)
    _quantize_k_fwd_kernel[_grid(numel)](
        x, out, code, numel, n, _inv(n),
        CLIP=clip, SAVE=keep, RECIP=x.is_cuda, DT=_dt(x), BLOCK=BLOCK, enable_fp_fusion=False,
    )  # fmt: skip
    return out, code


def _triton_quantize_k_backward(grad, code, k, clip):
    if clip:
        grad = _like(grad, code)
    gx = torch.empty_like(grad)
    numel, n = grad.numel(), float(2**k - 1)
    _quantize_k_bwd_kernel[_grid(numel)](
        grad, code, gx, numel, n, _inv(n),
        CLIP=clip, AT_LO=CLAMP_AT_LO, AT_HI=CLAMP_AT_HI, RECIP=grad.is_cuda, DT=_dt(grad), BLOCK=BLOCK,
        enable_fp_fusion=False,
    )  # fmt: skip
    return gx


def _apot_args(levels, thresholds, n_uniform):
    n_th = thresholds.numel()
    return dict(n_th=n_th, n_uniform=float(n_uniform), inv_nu=_inv(n_uniform) if n_uniform else 0.0), _log2_size(n_th)


def _triton_apot(x, alpha, levels, thresholds, signed, n_uniform, lower_clip, clip_x_grad, grad_scale):
    x = _dense(x)
    out = torch.empty_like(x)
    numel = x.numel()
    args, log2 = _apot_args(levels, thresholds, n_uniform)
    _apot_fwd_kernel[_grid(numel)](
        x, alpha, levels.contiguous(), thresholds.contiguous(), out, numel, **args,
        SIGNED=signed, LOWER_CLIP=lower_clip, UNIFORM=bool(n_uniform), RECIP=x.is_cuda, LOG2=log2, DT=_dt(x),
        BLOCK=BLOCK, enable_fp_fusion=False,
    )  # fmt: skip
    return out


def _triton_apot_backward(grad, x, alpha, levels, thresholds, signed, n_uniform, lower_clip, clip_x_grad):
    x = _dense(x)
    grad = _like(grad, x)
    gx = torch.empty_like(grad)
    numel = x.numel()
    grid = _grid(numel)
    p = torch.empty(grid[0], dtype=torch.float32, device=x.device)
    args, log2 = _apot_args(levels, thresholds, n_uniform)
    _apot_bwd_kernel[grid](
        grad, x, alpha, levels.contiguous(), thresholds.contiguous(), gx, p, numel, **args,
        SIGNED=signed, LOWER_CLIP=lower_clip, UNIFORM=bool(n_uniform), RECIP=x.is_cuda, CLIP_X=clip_x_grad,
        LOG2=log2, BLOCK=BLOCK, enable_fp_fusion=False,
    )  # fmt: skip
    return gx, p.sum()


def _triton_lq(x, levels, thresholds, top, signed, want_idx, save):
    x = _dense(x)
    out = torch.empty_like(x)
    idx = torch.empty_like(x, dtype=torch.int64) if want_idx else x.new_empty(0, dtype=torch.int64)
    keep = save and not signed
    code = torch.empty_like(x, dtype=torch.uint8) if keep else x.new_empty(0, dtype=torch.uint8)
    numel = x.numel()
    g, n_levels = levels.shape
    _lq_fwd_kernel[_grid(numel)](
        x, levels.contiguous(), thresholds.contiguous(), top, out, idx, code, numel, numel // g, n_levels,
        SIGNED=signed, SAVE_IDX=want_idx, SAVE_CODE=keep, LOG2=_log2_size(n_levels - 1), DT=_dt(x),
        BLOCK=BLOCK, enable_fp_fusion=False,
    )  # fmt: skip
    return out, idx, code


def _triton_lq_backward(grad, code):
    grad = _like(grad, code)
    gx = torch.empty_like(grad)
    numel = grad.numel()
    _lq_bwd_kernel[_grid(numel)](grad, code, gx, numel, DT=_dt(grad), BLOCK=BLOCK, enable_fp_fusion=False)
    return gx


#: op name -> its Triton implementation (registered for CUDA; the tests also run them on
#: the CPU through Triton's interpreter)
TRITON_IMPLS = {
    "fake_quant": _triton_fake_quant,
    "fake_quant_backward": _triton_fake_quant_backward,
    "lsq": _triton_lsq,
    "lsq_backward": _triton_lsq_backward,
    "pact": _triton_pact,
    "pact_backward": _triton_pact_backward,
    "quantize_k": _triton_quantize_k,
    "quantize_k_backward": _triton_quantize_k_backward,
    "apot": _triton_apot,
    "apot_backward": _triton_apot_backward,
    "lq": _triton_lq,
    "lq_backward": _triton_lq_backward,
}

if HAS_TRITON:
    for _name, _impl in TRITON_IMPLS.items():
        torch.library.register_kernel(f"qbench::{_name}", "cuda", _impl)
