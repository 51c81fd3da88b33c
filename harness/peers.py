"""Other libraries' QAT fake-quantizers on our layers, as a peer row for ``qbench bench``.

A peer is timed like a method: the same model, the same layers swapped for
:class:`~qbench.methods.modules.QuantConv2d`/``QuantLinear`` by
:func:`~qbench.methods.modules.quantize_model` with LSQ's layer policy (every conv/linear;
the first and last at 8 bits, or the rest's width where that is higher), the same bits;
only the quantizers are the peer library's. The library is optional: it is imported when
a peer row is built, never by ``qbench`` itself.

``torchao`` (pytorch/ao, ``torchao.quantization.qat.IntxFakeQuantizer``): its standard
QAT recipe (the one its ``QATConfig`` applies to Linear layers), dynamic ranges computed
from every tensor at every step, straight-through gradients, no learned parameters:

* weights: symmetric, per output channel, ``int<w>`` (a conv weight is viewed as
  ``(C_out, C_in*kh*kw)`` so that a channel is one row);
* activations (each layer's input): asymmetric, per token, ``int<a>``; a conv input's
  token is one pixel (its C channels: the NHWC view, free in channels_last), except in a
  one-channel image, whose token is a row (torchao cannot take tokens of one value).
"""

from __future__ import annotations

import importlib.util

import torch
from qbench.methods import Method, MethodContext, QbenchError
from qbench.methods.modules import Quantizer, quantize_model
from torch import nn

from .bench import PEERS


def require_peer(name: str) -> None:
    """A one-line QbenchError when the peer's library is not installed."""
    if name not in PEERS:
        raise QbenchError(f"unknown peer {name!r}; known: {', '.join(PEERS)}", "--peer")
    if importlib.util.find_spec(name) is None:
        raise QbenchError(f"{name} is not installed in this environment (it is optional: pip install {name})", "--peer")


class TorchaoFakeQuantizer(Quantizer):
    """torchao's ``IntxFakeQuantizer`` as a qbench :class:`Quantizer` (``role``: weight or act)."""

    def __init__(self, bits: int, role: str):
        super().__init__(bits)
        from torchao.quantization.qat import IntxFakeQuantizeConfig, IntxFakeQuantizer

        if not 1 <= bits <= 8:
            raise QbenchError(f"torchao fake-quantizes 1 to 8 bits, not {bits}", "--bits")
        dtype = getattr(torch, f"int{bits}")
        if role == "weight":
            config = IntxFakeQuantizeConfig(dtype, "per_channel", is_symmetric=True)
        else:
            config = IntxFakeQuantizeConfig(dtype, "per_token", is_symmetric=False)
        self.role = role
        self.fq = IntxFakeQuantizer(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.role == "weight":
            return self.fq(x.reshape(x.shape[0], -1)).reshape_as(x)
        if x.dim() == 4 and x.shape[1] > 1:  # tokens are pixels: quantize over channels
            return self.fq(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.fq(x)  # a linear layer's tokens; a one-channel image's: its rows

    def extra_repr(self) -> str:
        return f"bits={self.bits}, role={self.role}, torchao"


class TorchaoQAT(Method):
    """The torchao peer as a (never registered) method: prepare swaps the layers."""

    name = "torchao"

    def prepare(self, model: nn.Module, ctx: MethodContext | None = None) -> nn.Module:
        return quantize_model(
            model,
            lambda m, n, b: TorchaoFakeQuantizer(b, "weight"),
            lambda m, n, b: TorchaoFakeQuantizer(b, "act"),
            self.w_bits,
            self.a_bits,
            first_last="8bit",
        )

    def calibrate(self, model: nn.Module, ctx: MethodContext) -> None:
        """Nothing to calibrate: torchao's ranges are dynamic."""


def peer_method(name: str, w_bits: int, a_bits: int) -> Method:
    require_peer(name)
    return {"torchao": TorchaoQAT}[name](w_bits, a_bits)
