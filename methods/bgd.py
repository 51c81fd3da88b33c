r"""BGD: "And the Bit Goes Down" -- product quantization of a trained network, layer by layer.

Pierre Stock, Armand Joulin, Rémi Gribonval, Benjamin Graham, Hervé Jégou. "And the Bit
Goes Down: Revisiting the Quantization of Neural Networks", ICLR 2020.
https://arxiv.org/abs/1907.05686 -- official code: https://github.com/facebookresearch/kill-the-bits
(``src/quantize.py``, ``src/quantization/{pq,em,solver}.py``, ``src/optim/centroid_sgd.py``).

Every Conv2d/Linear but the first convolution is product-quantized (:mod:`.pq`): ``k = 2^b``
codewords for ``W<b>`` (256 at ``W8A32``; activations are not quantized), the classifier
with its own codebook size (``k_fc``, 2048 for ResNet-18 and 1024 for ResNet-50 in the
paper), each clamped to the largest power of two strictly below a quarter of the layer's
subvectors. Blocks: ``small`` regime 9 for 3x3 convolutions and 4 for 1x1; ``large`` 18
and 8 (the official ResNet-18 "large blocks" command keeps 4 for 1x1: ``block_pw: 4``);
4 for linear layers. The recipe, as ``quantize.py`` runs it:

1. Layers in the network's order; for each, the *input activations of the partially
   quantized network* (earlier layers already quantized) are gathered on ``n_activations``
   training images, and the layer is quantized by EM on the activation-weighted objective
   ``||A (W - W_hat)||^2`` (``em_iterations`` iterations, ``n_samples // C_out`` activation
   rows per iteration: 1,000 in ``layer1``/``layer2``, 25,000 in ``layer3``/``layer4``,
   5,000 for the classifier, as ``dynamic_sampling``; 1,000 for other names).
2. The layer's codewords are then fine-tuned alone (``layer_steps`` SGD steps, lr 0.05,
   momentum 0.9, weight decay 1e-4, the network in eval mode) by distillation: the KL
   divergence from the uncompressed teacher's softmax to the student's.
3. Finally all codewords are fine-tuned together by the same distillation (the harness's
   loop, stage ``finetune``, the cell's recipe: the paper's 9 epochs, SGD lr 0.01,
   momentum 0.9, weight decay 1e-4, step decay every 3 epochs); BatchNorm statistics move
   (training mode) but nothing else than the codewords is optimised.

The gradient of a codeword is the *mean* of the gradients of the subvectors assigned to it
(``CentroidSGD``'s reduction; PQF uses their sum), and weight decay applies to the
codeword. The stored model: codes and fp16 codewords (``finalize`` rounds them to fp16);
everything else at fp32 as the paper counts it (:func:`.pq.pq_footprint`).

``qbench evaluate --method bgd --format official`` imports the released compressed ResNets
(``state_dict_compressed.pth``: per layer ``centroids`` (k, d) fp16 and column-layout
``assignments``; the first convolution, BatchNorm scale/shift and classifier bias; no
BatchNorm statistics: running mean 0 and variance 1, as ``inference.py`` leaves them).

Deviations (also in :attr:`BGD.comment`): layer-wise fine-tuning counts steps over the
cell's training batches; activations are gathered from un-augmented training batches (the
official code reads its augmented training loader); the EM distances go through the Gram
matrix of the activations (exact, cheaper; see :mod:`.pq`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from typing import Any

import torch
from pydantic import Field
from torch import nn

from .base import MethodContext, Paper
from .errors import QbenchError
from .layers import first_last_layers
from .pq import (
    PQ_LAYERS,
    ActivationSampler,
    PQMethod,
    PQOptions,
    bgd_centroids,
    em_quantize,
    kl_distillation,
    plan_layers,
    pq_layers,
    rows_from_columns,
    subvectors,
)

PAPER = Paper(
    title="And the Bit Goes Down: Revisiting the Quantization of Neural Networks",
    authors="Stock, Joulin, Gribonval, Graham, Jégou",
    venue="ICLR",
    year=2020,
    url="https://arxiv.org/abs/1907.05686",
    code="https://github.com/facebookresearch/kill-the-bits",
)


class BGDOptions(PQOptions):
    #: EM iterations per layer (``--n-iter``)
    em_iterations: int = Field(default=100, ge=1)
    #: training images whose activations feed each layer's EM (``--n-activations``)
    n_activations: int = Field(default=1024, ge=1)
    #: activation rows per EM iteration before dividing by C_out; None: ``dynamic_sampling``
    n_samples: int | None = Field(default=None, ge=1)
    #: layer-wise codeword fine-tuning steps (``--finetune-centroids``)
    layer_steps: int = Field(default=2500, ge=0)
    layer_lr: float = Field(default=0.05, gt=0)
    layer_momentum: float = Field(default=0.9, ge=0)
    layer_weight_decay: float = Field(default=1e-4, ge=0)
    #: noise that splits a cluster to fill an empty one (``--eps``)
    eps: float = Field(default=1e-8, gt=0)


def dynamic_sampling(name: str, module: nn.Module) -> int:
    """BGD's ``dynamic_sampling``: activation rows sampled per EM iteration (before // C_out)."""
    if isinstance(module, nn.Linear):
        return 5000
    if "layer3" in name or "layer4" in name:
        return 25000
    return 1000


def mean_gradient(layer: nn.Module):
    """Make the codebook's gradient the mean over each codeword's subvectors (CentroidSGD);
    returns the hook's handle."""
    counts = layer.counts().clamp(min=1).to(layer.codebook.dtype)[:, None]
    return layer.codebook.register_hook(lambda g: g / counts.to(g.device))


def import_official(obj: Any, model: nn.Module, where: str | None) -> None:
    """Load a released BGD ``state_dict_compressed.pth`` into ``model`` (PQ layers from
    :meth:`BGD.prepare`; each is re-shaped to the file's codebook size and block size)."""
    if not isinstance(obj, dict):
        raise QbenchError("not a BGD compressed state dict (a dict of layer name -> entries)", where)
    used: set[str] = set()
    modules = dict(model.named_modules())

    def entry(name: str, keys: tuple[str, ...]) -> dict:
        e = obj.get(name)
        if not isinstance(e, dict) or not all(isinstance(e.get(k), torch.Tensor) for k in keys):
            raise QbenchError(f"the file has no entry {name!r} with {', '.join(keys)}", where)
        used.add(name)
        return e

    with torch.no_grad():
        for name, layer in pq_layers(model):
            e = entry(name, ("centroids", "assignments"))
            codes = rows_from_columns(e["assignments"].long(), layer.weight_shape[0])
            try:
                layer.set_codes(e["centroids"].float(), codes)
            except ValueError as err:
                raise QbenchError(f"{name}: {err}", where) from None
        for name, m in modules.items():
            if isinstance(m, nn.BatchNorm2d):
                e = entry(name, ("weight", "bias"))
                m.weight.copy_(e["weight"].float())
                m.bias.copy_(e["bias"].float())
                m.running_mean.zero_()
                m.running_var.fill_(1.0)
            elif isinstance(m, (nn.Conv2d, nn.Linear)) and not isinstance(m, PQ_LAYERS):
                e = entry(name, ("weight",))
                if e["weight"].shape != m.weight.shape:
                    raise QbenchError(
                        f"{name}.weight has shape {tuple(e['weight'].shape)}, expected {tuple(m.weight.shape)}", where
                    )
                m.weight.copy_(e["weight"].float())
        _, last = first_last_layers(model)
        head = modules[last]
        if getattr(head, "bias", None) is not None:
            e = entry("fc_bias", ("bias",))
            head.bias.copy_(e["bias"].float())
    unknown = sorted(set(obj) - used)
    if unknown:
        raise QbenchError(f"entries the model has no place for: {unknown[:4]}", where)


class BGD(PQMethod):
    name = "bgd"
    paper = PAPER
    status = "follows the official code"
    comment = (
        "layer-wise codeword fine-tuning counts steps over the cell's training batches; EM activations from "
        "un-augmented training batches; EM distances through the Gram matrix (exact)"
    )
    Options = BGDOptions
    needs_teacher = True

    def plan(self, model: nn.Module) -> dict[str, tuple[int, int]]:
        return plan_layers(model, 2**self.w_bits, self.options, lambda m, n, d, k: bgd_centroids(n, k))

    def calibrate(self, model: nn.Module, ctx: MethodContext) -> None:
        if not ctx.recipe.train:
            raise QbenchError("bgd quantizes layer by layer with distillation: it needs recipe.train: true")

    def param_groups(self, model: nn.Module, recipe) -> list[dict]:
        return [{"params": [m.codebook for _, m in pq_layers(model)], "weight_decay": recipe.weight_decay}]

    def import_checkpoint(self, obj: Any, model: nn.Module, where: str | None = None) -> None:
        import_official(obj, model, where)

    # -- training ---------------------------------------------------------------------------
    def _inputs(self, model: nn.Module, layer: nn.Module, ctx: MethodContext) -> torch.Tensor:
        """The layer's inputs on ``n_activations`` un-augmented training images."""
        got: list[torch.Tensor] = []

        def hook(mod, inp, out):
            got.append(inp[0].detach())

        h = layer.register_forward_hook(hook)
        seen = 0
        model.eval()
        try:
            with torch.no_grad():
                for x, _ in ctx.calib_batches():
                    model(x.to(ctx.device))
                    seen += x.shape[0]
                    if seen >= self.options.n_activations:
                        break
        finally:
            h.remove()
        if not got:
            raise QbenchError("bgd needs training images to quantize on (the dataset has no training split)")
        return torch.cat(got)[: self.options.n_activations].float()

    def _batches(self, ctx: MethodContext) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            empty = True
            for batch in ctx.train_batches():
                empty = False
                yield batch
            if empty:
                return

    def _finetune_layer(self, model: nn.Module, layer: nn.Module, ctx: MethodContext, step0: int) -> None:
        o = self.options
        if o.layer_steps <= 0:
            return
        handle = mean_gradient(layer)
        trainable = [p for p in model.parameters() if p.requires_grad]
        for p in trainable:
            p.requires_grad_(False)
        layer.codebook.requires_grad_(True)
        opt = torch.optim.SGD(
            [layer.codebook], lr=o.layer_lr, momentum=o.layer_momentum, weight_decay=o.layer_weight_decay
        )
        loss_fn = kl_distillation(ctx.teacher)
        model.eval()
        total = 0.0
        try:
            for _, (x, y) in zip(range(o.layer_steps), self._batches(ctx), strict=False):
                x = x.to(ctx.device)
                loss = loss_fn(model, x, y, model(x))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach())
        finally:
            handle.remove()
            layer.codebook.grad = None
            for p in trainable:
                p.requires_grad_(True)
        ctx.log({"bgd/layer_distill_loss": total / max(1, o.layer_steps)}, step=step0)

    def quantize_layers(self, model: nn.Module, ctx: MethodContext) -> None:
        """Steps 1 and 2, layer by layer in the network's order, resumable per layer
        (``ctx.save_state``); logs each layer's EM objective and seconds (step = layer index)."""
        o = self.options
        gen = torch.Generator().manual_seed(ctx.seed)
        state = ctx.load_state() or {"done": {}}
        for i, (name, layer) in enumerate(pq_layers(model)):
            if name in state["done"]:
                saved = state["done"][name]
                layer.set_codes(saved["codebook"], saved["codes"])
                continue
            t0 = time.perf_counter()
            sampler = ActivationSampler(self._inputs(model, layer, ctx), layer)
            w = subvectors(layer.source, layer.d)
            c_out = layer.weight_shape[0]
            n_blocks = w.shape[0] // c_out
            objective: list[float] = []
            codebook, codes = em_quantize(
                sampler,
                w,
                n_blocks,
                c_out,
                layer.k,
                o.em_iterations,
                o.n_samples or dynamic_sampling(name, layer),
                gen,
                o.eps,
                log=lambda it, obj, empty, out=objective: out.append(obj),
            )
            layer.set_codes(codebook, codes.reshape(c_out, n_blocks))
            _sync(ctx.device)
            t1 = time.perf_counter()
            self._finetune_layer(model, layer, ctx, i)
            _sync(ctx.device)
            ctx.log(
                {
                    "bgd/em_objective": objective[-1] if objective else math.nan,
                    "bgd/em_seconds": t1 - t0,
                    "bgd/layer_finetune_seconds": time.perf_counter() - t1,
                },
                step=i,
            )
            state["done"][name] = {"codebook": layer.codebook.detach().cpu(), "codes": layer.codes.cpu()}
            ctx.save_state(state)

    def train(self, model: nn.Module, ctx: MethodContext) -> bool:
        if ctx.teacher is None:
            raise QbenchError("bgd distils from the full-precision parent: the cell needs a full-precision baseline")
        self.quantize_layers(model, ctx)
        for _, layer in pq_layers(model):
            mean_gradient(layer)
        ctx.fit(
            model,
            stage="finetune",
            loss_fn=kl_distillation(ctx.teacher),
            param_groups=self.param_groups(model, ctx.recipe),
        )
        return True


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
