r"""XNOR-Net and XNOR-Net++: binary weights and binary activations.

Rastegari, Ordonez, Redmon, Farhadi. "XNOR-Net: ImageNet Classification Using Binary
Convolutional Neural Networks", ECCV 2016. https://arxiv.org/abs/1603.05279
Bulat, Tzimiropoulos. "XNOR-Net++: Improved Binary Neural Networks", BMVC 2019.
https://arxiv.org/abs/1909.13863
The dashboard rows are the EasyQuantization framework's (blueardour/model-quantization).

**xnor** (XNOR-Net, sec. 3.2), for every binary conv/linear layer:

.. math::
    I * W \approx (\mathrm{sign}(I) \circledast \mathrm{sign}(W)) \odot K\alpha, \quad
    \alpha_o = \tfrac{1}{n}\lVert W_o\rVert_{\ell 1}, \quad
    K = \Big(\tfrac{1}{c}\textstyle\sum_c |I_c|\Big) * k, \ k = \tfrac{1}{wh}\mathbf{1}_{w \times h}

* weights: :math:`\alpha_o\,\mathrm{sign}(W_o)`, one alpha per output channel;
* activations: sign(x) on each binary layer's input; K (the paper's input scale) only
  with ``act_scale=True``; the dashboard's rows binarise without it (the default);
* ``sign(0) = +1``; gradient rules in :mod:`qbench.methods.binary`.

**xnorpp** (XNOR-Net++, sec. 3): the weight and activation scales are fused into one
factor :math:`\Gamma` learned by back-propagation, the inputs and weights are plain signs:

.. math::
    I * W \approx (\mathrm{sign}(I) \circledast \mathrm{sign}(W)) \odot \Gamma

with the shapes of ``scale``: ``"channel"`` :math:`\Gamma = \alpha \in R^{o}`;
``"full"`` :math:`\Gamma \in R^{o \times h_{out} \times w_{out}}`; ``"factorised"``
:math:`\Gamma = \alpha \otimes \beta \otimes \gamma`, :math:`\alpha \in R^o, \beta \in R^{h_{out}},
\gamma \in R^{w_{out}}`. alpha multiplies the weights (the same function, since a conv is
linear in each output channel's filter), so the bit audit sees :math:`\pm\alpha_o` per output
channel; the spatial factors multiply the layer's output before its bias.

Layers: the first and last layers stay in full precision (both papers; ``first_last="fp"``).
Both methods drop every ``nn.ReLU`` of the model when the activations are binary
(``no_relu=True``, the dashboard's ``No-ReLU``: sign of a ReLU output is always +1), so a
model's conv -> BN -> ReLU -> conv becomes conv -> BN -> sign -> conv, the paper's block
order BN -> BinActiv -> BinConv (a max-pool between them commutes with sign).

Options (both methods; dashboard keywords in brackets):

* ``fm_grad`` [``fm_triangle`` / ``fm_STE``]: sign's gradient on activations: "triangle"
  :math:`\max(0, 2-2|x|)` (xnor's default, the 52.0 row), "STE" :math:`1_{|x|\le 1}` (the
  paper's; xnorpp's default) or "pass" (identity);
* ``wt_grad`` [``wt_pass``]: the weight gradient: "pass" (identity, the default), "STE"
  (:math:`1_{|W|\le 1}`), or "paper" (xnor only: XNOR-Net's
  :math:`1/n + \alpha 1_{|W|\le 1}`);
* ``no_relu`` [``No-ReLU``]: replace the model's ReLU modules by identities (default True);
* ``act_scale`` (xnor only): the paper's activation scale K (default False, as the rows);
* ``scale`` (xnorpp only): the shape of Gamma, "factorised" (default), "channel", "full";
* ``first_last``: "fp" (default, the papers) or "same" (binarise them too).

Footprint: 1 bit per binary weight plus its real scales (xnor: one alpha per output
channel; xnorpp: every element of alpha, beta, gamma or Gamma); BOPs = MACs x 1 x 1.

Deviations: training starts from the full-precision baseline (the papers train from
scratch); K is computed with zero padding and averaged over all input channels (grouped
convolutions included); the block's shortcut type (the dashboard's ``cbsa`` order,
real-valued or downsampling shortcuts) is the model's, not an option of the method;
XNOR-Net++'s initial Gamma is qbench's choice: alpha = mean|W| per output channel (so the
first step equals XNOR-Net's weight scaling), beta = gamma = 1, full Gamma = alpha broadcast.
The official EasyQuantization code was not readable from this machine: the meaning of
``wt_pass`` (identity weight gradient) and of ``fm_triangle`` (Bi-Real's ApproxSign
derivative) is inferred from the keywords.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from .base import Method, MethodContext, Paper
from .binary import (
    BinaryQuantizer,
    SignActivation,
    SignGrad,
    SignWeight,
    binarize_layers,
    binary_sign,
    drop_relus,
    sign_grad,
    surrogate,
)
from .modules import per_channel_groups, quantize_model

XNOR_NET = Paper(
    title="XNOR-Net: ImageNet Classification Using Binary Convolutional Neural Networks",
    authors="Rastegari, Ordonez, Redmon, Farhadi",
    venue="ECCV",
    year=2016,
    url="https://arxiv.org/abs/1603.05279",
    code="https://github.com/blueardour/model-quantization",
)

XNOR_NET_PP = Paper(
    title="XNOR-Net++: Improved Binary Neural Networks",
    authors="Bulat, Tzimiropoulos",
    venue="BMVC",
    year=2019,
    url="https://arxiv.org/abs/1909.13863",
    code="https://github.com/blueardour/model-quantization",
)

GammaShape = Literal["channel", "full", "factorised"]


class LearnedSignWeight(BinaryQuantizer):
    r"""XNOR-Net++'s binary weights with a learned scale: ``alpha_o * sign(W_o)`` ("channel",
    "factorised") or ``sign(W)`` ("full"), plus the spatial part of Gamma that multiplies the
    layer's output (:meth:`output_scale`): ``beta (x) gamma`` ("factorised") or the whole
    ``Gamma[o, h, w]`` ("full"). The spatial factors take their shape from the first output
    they see (or from a loaded state dict): the Parameter objects stay the same, only their
    data is filled in, so an optimizer built before that still holds them."""

    def __init__(self, channels: int, scale: GammaShape = "factorised", grad: str = "pass"):
        super().__init__()
        if scale not in ("channel", "full", "factorised"):
            raise ValueError(f"scale must be 'channel', 'full' or 'factorised', got {scale!r}")
        if grad not in ("pass", "STE"):
            raise ValueError(f"xnorpp's weight gradient rule must be 'pass' or 'STE', got {grad!r}")
        self.scale, self.grad = scale, grad
        self.channels = int(channels)
        if scale != "full":
            self.alpha = nn.Parameter(torch.ones(channels))
        if scale == "factorised":
            self.beta = nn.Parameter(torch.ones(0))
            self.gamma = nn.Parameter(torch.ones(0))
        elif scale == "full":
            self.gamma_full = nn.Parameter(torch.ones(0))

    @torch.no_grad()
    def init_from(self, w: torch.Tensor) -> None:
        """alpha = mean |W| per output channel (XNOR-Net's value) as the starting point."""
        a = w.detach().abs().reshape(w.shape[0], -1).mean(1).float()
        if self.scale != "full":
            self.alpha.copy_(a)
        self._alpha0 = a  # the full Gamma starts at alpha broadcast once its shape is known

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        b = surrogate(w, binary_sign(w), sign_grad(w, self.grad))
        if self.scale == "full":
            return b
        return self.alpha.to(w.dtype).view(-1, *([1] * (w.dim() - 1))) * b

    def _materialize(self, h: int, w: int, device: torch.device) -> None:
        with torch.no_grad():
            if self.scale == "factorised":
                self.beta.data = torch.ones(h, device=device)
                self.gamma.data = torch.ones(w, device=device)
            else:
                a0 = getattr(self, "_alpha0", torch.ones(self.channels)).to(device)
                self.gamma_full.data = a0.view(-1, 1, 1).expand(-1, h, w).clone()

    def output_scale(self, out: torch.Tensor) -> torch.Tensor | None:
        """The spatial factor of Gamma for a conv output [N, o, h, w] (None for "channel" or a
        Linear layer's output)."""
        if self.scale == "channel" or out.dim() != 4:
            return None
        first = self.beta if self.scale == "factorised" else self.gamma_full
        if first.numel() == 0:
            self._materialize(out.shape[2], out.shape[3], out.device)
        if self.scale == "factorised":
            return (self.beta.view(1, 1, -1, 1) * self.gamma.view(1, 1, 1, -1)).to(out.dtype)
        return self.gamma_full.unsqueeze(0).to(out.dtype)

    def groups(self, q: torch.Tensor) -> list[torch.Tensor]:
        return per_channel_groups(q) if self.scale != "full" else [q]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # an unmaterialised spatial factor takes the checkpoint's shape
        for name in ("beta", "gamma", "gamma_full"):
            p = getattr(self, name, None)
            t = state_dict.get(prefix + name)
            if isinstance(p, nn.Parameter) and p.numel() == 0 and t is not None:
                p.data = torch.empty_like(t, device=p.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"bits=1, scale={self.scale}, grad={self.grad}"


class XnorOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    fm_grad: SignGrad = "triangle"
    wt_grad: Literal["pass", "STE", "paper"] = "pass"
    no_relu: bool = True
    act_scale: bool = False
    first_last: Literal["fp", "same"] = "fp"


class XnorPPOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    fm_grad: SignGrad = "STE"
    wt_grad: Literal["pass", "STE"] = "pass"
    no_relu: bool = True
    scale: GammaShape = "factorised"
    first_last: Literal["fp", "same"] = "fp"


class _Binary(Method):
    """Shared prepare: binarise every conv/linear but the first and last, drop the ReLUs."""

    weight_bits = (1,)
    act_bits = (1, 32)  # 32: binary weights only (the paper's Binary-Weight-Networks)

    def _weight_quantizer(self, module: nn.Module) -> BinaryQuantizer:
        raise NotImplementedError

    def _binarize(self, model: nn.Module, input_scale: bool) -> nn.Module:
        opts = self.options
        if opts.no_relu and self.a_bits == 1:
            drop_relus(model)
        model = quantize_model(
            model,
            lambda m, n, b: self._weight_quantizer(m),
            lambda m, n, b: SignActivation(opts.fm_grad),
            self.w_bits,
            self.a_bits,
            first_last=opts.first_last,
        )
        return binarize_layers(model, input_scale=input_scale)


class Xnor(_Binary):
    name = "xnor"
    paper = XNOR_NET
    comment = (
        "sign activations without the paper's K by default (as the dashboard rows); ReLUs dropped; "
        "fine-tuned from the FP32 baseline"
    )
    status = "experimental"
    version = 1
    Options = XnorOptions

    def _weight_quantizer(self, module: nn.Module) -> BinaryQuantizer:
        return SignWeight(module.weight.shape[0], "channel", self.options.wt_grad)

    def prepare(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        return self._binarize(model, input_scale=self.options.act_scale)


class XnorPP(_Binary):
    name = "xnorpp"
    paper = XNOR_NET_PP
    comment = (
        "Gamma initialised at mean|W| per channel (spatial factors at 1); ReLUs dropped; "
        "fine-tuned from the FP32 baseline"
    )
    status = "experimental"
    version = 1
    Options = XnorPPOptions

    def _weight_quantizer(self, module: nn.Module) -> BinaryQuantizer:
        q = LearnedSignWeight(module.weight.shape[0], self.options.scale, self.options.wt_grad)
        q.init_from(module.weight)
        return q.to(module.weight.device)

    def prepare(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        model = self._binarize(model, input_scale=False)
        self._materialize(model, ctx)
        return model

    @staticmethod
    def _materialize(model: nn.Module, ctx: MethodContext) -> None:
        """Give the spatial factors their shapes now (before any optimizer or DDP wrapper
        sees them) from one calibration example; without one they take it on the first
        forward pass."""
        if not any(isinstance(q, LearnedSignWeight) and q.scale != "channel" for q in model.modules()):
            return
        batch = next(iter(ctx.calib_batches()), None)
        if batch is None:
            return
        was = model.training
        model.eval()
        try:
            with torch.no_grad():
                device = next(model.parameters()).device
                model(batch[0][:1].to(device))
        finally:
            model.train(was)
