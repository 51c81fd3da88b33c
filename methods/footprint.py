"""What a compressed model stores, checked on the real tensors.

* **Footprint**: integer codes at their bit-width, plus every full-precision scalar
  kept beside them (steps, levels, clipping values), biases, BatchNorm parameters and
  running statistics, and whole full-precision layers, at 32 bits. The compression
  ratio is against the same model with every float tensor at 32 bits.
* **Bit audit**: after ``finalize``, each quantized weight tensor must hold at most
  ``2^b`` distinct values per scale group; the audit counts them (on the tensor the weight
  quantizer reads: a layer's ``weight_to_quantize()`` where it folds a BatchNorm in).
* **BOPs** (bit operations), as Bayesian Bits (van Baalen et al., NeurIPS 2020, sec. 4)
  counts them: for each conv/linear layer, ``MACs x b_w x b_a x kept``; full-precision
  layers count at 32 x 32. **Relative BOPs** are in percent of the same model at
  32 x 32 everywhere (``sum MACs x 32 x 32``), the figure the paper's plots and tables use.
  ``kept`` is the fraction of output channels a structured-pruning quantizer keeps (its
  optional ``keep_ratio()``, as the official code's ``prune_ratio``; 1 otherwise).
* **0 bits** means pruned: a tensor quantized to 0 bits stores nothing (no codes, no
  scales) and a layer with 0-bit weights or inputs costs 0 BOPs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

import torch
from torch import nn

from .modules import QUANT_LAYERS, Quantizer

#: a full-precision multiply-accumulate: 32-bit weight x 32-bit activation
FP32_BOPS_PER_MAC = 32 * 32


@dataclass
class LayerFootprint:
    name: str
    kind: str
    w_bits: int
    a_bits: int
    params: int
    bytes: float
    macs: int = 0
    bops: int = 0
    kept: float = 1.0  # fraction of output channels kept (structured pruning)
    distinct_max: int | None = None  # most distinct weight values found in one scale group
    levels_allowed: int | None = None


@dataclass
class Footprint:
    total_bytes: float
    fp32_bytes: float
    bops: int
    audit_ok: bool
    layers: list[LayerFootprint] = field(default_factory=list)
    #: MACs of the full-precision reference when it is not this model's layers (a method
    #: that rebuilds the model, e.g. Group-Net's K binary copies of each layer); None: the
    #: measured layers' MACs
    fp32_macs: int | None = None

    @property
    def compression_ratio(self) -> float:
        return self.fp32_bytes / self.total_bytes if self.total_bytes else float("inf")

    @property
    def fp32_bops(self) -> int:
        """BOPs of the full-precision reference: every conv/linear layer at 32 x 32."""
        macs = self.fp32_macs if self.fp32_macs is not None else sum(layer.macs for layer in self.layers)
        return macs * FP32_BOPS_PER_MAC

    def against(self, reference: Footprint) -> Footprint:
        """This footprint with ``reference`` (the full-precision model before a method rebuilt
        it) as the 32-bit size and BOPs it is compared with."""
        macs = sum(la.macs for la in reference.layers)
        return replace(self, fp32_bytes=reference.fp32_bytes, fp32_macs=macs or None)

    @property
    def rel_bops(self) -> float:
        """BOPs in percent of :attr:`fp32_bops` (NaN when no MACs were counted)."""
        ref = self.fp32_bops
        return 100.0 * self.bops / ref if ref else float("nan")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["compression_ratio"] = self.compression_ratio
        d["fp32_bops"] = self.fp32_bops
        d["rel_bops"] = self.rel_bops if self.fp32_bops else None  # JSON has no NaN
        return d


def count_macs(model: nn.Module, example: torch.Tensor) -> dict[str, int]:
    """Multiply-accumulates of every Conv2d/Linear for one input sample."""
    macs: dict[str, int] = {}
    hooks = []

    def hook(name):
        def fn(mod, inp, out):
            if isinstance(mod, nn.Conv2d):
                k = mod.kernel_size[0] * mod.kernel_size[1] * (mod.in_channels // mod.groups)
                macs[name] = int(out[0].numel() * k)
            else:
                macs[name] = int(out[0].numel() * mod.in_features)

        return fn

    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Conv2d, nn.Linear)):
            hooks.append(mod.register_forward_hook(hook(name)))
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example[:1])
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    return macs


def _distinct_max(quantizer: Quantizer, w: torch.Tensor) -> int:
    """The most distinct values the quantizer's output holds in one scale group, computed
    in eval mode (a quantizer's statistics never move while it is audited)."""
    was, observing = quantizer.training, quantizer.observing
    quantizer.eval()
    quantizer.observing = False
    try:
        with torch.no_grad():
            q = quantizer(w).detach().float()
    finally:
        quantizer.train(was)
        quantizer.observing = observing
    return max(int(torch.unique(g).numel()) for g in quantizer.groups(q))


def _quantizer_input(layer: nn.Module) -> torch.Tensor:
    """The tensor a layer's weight quantizer reads: its optional ``weight_to_quantize()``
    (a BatchNorm folded into the weight), else the weight."""
    fn = getattr(layer, "weight_to_quantize", None)
    if not callable(fn):
        return layer.weight
    with torch.no_grad():
        return fn()


def _keep_ratio(quantizer: Quantizer) -> float:
    """Fraction of output channels a quantizer keeps: 0 at 0 bits, its ``keep_ratio()``
    where it prunes channels, else 1."""
    if quantizer.bits == 0:
        return 0.0
    fn = getattr(quantizer, "keep_ratio", None)
    if not callable(fn):
        return 1.0
    kept = float(fn())
    if not 0.0 <= kept <= 1.0:
        raise ValueError(f"{type(quantizer).__name__}.keep_ratio() must be in [0, 1], got {kept}")
    return kept


def footprint(model: nn.Module, example: torch.Tensor | None = None) -> Footprint:
    """Measure ``model`` as it would be stored (call after ``finalize``)."""
    macs = count_macs(model, example) if example is not None else {}
    layers: list[LayerFootprint] = []
    counted: set[int] = set()
    total_bits = 0.0
    fp32_bits = 0.0
    audit_ok = True
    for name, mod in model.named_modules():
        if isinstance(mod, QUANT_LAYERS):
            wq, aq = mod.weight_quantizer, mod.act_quantizer
            wb = wq.bits if wq.enabled else 32
            ab = aq.bits if aq.enabled else 32
            kept = _keep_ratio(wq)  # channel pruning counts at 32 bits too
            # a pruned (0-bit) weight tensor stores neither codes nor scales
            w_scales = wq.scale_count() if wb else 0
            bits = mod.weight.numel() * wb * kept + 32 * (w_scales + aq.scale_count())
            distinct = allowed = None
            if wq.enabled:
                distinct, allowed = _distinct_max(wq, _quantizer_input(mod)), wq.max_levels()
                audit_ok &= distinct <= allowed
            own = [mod.weight] + list(wq.parameters()) + list(aq.parameters())
        elif isinstance(mod, (nn.Conv2d, nn.Linear)):
            wb = ab = 32
            kept = 1.0
            bits = mod.weight.numel() * 32
            distinct = allowed = None
            own = [mod.weight]
        else:
            continue
        if getattr(mod, "bias", None) is not None:
            bits += mod.bias.numel() * 32
            own.append(mod.bias)
        counted.update(id(t) for t in own)
        m = macs.get(name, 0)
        layers.append(
            LayerFootprint(
                name=name,
                kind=type(mod).__name__,
                w_bits=wb,
                a_bits=ab,
                params=mod.weight.numel(),
                bytes=bits / 8,
                macs=m,
                bops=round(m * wb * ab * kept),
                kept=kept,
                distinct_max=distinct,
                levels_allowed=allowed,
            )
        )
        total_bits += bits
    # everything else that is stored: BN parameters and statistics, other float tensors.
    # Quantizer tensors are counted above (scale_count) and do not exist in the FP32 model.
    # (ids of the live tensors: ``state_dict()`` would hand out detached copies.)
    quantizer_tensors = {
        id(t)
        for m in model.modules()
        if isinstance(m, Quantizer)
        for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False))
    }
    for t in list(model.parameters()) + list(model.buffers()):
        if not t.is_floating_point():
            continue
        fp32_bits += t.numel() * 32 if id(t) not in quantizer_tensors else 0
        if id(t) in counted or id(t) in quantizer_tensors:
            continue
        total_bits += t.numel() * 32
    return Footprint(
        total_bytes=total_bits / 8,
        fp32_bytes=fp32_bits / 8,
        bops=sum(layer.bops for layer in layers),
        audit_ok=bool(audit_ok),
        layers=layers,
    )
