r"""PQF: Permute, Quantize, and Fine-tune.

Julieta Martinez, Jashan Shewakramani, Ting Wei Liu, Ioan Andrei Bârsan, Wenyuan Zeng,
Raquel Urtasun. "Permute, Quantize, and Fine-tune: Efficient Compression of Neural
Networks", CVPR 2021. https://arxiv.org/abs/2010.15703 -- official code:
https://github.com/uber-research/permute-quantize-finetune (``src/permutation/``,
``src/compression/``, ``src/compressed_layers/``, ``config/train_resnet{18,50}.yaml``).

1. **Permute** (:mod:`.permute`): groups of layers sharing channels (a producer's output
   channels, the BatchNorm after it, the consumers' input channels) are found by tracing
   the network; for each group the input-channel permutation of its first optimizable
   consumer that minimises the determinant of the covariance of its subvectors is found
   (greedy bucketing, then ``sls_iterations`` random swaps of stochastic local search) and
   applied to the whole group, leaving the network's function unchanged.
2. **Quantize**: every Conv2d/Linear but the first convolution is product-quantized
   (:mod:`.pq`; blocks as :mod:`.bgd`: 9/4 "small", 18/8 "large", 4 for linear layers) by
   k-means on its weights alone (``kmeans: src``, the annealed k-means the configs use,
   ``kmeans_iterations`` 10), ``k = 2^b`` codewords at ``W<b>`` (256 at ``W8A32``), the
   classifier with ``k_fc`` (2048 ResNet-18, 1024 ResNet-50), clamped to the largest power
   of two at or below a quarter of the layer's subvectors.
3. **Fine-tune** end to end with the harness's loop: every parameter (codewords, BatchNorm,
   the first convolution, biases) with the task's cross-entropy, as the official
   ``train_resnet.py`` does (Adam, lr 1e-3, cosine decay, 9 epochs: set in the suite's
   recipe); the codeword's gradient is the sum over its subvectors (autograd).
   ``distill: true`` uses BGD's distillation from the uncompressed teacher instead (the
   paper's text mentions fine-tuning "with the teacher"; the released configs do not).

Size as the project counts it (``compute_model_nbits``: codes at ``log2 k`` bits, fp16
codebooks, BatchNorm as two fp32 vectors, everything else at its dtype): :func:`.pq.pq_footprint`.

``qbench evaluate --method pqf --format official`` imports the released models
(``<layer>.codes_matrix`` and ``<layer>.codebook`` per compressed layer in row layout,
other tensors plain, BatchNorm folded into scale and shift: running mean 0 and variance 1,
as the official ``load_state_dict`` sets them).

Deviations (also in :attr:`PQF.comment`): permutation groups are derived by tracing
instead of the hand-written YAML lists (identical for ResNet-18/50); the random number
streams differ from the official code's.
"""

from __future__ import annotations

import time
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from .base import MethodContext, Paper
from .errors import QbenchError
from .pq import (
    PQMethod,
    PQOptions,
    kl_distillation,
    kmeans,
    plan_layers,
    pq_layers,
    pqf_centroids,
    subvectors,
)

PAPER = Paper(
    title="Permute, Quantize, and Fine-tune: Efficient Compression of Neural Networks",
    authors="Martinez, Shewakramani, Liu, Bârsan, Zeng, Urtasun",
    venue="CVPR",
    year=2021,
    url="https://arxiv.org/abs/2010.15703",
    code="https://github.com/uber-research/permute-quantize-finetune",
)


class PQFOptions(PQOptions):
    #: "src": annealed k-means (stochastic relaxation, the configs' choice); "kmeans": plain
    kmeans: Literal["src", "kmeans"] = "src"
    kmeans_iterations: int = Field(default=10, ge=1)
    #: permute before quantizing (``use_permutations``)
    permute: bool = True
    #: stochastic-local-search swaps per permutation group
    sls_iterations: int = Field(default=10_000, ge=0)
    #: fine-tune by distillation from the uncompressed teacher instead of cross-entropy
    distill: bool = False


def import_official(obj: Any, model: nn.Module, where: str | None) -> None:
    """Load a released PQF compressed state dict into ``model`` (PQ layers from
    :meth:`PQF.prepare`, re-shaped to the file's codebooks)."""
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise QbenchError("not a PQF compressed state dict (tensor name -> tensor)", where)
    used: set[str] = set()
    with torch.no_grad():
        for name, layer in pq_layers(model):
            cm, cb = f"{name}.codes_matrix", f"{name}.codebook"
            if cm not in obj or cb not in obj:
                raise QbenchError(f"the file has no {cm} / {cb}", where)
            try:
                layer.set_codes(obj[cb].float(), obj[cm].long())
            except ValueError as err:
                raise QbenchError(f"{name}: {err}", where) from None
            used.update((cm, cb))
        own = model.state_dict()
        plain = {k: v for k, v in obj.items() if k not in used}
        unknown = sorted(k for k in plain if k not in own)
        if unknown:
            raise QbenchError(f"tensors the model has no place for: {unknown[:4]}", where)
        for k, v in plain.items():
            if own[k].shape != v.shape:
                raise QbenchError(f"{k} has shape {tuple(v.shape)}, expected {tuple(own[k].shape)}", where)
        pq_keys = {f"{n}.{s}" for n, _ in pq_layers(model) for s in ("codebook", "codes", "compressed")}
        bn_only = ("running_mean", "running_var", "num_batches_tracked")
        missing = [k for k in own if k not in plain and k not in pq_keys and not k.endswith(bn_only)]
        if missing:
            raise QbenchError(f"the file lacks {missing[:4]}", where)
        model.load_state_dict(plain, strict=False)
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.zero_()
                m.running_var.fill_(1.0)


class PQF(PQMethod):
    name = "pqf"
    paper = PAPER
    status = "follows the official code"
    comment = "permutation groups traced from the network (the official configs list them by hand)"
    Options = PQFOptions
    needs_teacher = True

    def plan(self, model: nn.Module) -> dict[str, tuple[int, int]]:
        def rule(m: nn.Module, n_vectors: int, d: int, k: int) -> int:
            c_out = m.weight.shape[0]
            return pqf_centroids(n_vectors // c_out, c_out, k)

        return plan_layers(model, 2**self.w_bits, self.options, rule)

    def calibrate(self, model: nn.Module, ctx: MethodContext) -> None:
        """Permute (needs one example batch), then k-means every PQ layer; logs the
        permutation's and each layer's k-means seconds and error."""
        o = self.options
        layers = pq_layers(model)
        if o.permute:
            example = next(iter(ctx.calib_batches()), None)
            if example is not None:
                t0 = time.perf_counter()
                self._permute(model, example[0][:1].to(ctx.device), ctx)
                ctx.log({"pqf/permute_seconds": time.perf_counter() - t0})
        gen = torch.Generator().manual_seed(ctx.seed)
        with torch.no_grad():
            for i, (_, layer) in enumerate(layers):
                t0 = time.perf_counter()
                x = subvectors(layer.source, layer.d)
                codebook, codes = kmeans(x, layer.k, o.kmeans_iterations, gen, annealed=o.kmeans == "src")
                layer.set_codes(codebook, codes.reshape(layer.weight_shape[0], -1))
                err = float((codebook[codes] - x).pow(2).sum() / layer.weight_shape[0])
                ctx.log({"pqf/kmeans_error": err, "pqf/kmeans_seconds": time.perf_counter() - t0}, step=i)

    def _permute(self, model: nn.Module, example: torch.Tensor, ctx: MethodContext) -> None:
        from .permute import permutation_groups, permute_model

        sizes = {name: layer.d for name, layer in pq_layers(model)}
        groups = permutation_groups(model, example)
        records = permute_model(
            model,
            groups,
            lambda name, module: sizes.get(name),
            sls_iterations=self.options.sls_iterations,
            seed=ctx.seed,
        )
        ctx.log({"pqf/permutation_groups": float(len(records))})

    def train(self, model: nn.Module, ctx: MethodContext) -> bool:
        if not self.options.distill:
            return False
        if ctx.teacher is None:
            raise QbenchError("pqf with distill: true needs a full-precision baseline to distil from")
        ctx.fit(model, stage="train", loss_fn=kl_distillation(ctx.teacher))
        return True

    def param_groups(self, model: nn.Module, recipe) -> list[dict]:
        """Every parameter, no weight decay (the official Adam has none)."""
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": 0.0}]

    def import_checkpoint(self, obj: Any, model: nn.Module, where: str | None = None) -> None:
        import_official(obj, model, where)
