"""What a compressed model stores, checked on the real tensors.

* **Footprint**: integer codes at their bit-width, plus every full-precision scalar
  kept beside them (steps, levels, clipping values), biases, BatchNorm parameters and
  running statistics, and whole full-precision layers, at 32 bits. The compression
  ratio is against the same model with every float tensor at 32 bits.
* **Bit audit**: after ``finalize``, each quantized weight tensor must hold at most
  ``2^b`` distinct values per scale group; the audit counts them.
* **BOPs** (bit operations), as Bayesian Bits (van Baalen et al., NeurIPS 2020, sec. 4)
  counts them: for each conv/linear layer, ``MACs x b_w x b_a``; full-precision layers
  count at 32 x 32.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .modules import QUANT_LAYERS, Quantizer


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
    distinct_max: int | None = None  # most distinct weight values found in one scale group
    levels_allowed: int | None = None


@dataclass
class Footprint:
    total_bytes: float
    fp32_bytes: float
    bops: int
    audit_ok: bool
    layers: list[LayerFootprint] = field(default_factory=list)

    @property
    def compression_ratio(self) -> float:
        return self.fp32_bytes / self.total_bytes if self.total_bytes else float("inf")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["compression_ratio"] = self.compression_ratio
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
            bits = mod.weight.numel() * wb + 32 * (wq.scale_count() + aq.scale_count())
            distinct = allowed = None
            if wq.enabled:
                distinct, allowed = _distinct_max(wq, mod.weight), wq.max_levels()
                audit_ok &= distinct <= allowed
            own = [mod.weight] + list(wq.parameters()) + list(aq.parameters())
        elif isinstance(mod, (nn.Conv2d, nn.Linear)):
            wb = ab = 32
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
                bops=m * wb * ab,
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
