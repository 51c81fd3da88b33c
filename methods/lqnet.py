r"""LQ-Nets: learned quantizers, fitted by alternating least squares during training.

Zhang, Yang, Ye, Hua. "LQ-Nets: Learned Quantization for Highly Accurate and Compact Deep
Neural Networks", ECCV 2018. https://arxiv.org/abs/1807.10029
(official code, TensorFlow/tensorpack: https://github.com/microsoft/LQ-Nets).

A K-bit quantizer has a basis :math:`v \in \mathbb{R}^K` and maps x to the nearest of the
levels :math:`v^T e_l`, :math:`e_l \in \{-1, 1\}^K` (weights) or :math:`\{0, 1\}^K`
(activations), :math:`l = 1 \dots 2^K` (eq. 4-5):

.. math::
    Q(x, v) = v^T e_l, \quad \text{if } x \in (t_l, t_{l+1}], \qquad
    t_l = \tfrac12 (v^T e_{l-1} + v^T e_l) \text{ over the sorted levels.}

Quantization Error Minimization (QEM, Algorithm 1) fits the basis to the data by
alternating: (1) codes: each x takes its nearest level's code (the line above);
(2) basis: the least-squares solution for fixed codes,

.. math::
    v^* = (B^T B)^{-1} B^T x \qquad (B: \text{one row } e^T \text{ per element}),

then the basis follows :math:`v^*` by TensorFlow's *zero-debiased* moving average, as
the official code's ``moving_averages.assign_moving_average(basis, new_basis,
MOVING_AVERAGES_FACTOR)`` (``learned_quantization.py``, in ``QuantizedActiv`` and
``QuantizedWeight``) does: it passes no ``zero_debias`` argument, and TF 1's default is
``zero_debias=True``. With decay :math:`\beta = 0.9` (``MOVING_AVERAGES_FACTOR``), a biased
accumulator :math:`b` that starts at 0 and the update count :math:`t`,

.. math::
    b_t = b_{t-1} - (1 - \beta)(b_{t-1} - v^*_t), \qquad
    v_t = b_t / (1 - \beta^t),

so the first update sets the basis to the first least-squares solution and later ones
average all solutions so far with weights :math:`\propto \beta^{t-i}` (TF's
``_zero_debias``, float32 arithmetic in its order). :math:`b` and :math:`t` are buffers
(``biased``, ``local_step``: TF's ``basis/biased`` and ``basis/local_step`` variables), so
checkpoints and resumed runs keep them. As in the official code, one QEM step runs in
every training forward pass (the basis is not trained by gradient) on the current batch
(activations) or the current weights; the weights' normal equations carry the official
ridge :math:`B^TB + \delta I`, :math:`B^Tx + \delta v` with :math:`\delta = 10^{-4}`.

* One basis per output channel for weights, one per activation tensor: in a ResNet block
  whose projection shortcut reads the block's input, as conv1 does (torchvision's
  ``BasicBlock``/``Bottleneck`` ``downsample``, qbench's CIFAR ResNet with option-B
  shortcuts), the two convolutions share one activation quantizer -- the same module
  object, so one basis -- as the official pre-activation ResNet (``resnet_model.py``)
  quantizes a block's input once (``quant_last`` / ``quant1``) and feeds the quantized
  tensor to both ``conv1`` and ``convshortcut``. The input is quantized, and the basis
  updated, once per forward pass: the second reader gets the first one's output.
* Initial basis (official code): weights :math:`v_j = 2^j \cdot 0.6745 \sqrt{2/n}/2^{K-1}`,
  :math:`n` = kernel area x output channels (the He-init fan-out);
  activations :math:`v_j = 2^j \cdot 0.6745 \cdot 2/(2^K - 1)`.
* Gradients (straight-through): weights :math:`\partial Q/\partial x = 1`; activations
  :math:`\partial Q/\partial x = 1` below the largest level, 0 above (the official
  ``x_clip = min(x, max level)``).
* First and last layers in full precision, weights and inputs (official ResNet code).
* Ternary (the EasyQuantization dashboard's ``ter``): with ``ternary: true``, every 2-bit
  quantizer becomes a one-element basis with codes {-1, 0, +1} (weights: levels
  {-v, 0, v}) or {0, 1, 2} (activations: levels {0, v, 2v}), fitted by the same QEM
  step; it is stored at 2 bits and audited at 3 levels.

Version 2 (moving average and sharing as above); version 1 used a plain moving average
:math:`v \leftarrow 0.9 v + 0.1 v^*` from the initial basis, and a basis per shortcut. A
checkpoint saved without ``biased``/``local_step`` loads as a settled average
(``biased = basis``, :math:`\beta^t = 0`), which continues from its basis.

Deviations: the activations' normal equations get the same ridge as the weights' (the
official code inverts :math:`B^TB` alone, which is singular when a bit is unused in a
batch); the ternary code set is qbench's (the paper quantizes to 2^K levels only);
the QEM step also runs on calibration batches, so a fine-tuned model's activation
bases start from the data; training starts from the full-precision baseline (the
official code trains from scratch).

On CUDA the quantizers run the fused kernels of :mod:`qbench.methods.fused` (recipe ``fused: false``: this reference).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from . import fused as _fused
from .base import Method, MethodContext, Paper
from .functional import (
    binary_codes,
    forward_value,
    lq_levels,
    lq_quantize,
    qem_basis,
    ternary_codes,
)
from .modules import QuantConv2d, Quantizer, per_channel_groups, quantize_model

NORM_PPF_0_75 = 0.6745  # the 0.75 quantile of the standard normal (official init)
MOVING_AVERAGE = 0.9  # the official ``MOVING_AVERAGES_FACTOR``
DELTA = 1e-4  # the official ridge ``EPS``
#: update count given to a checkpoint saved without the zero-debias state (version 1): so
#: large that ``momentum ** t`` is 0 in float32, so the average goes on from its basis
SETTLED_STEP = 2**30


class LQQuantizer(Quantizer):
    """LQ-Net quantizer for weights (``signed``, one basis per output channel) or
    activations (unsigned, one basis per layer).

    Buffers: ``basis`` [K, G] (stored beside the codes); ``biased`` [K, G] and
    ``local_step`` (int64), the state of TensorFlow's zero-debiased moving average (training
    state: not counted as stored scales); ``codes`` [L, K], the constant code table (not
    stored: non-persistent). ``momentum`` is the moving average's decay (the official 0.9).

    ``readers``: how many layers read the same input tensor through this quantizer (2 for
    a ResNet block's conv1 and projection shortcut, see :func:`share_block_inputs`). While
    statistics move (training, calibration), the first reader's output is handed to the
    others, so the input is quantized with one basis and the basis updated once.
    """

    def __init__(
        self,
        bits: int,
        signed: bool,
        groups: int = 1,
        fan: int = 1,
        ternary: bool = False,
        momentum: float = MOVING_AVERAGE,
    ):
        super().__init__(bits)
        self.signed = signed
        self.ternary = bool(ternary) and bits == 2
        self.momentum = momentum
        codes = ternary_codes(signed) if self.ternary else binary_codes(bits, signed)
        k, num_levels = codes.shape[1], codes.shape[0]
        if signed:
            base = NORM_PPF_0_75 * math.sqrt(2.0 / fan) / 2 ** (k - 1)
        else:
            base = NORM_PPF_0_75 * 2.0 / (num_levels - 1)
        init = torch.tensor([base * 2**j for j in range(k)]).unsqueeze(1).repeat(1, groups)
        self.register_buffer("basis", init)
        # TF's zero_debias state: the biased accumulator starts at 0, the count at 0
        self.register_buffer("biased", torch.zeros_like(init))
        self.register_buffer("local_step", torch.zeros((), dtype=torch.int64))
        self.register_buffer("codes", codes, persistent=False)
        self.readers = 1
        self._pending: tuple[torch.Tensor, torch.Tensor, int] | None = None
        self.mark_initialized()  # the official init is not data-driven

    def scale_count(self) -> int:
        return self.basis.numel()  # what inference needs; biased/local_step are training state

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        basis_key, biased_key, step_key = prefix + "basis", prefix + "biased", prefix + "local_step"
        if basis_key not in state_dict:
            # no basis to go with them (e.g. a parent at other bits, filtered by shape):
            # the moving-average state stays this quantizer's own
            state_dict.pop(biased_key, None)
            state_dict.pop(step_key, None)
        elif biased_key not in state_dict or step_key not in state_dict:
            # saved before version 2 (plain moving average): a settled average of its basis
            basis = state_dict[basis_key]
            state_dict[biased_key] = basis.detach().clone()
            state_dict[step_key] = torch.tensor(SETTLED_STEP, dtype=torch.int64)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def max_levels(self) -> int:
        return int(self.codes.shape[0])

    def groups(self, q: torch.Tensor) -> list[torch.Tensor]:
        return per_channel_groups(q) if self.signed else [q]

    def extra_repr(self) -> str:
        kind = "ternary" if self.ternary else f"bits={self.bits}"
        return f"{kind}, {'weights' if self.signed else 'activations'}, groups={self.basis.shape[1]}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._pending is not None:
            src, out, left = self._pending
            self._pending = None
            if src is x:  # another reader of the tensor just quantized: same output
                if left > 1:
                    self._pending = (src, out, left - 1)
                return out
        out = self._quantize(x)
        if self.readers > 1 and (self.training or self.observing):
            self._pending = (x, out, self.readers - 1)
        return out

    def _quantize(self, x: torch.Tensor) -> torch.Tensor:
        groups = self.basis.shape[1]
        levels, sorted_codes = lq_levels(self.basis, self.codes)
        if self.fused and _fused.supported(x):
            return self._quantize_fused(x, levels, sorted_codes)
        with torch.no_grad():
            rows = x.detach().float().reshape(groups, -1)  # [G, M]: per channel, or all
            q, idx = lq_quantize(rows, levels)
            if self.training or self.observing:
                self._qem_step(rows, idx, sorted_codes)
            # back to x's shape and memory format (channels_last stays channels_last)
            q = torch.empty_like(x).copy_(q.view(x.shape))
        if self.signed:
            return forward_value(x, q)
        # activations: the gradient stops above the largest level (official ``x_clip``)
        top = levels[:, -1].max().to(x.dtype)
        return forward_value(torch.minimum(x, top), q)

    def _quantize_fused(self, x: torch.Tensor, levels: torch.Tensor, sorted_codes: torch.Tensor) -> torch.Tensor:
        """:meth:`_quantize` with the fused nearest-level kernel (the QEM step stays in torch)."""
        train = self.training or self.observing
        top = None if self.signed else levels[:, -1].max().to(x.dtype)
        out, idx = _fused.fused_lq(x, levels, top, self.signed, want_idx=train)
        if train:
            with torch.no_grad():
                groups = self.basis.shape[1]
                self._qem_step(x.detach().float().reshape(groups, -1), idx.reshape(groups, -1), sorted_codes)
        return out

    def _qem_step(self, rows: torch.Tensor, idx: torch.Tensor, sorted_codes: torch.Tensor) -> None:
        new = qem_basis(rows, idx, sorted_codes, self.basis, DELTA)
        self.update_basis(new)

    def update_basis(self, new: torch.Tensor) -> None:
        """TF 1's ``assign_moving_average(basis, new, momentum)`` (``zero_debias=True``), its
        float32 operations in its order (``_zero_debias``): ``biased -= (biased - new) * d``
        with ``d = 1 - momentum``, ``t += 1``, then
        ``basis -= basis - biased / (1 - (1 - d)^t)``."""
        d = 1.0 - self.momentum  # TF's ``decay`` inside assign_moving_average
        self.biased.sub_((self.biased - new) * d)
        self.local_step.add_(1)
        t = self.local_step.to(torch.float32)
        unbiased = self.biased / (1.0 - torch.pow(torch.full_like(t, 1.0 - d), t))
        self.basis.sub_(self.basis - unbiased)


class LQNetOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    first_last: Literal["fp", "8bit", "same"] = "fp"
    ternary: bool = Field(False, description="2-bit quantizers take 3 levels (ter)")


class LQNet(Method):
    name = "lqnet"
    paper = Paper(
        title="LQ-Nets: Learned Quantization for Highly Accurate and Compact Deep Neural Networks",
        authors="Zhang, Yang, Ye, Hua",
        venue="ECCV",
        year=2018,
        url="https://arxiv.org/abs/1807.10029",
        code="https://github.com/microsoft/LQ-Nets",
    )
    comment = (
        "ridge on the activations' QEM too; QEM also on calibration batches; "
        "fine-tuned from the FP32 baseline; ternary = one basis, codes {-1,0,1}/{0,1,2}"
    )
    #: 2: TF's zero-debiased moving average of the basis (the official
    #: ``assign_moving_average``), one activation basis for conv1 and the shortcut
    version = 2
    weight_bits = (*range(1, 9), 32)
    act_bits = (*range(1, 9), 32)
    Options = LQNetOptions

    def prepare(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        ternary = self.options.ternary

        def make_weight(m: nn.Module, name: str, bits: int) -> LQQuantizer:
            out = m.weight.shape[0]
            area = m.weight[0, 0].numel() if m.weight.dim() > 2 else 1
            return LQQuantizer(bits, signed=True, groups=out, fan=area * out, ternary=ternary)

        def make_act(m: nn.Module, name: str, bits: int) -> LQQuantizer:
            return LQQuantizer(bits, signed=False, groups=1, ternary=ternary)

        model = quantize_model(
            model,
            make_weight,
            make_act,
            self.w_bits,
            self.a_bits,
            first_last=self.options.first_last,
        )
        share_block_inputs(model)
        return model


#: residual blocks whose ``conv1`` and ``downsample[0]`` both read the block's input
#: (torchvision's ResNet blocks, qbench's CIFAR ResNet block)
SHARED_INPUT_BLOCKS = ("BasicBlock", "Bottleneck")


def share_block_inputs(model: nn.Module) -> list[str]:
    """Give a residual block's projection shortcut the activation quantizer of its conv1.

    In torchvision's ``BasicBlock``/``Bottleneck`` and qbench's CIFAR ResNet block
    (option-B shortcut), ``conv1`` and ``downsample[0]`` (a 1x1 convolution) read the
    same tensor, the block's input; the official LQ-Nets ResNet quantizes that tensor once,
    with one basis, for both. After :func:`quantize_model` each has its own quantizer: this
    replaces the shortcut's by conv1's (the same module object, registered under both
    layers, so its state is saved under both names with the same values), and counts the
    readers so that the basis is updated once per forward pass. Returns the names of the
    blocks changed."""
    shared = []
    for name, block in list(model.named_modules()):
        if type(block).__name__ not in SHARED_INPUT_BLOCKS:
            continue
        conv1, down = getattr(block, "conv1", None), getattr(block, "downsample", None)
        if not (isinstance(conv1, QuantConv2d) and isinstance(down, nn.Sequential) and len(down) > 0):
            continue
        if not isinstance(down[0], QuantConv2d):
            continue
        a, b = conv1.act_quantizer, down[0].act_quantizer
        if not (isinstance(a, LQQuantizer) and isinstance(b, LQQuantizer)) or a is b:
            continue
        if (a.bits, a.ternary, a.signed) != (b.bits, b.ternary, b.signed):
            continue
        down[0].act_quantizer = a
        a.readers += 1
        shared.append(name)
    return shared
