"""Deterministic CPU evaluation: the same logits whatever the thread count, backend, batch
size, machine load or CPU.

Why. A quantized network rounds every activation (and, with weight normalisation, every
weight) to a level, so a value that lands within an ulp of a decision threshold goes one
way or the other depending on the last bit of the sum that produced it, and the flip
propagates to the logits. On the CPU that last bit depends on things that have nothing to
do with the model:

* the convolution backend and kernel: oneDNN (``torch.backends.mkldnn``, the default),
  NNPACK (used when oneDNN is off and the batch has at least 16 images; a fast, less
  exact algorithm) or im2col + BLAS GEMM (small batches, or both off), and within oneDNN
  and BLAS the kernel picked for the CPU's instruction set and the tensor shapes (the
  same image gave different float32 results in a batch of 1 and in a batch of 100);
* every large reduction: ``Tensor.sum``/``mean``/``std`` split their input among the
  threads above the grain size (32,768 elements), so e.g. the mean of a 64x64x3x3 weight
  (36,864 elements), which APoT's weight normalisation divides by, can differ in its last
  bit between 1 and 2 threads.

Measured on the released APoT ResNet-20 4-bit checkpoint (10,000 CIFAR-10-JPEG test
images, ``docs/benchmarks.md``): oneDNN and NNPACK disagree on 87 predictions (top-1 82.92
vs 82.81), the same pinned computation gives 82.88 (0 differences for 1 to 8 threads, with
and without two CPU-burning processes beside it).

What :func:`deterministic_cpu` pins, for the duration of the ``with`` block:

* ``torch.set_num_threads(1)`` (``threads``): a fixed thread count, so no reduction is
  split by the number of threads (and nothing depends on how many cores are free);
* oneDNN and NNPACK off: one convolution backend whatever the flags, batch size or
  thread count would have chosen;
* the boundary-sensitive operations in float64 (with ``float64``, the default): the long
  sums of products (``conv1d/2d/3d``, ``conv_transpose*``, ``linear``, ``bilinear``,
  ``matmul``, ``mm``, ``bmm``, ``addmm``, ``baddbmm``, ``einsum``) and the reductions
  (``sum``, ``mean``, ``std``, ``var``, ``std_mean``, ``var_mean``, ``nansum``,
  ``nanmean``) of float32 CPU tensors are computed in float64 and rounded back to float32.
  Products of float32 numbers are exact in float64 and the float64 sum is within ~1e-16
  (relative) of the exact one whatever the order of summation, so its rounding to float32
  is the correctly rounded exact result unless the exact value lies within ~1e-16 of a
  float32 rounding midpoint: the same for every algorithm, blocking, thread count,
  instruction set and machine. The boundary-sensitive part therefore cannot move. Other
  dtypes and devices, and calls with ``dtype=`` or ``out=``, pass through untouched.

Elementwise operations (BatchNorm in eval mode, ReLU, additions, pooling windows, the
quantizers' projections) compute each element on its own and need nothing pinned.
Everything is restored on exit, also after an exception.

Cost (2-core machine, 10,000 CIFAR-10 images, the released APoT ResNet-20 checkpoints at
32 / 4 / 3 / 2 bits): 48 / 104 / 87 / 83 s pinned on one thread, against 15 / 44 / 42 /
39 s (30 / 86 / 82 / 75 CPU-seconds) with the defaults (oneDNN, 2 threads); about half of
the pinned time is the quantizers, the same in both. There is no float64 oneDNN kernel;
float64 convolutions take the im2col + GEMM path, a few images at a time
(:data:`CHUNK_BYTES`). ``threads=None`` keeps the caller's thread count (the float64
results were bit-identical for 1 to 8 threads) for a caller that prefers speed to the
pinned count. CUDA evaluation is not affected: the harness enters this only on the CPU
(``train.evaluate``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

#: convolutions (batch first): every output element is a long sum of products
_CONVS = (
    torch.convolution,
    torch.conv1d,
    torch.conv2d,
    torch.conv3d,
    torch.conv_transpose1d,
    torch.conv_transpose2d,
    torch.conv_transpose3d,
)
#: the boundary-sensitive operations: every output element is a long sum of products
_PRODUCTS = _CONVS + (
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
#: reductions, whose float32 result depends on how the input is split among threads (and
#: on the vector width): e.g. the mean and standard deviation of weight normalisation
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
_CONV_SET = frozenset(_CONVS)
#: bytes of float64 unfolded input (im2col) per chunk of a convolution: small enough to
#: stay in the allocator's heap and the caches (a whole batch of 1,000 CIFAR images is
#: 1.2 GB at ResNet-20's first stage, mapped and page-faulted anew by every call: the
#: convolution took 4.5 times longer, half of it in the kernel)
CHUNK_BYTES = 4 << 20


def _is_f32_cpu(x: object) -> bool:
    return isinstance(x, torch.Tensor) and x.dtype == torch.float32 and x.device.type == "cpu"


def _wide(x: object) -> object:
    return x.double() if isinstance(x, torch.Tensor) else x


class Float64Sums(TorchFunctionMode):
    """Compute the sums of products and the reductions (:data:`_WIDENED`) of float32 CPU
    tensors in float64 and round the results back to float32 (see the module docstring).
    Everything else, and those operations on other dtypes or devices, pass through.
    Batched convolutions run :data:`CHUNK_BYTES` of images at a time (an image's result
    does not depend on the others: bit-identical for batches of 1 to 1,000)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in _WIDENED or "out" in kwargs or "dtype" in kwargs:
            return func(*args, **kwargs)
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        if not tensors or not all(_is_f32_cpu(t) for t in tensors):
            return func(*args, **kwargs)
        rest = tuple(_wide(a) for a in args[1:])
        wide_kwargs = {k: _wide(v) for k, v in kwargs.items()}
        x = args[0] if args else None
        batched = func in _CONV_SET and isinstance(x, torch.Tensor) and len(rest) and x.dim() == rest[0].dim()
        if batched and x.shape[0] > 1:
            per_image = x[0].numel() * rest[0][0, 0].numel() * 8  # ~ its unfolded input
            n = max(1, CHUNK_BYTES // max(1, per_image))
            if x.shape[0] > n:
                return torch.cat([func(c.double(), *rest, **wide_kwargs).float() for c in x.split(n)])
        out = func(*(_wide(a) for a in args), **wide_kwargs)
        if isinstance(out, tuple):  # std_mean, var_mean
            return tuple(o.float() for o in out)
        return out.float()


@contextlib.contextmanager
def deterministic_cpu(threads: int | None = 1, float64: bool = True, enabled: bool = True) -> Iterator[None]:
    """Pin what decides the last bits of a CPU forward pass (see the module docstring):
    ``threads`` intra-op threads (None: leave the count as it is), oneDNN and NNPACK off
    and, with ``float64``, sums of products and reductions in float64. Restores the thread
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
        with Float64Sums() if float64 else contextlib.nullcontext():
            yield
    finally:
        torch.set_num_threads(previous)
        torch.backends.nnpack.set_flags(nnpack[0])
        torch.backends.mkldnn.set_flags(mkldnn[0], None, None, None)
