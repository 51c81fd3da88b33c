"""The one training/evaluation loop every method uses.

SGD (momentum, Nesterov), Adam and AdamW; cosine (with linear warm-up), step, one-cycle
and constant schedules stepped per iteration; weight decay on conv/linear weights only by
default (none on BatchNorm, biases and quantizer parameters such as step sizes and
clipping levels), or on everything; bf16 autocast and channels_last on CUDA; optional
torch.compile; deterministic seeding. Methods plug in through ``extra_loss``,
``param_groups`` and ``on_step``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from qbench.methods.recipe import Recipe
from torch import nn


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def default_param_groups(model: nn.Module, weight_decay: float, wd_on: str) -> list[dict]:
    """Decay conv/linear weights only (``wd_on='weights'``) or every parameter (``'all'``)."""
    from qbench.methods.modules import Quantizer

    quant_params = {id(p) for m in model.modules() if isinstance(m, Quantizer) for p in m.parameters()}
    decay, no_decay = [], []
    for m in model.modules():
        for name, p in m.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            is_weight = isinstance(m, (nn.Conv2d, nn.Linear)) and name == "weight"
            if wd_on == "all" or (is_weight and id(p) not in quant_params):
                decay.append(p)
            else:
                no_decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def make_optimizer(groups: list[dict], r: Recipe) -> torch.optim.Optimizer:
    if r.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=r.lr, momentum=r.momentum, nesterov=r.nesterov and r.momentum > 0)
    if r.optimizer == "adam":
        return torch.optim.Adam(groups, lr=r.lr)
    return torch.optim.AdamW(groups, lr=r.lr)


def make_scheduler(opt: torch.optim.Optimizer, r: Recipe, steps_per_epoch: int):
    total = max(1, r.epochs * steps_per_epoch)
    warm = r.warmup_epochs * steps_per_epoch
    if r.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[g["lr"] for g in opt.param_groups], total_steps=total)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if r.schedule == "cosine":
            t = (step - warm) / max(1, total - warm)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
        if r.schedule == "step":
            epoch = step // steps_per_epoch
            return r.gamma ** sum(epoch >= m for m in r.milestones)
        if r.schedule == "hold_linear":
            return hold_linear(step // steps_per_epoch, r.epochs)
        return 1.0

    def constant(step: int) -> float:
        return 1.0

    # a group marked ``scheduled: False`` keeps its learning rate (e.g. Bayesian Bits' gates)
    return torch.optim.lr_scheduler.LambdaLR(
        opt, [factor if g.get("scheduled", True) else constant for g in opt.param_groups]
    )


def hold_linear(epoch: int, epochs: int) -> float:
    """The learning-rate factor of epoch ``epoch`` (0-based) under ``schedule: hold_linear``:
    1 for the first ``int(2/3 epochs)`` epochs and the one after, then linear to 0 at
    ``epochs`` (Bayesian Bits' MNIST/CIFAR-10 schedule, ``make_lr_scheduler``, stepped per
    epoch)."""
    hold = int((2.0 / 3.0) * epochs)
    if epoch <= hold:
        return 1.0
    return (epochs - epoch) / (epochs - hold)


@dataclass
class EvalResult:
    top1: float
    top5: float
    loss: float
    n: int

    def as_dict(self) -> dict[str, float]:
        return {"top1": self.top1, "top5": self.top5, "loss": self.loss, "n_images": float(self.n)}


def autocast(device: torch.device, enabled: bool):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled and device.type == "cuda")


def uses_cudagraphs(r: Recipe, device: torch.device) -> bool:
    """Whether the recipe's compiled model replays CUDA graphs (``compile`` and
    ``cudagraphs`` on CUDA): each step or batch then starts with
    ``torch.compiler.cudagraph_mark_step_begin()``, which tells the graphs that the previous
    replay's outputs are done with (they were read before the next call)."""
    return r.compile and r.cudagraphs and device.type == "cuda"


@torch.no_grad()
def evaluate(model: nn.Module, split, r: Recipe, device: torch.device) -> EvalResult:
    from .determinism import deterministic_cpu

    model.eval()
    correct1 = torch.zeros((), device=device)
    correct5 = torch.zeros((), device=device)
    loss = torch.zeros((), device=device, dtype=torch.float64)
    n = 0
    cl = r.channels_last and device.type == "cuda"
    graphs = uses_cudagraphs(r, device)
    for x, y in split.batches(r.eval_batch_size, train=False, device=device, channels_last=cl):
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        # on the CPU: the same logits whatever the thread count, backend or load
        with autocast(device, r.amp), deterministic_cpu(enabled=device.type == "cpu"):
            out = model(x)
        out = out.float()
        loss += F.cross_entropy(out, y, reduction="sum").double()
        top = out.topk(min(5, out.shape[1]), dim=1).indices
        correct1 += (top[:, 0] == y).sum()
        correct5 += (top == y[:, None]).any(dim=1).sum()
        n += y.shape[0]
    return EvalResult(100.0 * correct1.item() / n, 100.0 * correct5.item() / n, loss.item() / n, n)


class NonFiniteLoss(RuntimeError):
    pass


LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def make_train_step(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    r: Recipe,
    device: torch.device,
    extra_loss: Callable[[nn.Module], torch.Tensor | None] = lambda m: None,
    loss_fn: LossFn | None = None,
    forward: nn.Module | None = None,
) -> Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """The one training step (the runner's, ``ctx.fit``'s and ``qbench bench``'s):
    forward (``forward``, e.g. the compiled model, else ``model``) under bf16 autocast on
    CUDA, the task loss (cross-entropy with the recipe's label smoothing, or
    ``loss_fn(model, x, y, out)``) plus the method's ``extra_loss``, backward, gradient
    clipping, optimizer step. Returns the detached task loss and output; nothing is read
    back to the host."""
    fwd = forward if forward is not None else model
    graphs = uses_cudagraphs(r, device)

    def step(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if graphs:  # a new iteration: the last one's outputs were read; replays may overwrite them
            torch.compiler.cudagraph_mark_step_begin()
        with autocast(device, r.amp):
            out = fwd(x)
            if loss_fn is None:
                loss = F.cross_entropy(out.float(), y, label_smoothing=r.label_smoothing)
            else:
                loss = loss_fn(model, x, y, out)
            extra = extra_loss(model)
            total = loss + extra if extra is not None else loss
        opt.zero_grad(set_to_none=True)
        total.backward()
        if r.grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), r.grad_clip)
        opt.step()
        return loss.detach(), out.detach()

    return step


def train_epoch(
    model: nn.Module,
    split,
    step: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    sched,
    r: Recipe,
    device: torch.device,
    generator: torch.Generator,
    on_step: Callable[[nn.Module, int], None],
    step0: int,
) -> tuple[float, float, int]:
    """One pass over ``split`` with ``step`` (:func:`make_train_step`); returns (mean loss,
    top-1 %, steps). Raises NonFiniteLoss."""
    model.train()
    cl = r.channels_last and device.type == "cuda"
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device)
    n, i = 0, step0
    for x, y in split.batches(
        r.batch_size, train=True, device=device, generator=generator, channels_last=cl, drop_last=True
    ):
        loss, out = step(x, y)
        sched.step()
        i += 1
        on_step(model, i)
        loss_sum += loss.double() * y.shape[0]
        correct += (out.argmax(1) == y).sum()
        n += y.shape[0]
    mean = loss_sum.item() / max(1, n)
    if not math.isfinite(mean):
        raise NonFiniteLoss(f"training loss is {mean} (not finite)")
    return mean, 100.0 * correct.item() / max(1, n), i - step0
