"""Deterministic CPU evaluation: the same logits whatever the thread count or machine load.

Why. A quantized network rounds every activation (and, with weight normalisation, every
weight) to a level, so a value that lands within an ulp of a decision threshold goes one
way or the other depending on the last bit of the sum that produced it. On the CPU that
last bit depends on things that have nothing to do with the model:

* the convolution algorithm and its blocking: oneDNN (``torch.backends.mkldnn``) picks its
  kernel and splits the reduction by the number of threads, and the fallback
  (im2col + BLAS GEMM) blocks by thread count too;
* every large reduction: ``Tensor.sum``/``mean``/``std`` split their input among the
  threads once it exceeds the grain size (32,768 elements), so e.g. the mean of a
  64x64x3x3 weight (36,864 elements), which APoT's weight normalisation divides by,
  differs in its last bit between 1 and 2 threads.

With the released APoT ResNet-20 checkpoints this moved the 4-bit model's top-1 on the
10,000 CIFAR-10-JPEG test images by 0.1 point (10 images) between settings.

What :func:`deterministic_cpu` pins, for the duration of the ``with`` block:

* ``torch.set_num_threads(1)``: one thread, so no reduction is split by thread count and
  nothing depends on how many cores are free (an OpenMP team of 2 on 2 busy cores is also
  far slower than one thread);
* ``torch.backends.mkldnn`` off: one convolution backend, whatever oneDNN would choose;
* convolutions and linear layers (``conv1d/2d/3d``, ``conv_transpose1d/2d/3d``,
  ``linear``, ``matmul``, ``mm``, ``bmm``, ``addmm``) of float32 tensors computed in float64
  and rounded back to float32: the float64 result is within ~1e-16 (relative) of the exact
  sum whatever the order of summation, so its rounding to float32 is (up to a double
  rounding, which needs the exact value within ~1e-16 of a float32 rounding midpoint)
  the correctly rounded exact result, the same for every algorithm, blocking, instruction
  set and machine. The boundary-sensitive part therefore cannot move. Other dtypes and
  devices pass through untouched.

Everything is restored on exit (also on an exception). Elementwise operations (BatchNorm in
eval mode, ReLU, the quantizers' projections, additions) compute each element on its own
and need nothing pinned.

Cost: one thread and float64 convolutions make CPU evaluation slower than the defaults
(measured on the APoT ResNet-20 test, see ``docs/benchmarks.md``); CUDA evaluation is not
affected (the harness only enters this on the CPU).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

#: the boundary-sensitive operations: every output element is a long sum of products
_PRODUCTS = (
    torch.conv1d,
    torch.conv2d,
    torch.conv3d,
    torch.conv_transpose1d,
    torch.conv_transpose2d,
    torch.conv_transpose3d,
    F.linear,
    F.bilinear,
    torch.matmul,
    torch.mm,
    torch.bmm,
    torch.addmm,
    torch.baddbmm,
    torch.einsum,
    torch.Tensor.matmul,
    torch.Tensor.__matmul__,
    torch.Tensor.mm,
    torch.Tensor.bmm,
    torch.Tensor.addmm,
)
#: full reductions whose float32 result depends on how the input is split among threads
#: (and on the vector width): e.g. the mean and standard deviation of weight normalisation
_REDUCTIONS = (
    torch.sum,
    torch.mean,
    torch.std,
    torch.var,
    torch.std_mean,
    torch.var_mean,
    torch.nansum,
    torch.nanmean,
    torch.Tensor.sum,
    torch.Tensor.mean,
    torch.Tensor.std,
    torch.Tensor.var,
    torch.Tensor.nansum,
    torch.Tensor.nanmean,
)
_WIDENED = frozenset(_PRODUCTS + _REDUCTIONS)


def _is_f32_cpu(x: object) -> bool:
    return isinstance(x, torch.Tensor) and x.dtype == torch.float32 and x.device.type == "cpu"


class Float64Products(TorchFunctionMode):
    """Compute the :data:`_WIDENED` operations of float32 CPU tensors in float64 and
    round the result back to float32 (see the module docstring)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _WIDENED and "out" not in kwargs and "dtype" not in kwargs:
            flat = list(args) + list(kwargs.values())
            tensors = [a for a in flat if isinstance(a, torch.Tensor)]
            if tensors and all(_is_f32_cpu(t) for t in tensors):
                args = tuple(a.double() if isinstance(a, torch.Tensor) else a for a in args)
                kwargs = {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
                out = func(*args, **kwargs)
                if isinstance(out, tuple):  # std_mean, var_mean
                    return tuple(o.float() for o in out)
                return out.float()
        return func(*args, **kwargs)


@contextlib.contextmanager
def deterministic_cpu(threads: int | None = 1, float64: bool = True, enabled: bool = True) -> Iterator[None]:
    """Pin what decides the last bits of a CPU forward pass (see the module docstring):
    ``threads`` intra-op threads (None: leave the count as it is), oneDNN and NNPACK off
    and, with ``float64``, products and full reductions in float64. Restores the thread
    count, the backend flags and the function mode on exit, also after an exception.
    ``enabled=False`` does nothing (e.g. ``enabled=device.type == "cpu"``)."""
    if not enabled:
        yield
        return
    previous = torch.get_num_threads()
    mkldnn = torch.backends.mkldnn.set_flags(False, None, None, None)
    nnpack = torch.backends.nnpack.set_flags(False)
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        with Float64Products() if float64 else contextlib.nullcontext():
            yield
    finally:
        torch.set_num_threads(previous)
        torch.backends.nnpack.set_flags(nnpack[0])
        torch.backends.mkldnn.set_flags(mkldnn[0], None, None, None)
