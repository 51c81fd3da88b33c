"""Quantizer modules and the quantized Conv2d/Linear wrappers every method uses.

A :class:`Quantizer` turns a tensor into its fake-quantized value (same shape, same
dtype) and can report what it stores: the bit-width of its integer codes, how many
scale parameters it keeps, and the scale groups (per tensor, per output channel) the
bit audit counts distinct values in. A method builds quantizers; :func:`quantize_model`
swaps every Conv2d/Linear of a model for a :class:`QuantConv2d`/:class:`QuantLinear`
holding a weight quantizer and an input-activation quantizer.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


def set_fused(model: nn.Module, enabled: bool) -> nn.Module:
    """Choose the fused fake-quantizer kernels (``enabled``) or the reference functions
    for every quantizer of ``model``; returns the model."""
    for m in model.modules():
        if isinstance(m, Quantizer):
            m.fused = bool(enabled)
    return model


class Quantizer(nn.Module):
    """Base class. ``bits`` is the code width (32 means: pass through in full precision).

    Subclasses implement ``forward``; data-driven initialisation happens on the first
    call in training or calibration (``initialized`` buffer), as the papers do.

    The buffer is the persistent truth (it travels in checkpoints); a Python mirror of it
    lets the steady state skip the host read ``bool(buffer)`` would cost every step, so
    a training step has no device-to-host sync and, under ``torch.compile``, no graph
    break. The mirror is only trusted once True; loading a state dict re-reads it.
    """

    bits: int
    #: set by ``Method.calibrate``: statistics are gathered whatever the module's mode
    observing: bool = False
    #: use the fused kernels (methods/fused.py) on CUDA tensors; :func:`set_fused` sets it
    #: from the recipe's ``fused`` key. The CPU always takes the reference functions.
    fused: bool = True

    def __init__(self, bits: int):
        super().__init__()
        self.bits = int(bits)
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self._init_known = False

    def is_initialized(self) -> bool:
        """Whether the data-driven initialisation has happened (reads the buffer from the
        device only until it is True)."""
        if not self._init_known:
            self._init_known = bool(self.initialized)
        return self._init_known

    def mark_initialized(self) -> None:
        self.initialized.fill_(True)
        self._init_known = True

    def should_observe(self) -> bool:
        """True while calibrating, and on the first training batch if not yet initialised."""
        return self.observing or (self.training and not self.is_initialized())

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        # the loaded buffer is the truth again: read it now, once, so that the first step
        # after a resume does not read it (a host sync, and a graph break under compile)
        self._init_known = bool(self.initialized)

    @property
    def enabled(self) -> bool:
        return self.bits < 32

    def extra_repr(self) -> str:
        return f"bits={self.bits}"

    def scale_count(self) -> int:
        """Number of full-precision scalars stored beside the codes (steps, levels, alphas):
        the floating-point entries of this quantizer's state dict (non-persistent buffers,
        such as constant code tables, are not stored)."""
        return sum(
            t.numel()
            for name, t in self.state_dict().items()
            if t.is_floating_point() and name.rpartition(".")[2] != "initialized"
        )

    def max_levels(self) -> int:
        """The most distinct values a tensor may hold per scale group."""
        return 2**self.bits

    def groups(self, q: torch.Tensor) -> list[torch.Tensor]:
        """Split a quantized tensor into its scale groups (default: the whole tensor)."""
        return [q]


def per_channel_groups(q: torch.Tensor) -> list[torch.Tensor]:
    """Scale groups of a per-output-channel quantizer: one row per output channel."""
    return list(q.detach().reshape(q.shape[0], -1))


class Identity(Quantizer):
    """Full precision: no quantization (bits = 32)."""

    def __init__(self, bits: int = 32):
        super().__init__(32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def scale_count(self) -> int:
        return 0


class _QuantMixin:
    """Holds ``weight_quantizer`` and ``act_quantizer`` (applied to the layer's input)."""

    weight_quantizer: Quantizer
    act_quantizer: Quantizer

    def quantized_weight(self) -> torch.Tensor:
        return self.weight_quantizer(self.weight)

    @property
    def w_bits(self) -> int:
        return self.weight_quantizer.bits

    @property
    def a_bits(self) -> int:
        return self.act_quantizer.bits


class QuantConv2d(_QuantMixin, nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.act_quantizer(x), self.quantized_weight(), self.bias)


class QuantLinear(_QuantMixin, nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.act_quantizer(x), self.quantized_weight(), self.bias)


QUANT_LAYERS = (QuantConv2d, QuantLinear)


def _wrap(module: nn.Module, wq: Quantizer, aq: Quantizer) -> nn.Module:
    if isinstance(module, nn.Conv2d):
        new = QuantConv2d.__new__(QuantConv2d)
    elif isinstance(module, nn.Linear):
        new = QuantLinear.__new__(QuantLinear)
    else:  # pragma: no cover - guarded by the caller
        raise TypeError(type(module))
    new.__dict__.update(module.__dict__)  # shares parameters, buffers and hooks
    new._modules = dict(module._modules)
    new.weight_quantizer = wq
    new.act_quantizer = aq
    return new


FIRST_LAST_POLICIES = ("fp", "8bit", "same", "fp_weights")


def quantize_model(
    model: nn.Module,
    make_weight: Callable[[nn.Module, str, int], Quantizer],
    make_act: Callable[[nn.Module, str, int], Quantizer],
    w_bits: int,
    a_bits: int,
    first_last: str = "8bit",
    first_last_names: tuple[str, str] | None = None,
    skip: Callable[[str, nn.Module], bool] | None = None,
) -> nn.Module:
    """Swap every Conv2d/Linear of ``model`` (in place) for a quantized wrapper.

    ``make_weight(module, name, bits)`` and ``make_act(module, name, bits)`` build the
    quantizers; a bit-width of 32 gets :class:`Identity`. ``first_last`` is the policy
    for the first and last layers: ``"fp"`` keeps them in full precision, ``"8bit"``
    quantizes them at 8 bits (LSQ, and most papers since), ``"same"`` treats them like the
    rest, ``"fp_weights"`` keeps both layers' weights and the first layer's input (the
    image) in full precision but quantizes the last layer's input like every other
    activation (DoReFa-Net's official code). ``skip(name, module)`` leaves a layer
    untouched (full precision), as does a model's ``qbench_quantize_only`` for every layer
    outside the part it names (:func:`~qbench.methods.layers.quantizable`).
    """
    if first_last not in FIRST_LAST_POLICIES:
        raise ValueError(f"first_last must be one of {FIRST_LAST_POLICIES}, got {first_last!r}")
    from .layers import first_last_layers, quantizable

    first, last = first_last_names or first_last_layers(model)
    ends = {first, last}
    targets = [
        (n, m)
        for n, m in model.named_modules()
        if isinstance(m, (nn.Conv2d, nn.Linear)) and not isinstance(m, QUANT_LAYERS) and quantizable(model, n)
    ]
    for name, module in targets:
        if skip is not None and skip(name, module):
            continue
        wb, ab = w_bits, a_bits
        if name in ends:
            if first_last == "fp":
                continue
            if first_last == "8bit":
                # 8 bits, or the rest's precision where that is higher (W16, FP activations)
                wb, ab = max(8, w_bits), max(8, a_bits)
            elif first_last == "fp_weights":
                wb = 32
                if name == first:
                    ab = 32
        if wb >= 32 and ab >= 32:
            continue  # nothing to quantize: the layer stays a plain full-precision layer
        wq = make_weight(module, name, wb) if wb < 32 else Identity()
        aq = make_act(module, name, ab) if ab < 32 else Identity()
        set_submodule(model, name, _wrap(module, wq, aq))
    return model


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` at the dotted ``name`` of ``model`` (``features.3``, ``layer1.0.conv1``)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def quant_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QUANT_LAYERS)]
