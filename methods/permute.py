r"""The permutation step of PQF: reorder channels so that product quantization fits better.

Martinez, Shewakramani, Liu, Bârsan, Zeng, Urtasun. "Permute, Quantize, and Fine-tune:
Efficient Compression of Neural Networks", CVPR 2021. https://arxiv.org/abs/2010.15703
Official code: github.com/uber-research/permute-quantize-finetune
(``src/permutation/optimization.py``, ``src/permutation/model_permutation.py``; the
hand-written groups in ``config/train_resnet{18,50}.yaml``).

Product quantization cuts each row of a layer's weight :math:`W \in \mathbb{R}^{C_{out}
\times C_{in} k_h k_w}` into consecutive subvectors of size :math:`d` and clusters them.
Permuting the input channels of a layer with :math:`P` and the output channels of the
layers that produce them with :math:`P^{-1}` leaves the network function unchanged but
changes which weights share a subvector. PQF picks the permutation that minimises the
determinant of the subvectors' covariance (a proxy of the quantization error of a
Gaussian source):

.. math::
    P^\star = \arg\min_P \det \Sigma(P), \qquad \Sigma(P) = \mathrm{cov}\big(\mathrm{reshape}(W P, (-1, d))\big)

found per *group* (the producers/parents and consumers/children that share one channel
space) on the group's first optimizable child by

1. a greedy bucket assignment: channels sorted by decreasing variance (the column
   variance for pointwise convolutions and linear layers, else :math:`\det\Sigma` of the
   channel's :math:`k_h k_w` taps) are added, one at a time, to the open bucket of least
   variance among :math:`d / (k_h k_w)` buckets; a bucket is closed when it holds
   :math:`C_{in} k_h k_w / d` channels; the closed buckets are interleaved, so bucket
   :math:`j` lands on slot :math:`j` of every subvector;
2. stochastic local search: ``n_iter`` random position pairs are swapped, a swap is kept
   when :math:`\det\Sigma` decreases;

and applied to every child (input columns) and parent (output rows and bias of a
Conv2d/Linear, the per-channel parameters and running statistics of a BatchNorm). If the
result is worse than the identity, the identity is kept. Linear layers count as 1x1
convolutions.

As in the official code: empty buckets start at variance 1 (so, for weights of variance
well below 1, the buckets are filled one after the other with channels in decreasing
order of variance); a bucket's variance is the unbiased variance of all its weights; the
random pairs may repeat a position (a no-op); a child is not optimizable when it is a
:math:`k \times k` convolution with :math:`d = k^2`.

Deviations from the official code:

* Groups are derived from the model with ``torch.fx`` (:func:`permutation_groups`)
  instead of being written by hand; for torchvision ResNet-18/50 they equal the official
  configurations (tested). A path through any operation not known to keep channels in
  place drops the group.
* The local search updates the :math:`d \times d` scatter matrix with only the
  subvectors a swap touches instead of recomputing ``np.cov`` over the whole weight:
  the same decisions up to float rounding (tested against the naive loop), at a cost per
  swap that does not grow with the layer. It compares log-determinants (``slogdet``),
  which order like determinants but cannot underflow for large ``d``; a singular
  covariance counts as :math:`-\infty` (nothing improves on it).
* Randomness comes from a ``numpy.random.Generator`` seeded per group
  (``SeedSequence(seed).spawn``), not from the global NumPy state.
* Channel sort ties keep channel order (stable sort); bucket variances are merged from
  per-channel statistics in float64 (official: recomputed in float32).
* Generalised rules: a child is not optimizable whenever no channel permutation can
  change its subvectors (:math:`k_h k_w` a multiple of :math:`d`, which includes the
  official :math:`d = k^2` case, or :math:`d` the whole row); when :math:`d` is not a
  multiple of :math:`k_h k_w` the greedy step has no bucket structure and the local
  search starts from the identity (the official code fails there).
* Parameters are permuted in place, keeping the same ``Parameter`` objects (official:
  new ``Parameter`` objects). Grouped/depthwise and transposed convolutions,
  ``FrozenBatchNorm2d`` and the official per-layer ``reshape`` overrides (Mask R-CNN)
  are not supported.
"""

from __future__ import annotations

import logging
import operator
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .errors import QbenchError

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------
# Objective
# ---------------------------------------------------------------------------------------


def cov_det(x: torch.Tensor | np.ndarray) -> float:
    """:math:`\\det` of the covariance of the rows of ``x`` (shape ``(n, d)``), in float64.

    This is the objective PQF minimises, ``det(np.cov(x, rowvar=False))``.
    """
    x = _to_numpy(x)
    if x.ndim != 2:
        raise QbenchError(f"cov_det expects a 2-D array of subvectors (n, d), got shape {tuple(x.shape)}")
    return float(np.linalg.det(np.atleast_2d(np.cov(x, rowvar=False))))


def _log_cov_det(x: np.ndarray) -> float:
    """log det of the covariance of the rows of ``x``; -inf when it is singular."""
    sign, logdet = np.linalg.slogdet(np.atleast_2d(np.cov(x, rowvar=False)))
    return float(logdet) if sign > 0 else -np.inf


def _to_numpy(x: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def _conv_weight(weight: torch.Tensor | np.ndarray, d: int) -> np.ndarray:
    """The weight as a float64 ``(C_out, C_in, kh, kw)`` array (Linear: 1x1), checked against ``d``."""
    w = _to_numpy(weight)
    if w.ndim == 2:
        w = w[:, :, None, None]
    if w.ndim != 4:
        raise QbenchError(f"expected a 2-D (Linear) or 4-D (Conv2d) weight, got shape {tuple(w.shape)}")
    row = w.shape[1] * w.shape[2] * w.shape[3]
    if d < 1 or row % d:
        raise QbenchError(
            f"subvector size d={d} does not divide the rows of a weight of shape {tuple(w.shape)} "
            f"(row length C_in*kh*kw = {row}); choose d that divides {row}"
        )
    return w


def _subvectors(w: np.ndarray, d: int, permutation: Sequence[int] | None = None) -> np.ndarray:
    if permutation is not None:
        w = w[:, np.asarray(permutation)]
    return w.reshape(-1, d)


def _optimizable(w: np.ndarray, d: int) -> bool:
    """Whether some input-channel permutation can change the subvectors of ``w``."""
    taps = w.shape[2] * w.shape[3]
    return taps % d != 0 and d != w.shape[1] * taps


# ---------------------------------------------------------------------------------------
# Step 1: greedy bucket assignment
# ---------------------------------------------------------------------------------------


def greedy_permutation(weight: torch.Tensor | np.ndarray, d: int) -> list[int]:
    """The greedy initial permutation of the input channels of ``weight`` (4-D conv or 2-D linear).

    Needs ``d`` to be a multiple of ``kh*kw`` (``d / (kh*kw)`` buckets).
    """
    w = _conv_weight(weight, d)
    c_out, c_in, kh, kw = w.shape
    taps = kh * kw
    if d % taps:
        raise QbenchError(f"greedy permutation needs d={d} to be a multiple of kh*kw={taps} (weight {tuple(w.shape)})")
    n_buckets = d // taps
    capacity = c_in // n_buckets

    if taps == 1:
        score = w.reshape(c_out, c_in).var(axis=0, ddof=1)
    else:
        # det of the covariance of each channel's (C_out, kh*kw) taps, all channels at once
        taps_by_channel = w.reshape(c_out, c_in, taps).transpose(1, 0, 2)
        centred = taps_by_channel - taps_by_channel.mean(axis=1, keepdims=True)
        score = np.linalg.det(centred.transpose(0, 2, 1) @ centred / (c_out - 1))
    order = np.argsort(-score, kind="stable")

    # per-channel count, mean and sum of squared deviations, merged per bucket (Chan et al.)
    per_channel = w.transpose(1, 0, 2, 3).reshape(c_in, -1)
    count = per_channel.shape[1]
    means = per_channel.mean(axis=1)
    m2s = ((per_channel - means[:, None]) ** 2).sum(axis=1)

    open_buckets = list(range(n_buckets))
    members: list[list[int]] = [[] for _ in range(n_buckets)]
    stats = [(0, 0.0, 0.0)] * n_buckets  # (count, mean, M2)
    variance = [1.0] * n_buckets  # empty buckets start at 1, as in the official code
    closed: list[list[int]] = []
    for c in order.tolist():
        b = open_buckets[int(np.argmin([variance[k] for k in open_buckets]))]
        n, mean, m2 = stats[b]
        total = n + count
        delta = means[c] - mean
        mean = mean + delta * count / total
        m2 = m2 + m2s[c] + delta * delta * n * count / total
        stats[b] = (total, mean, m2)
        variance[b] = m2 / (total - 1) if total > 1 else float("nan")
        members[b].append(c)
        if len(members[b]) >= capacity:
            closed.append(members[b])
            open_buckets.remove(b)
    # bucket j (in closing order) goes to slot j of every subvector
    return [bucket[i] for i in range(capacity) for bucket in closed]


# ---------------------------------------------------------------------------------------
# Step 2: stochastic local search
# ---------------------------------------------------------------------------------------


class _SwapSearch:
    """log det of the subvector covariance under a permutation, updated swap by swap.

    Column ``k`` of the subvector layout ("block" ``k``) holds subvector ``k`` of every
    output row. Each block's sum and scatter (sum of outer products) are cached; a swap
    of two positions only changes the blocks that overlap those channels' columns, so its
    cost does not depend on the number of blocks.
    """

    resum_every = 64  # accepted swaps between exact re-summations of the cached blocks

    def __init__(self, w: np.ndarray, d: int, permutation: np.ndarray):
        c_out, c_in, kh, kw = w.shape
        taps = kh * kw
        # (C_in, taps, C_out), contiguous: a subvector slot gathers one row of C_out values. A
        # constant shift leaves the covariance unchanged and keeps M - S S^T / N well conditioned.
        self.w = np.ascontiguousarray((w - w.mean()).reshape(c_out, c_in, taps).transpose(1, 2, 0))
        self.column_sums = self.w.sum(axis=2)
        self.perm = permutation
        self.n = c_out * (c_in * taps // d)
        columns = np.arange(c_in * taps).reshape(-1, d)
        self.position = columns // taps  # (blocks, d): permutation position of each column
        self.tap = columns % taps
        starts = np.arange(c_in) * taps
        self.first_block = (starts // d).tolist()
        self.last_block = ((starts + taps - 1) // d).tolist()
        self.block_s, self.block_m = self._blocks(np.arange(columns.shape[0]))
        self.accepted = 0
        self._resum()

    def _blocks(self, blocks) -> tuple[np.ndarray, np.ndarray]:
        channels, taps = self.perm[self.position[blocks]], self.tap[blocks]
        x = self.w[channels, taps]  # (blocks, d, C_out)
        return self.column_sums[channels, taps], x @ x.transpose(0, 2, 1)

    def _resum(self) -> None:
        self.s, self.m = self.block_s.sum(axis=0), self.block_m.sum(axis=0)

    def _log_det(self, s: np.ndarray, m: np.ndarray) -> float:
        if self.n < 2:
            return -np.inf
        sign, logdet = np.linalg.slogdet((m - np.outer(s, s) / self.n) / (self.n - 1))
        return float(logdet) if sign > 0 else -np.inf

    def log_det(self) -> float:
        return self._log_det(self.s, self.m)

    def try_swap(self, i: int, j: int, best: float) -> float | None:
        """Swap positions i and j if that lowers log det below ``best``; return the new value or None."""
        lo_i, hi_i, lo_j, hi_j = self.first_block[i], self.last_block[i], self.first_block[j], self.last_block[j]
        if lo_i == hi_i and lo_j == hi_j:  # d a multiple of kh*kw: one block each
            blocks = [lo_i] if lo_i == lo_j else [lo_i, lo_j]
        else:
            blocks = sorted(set(range(lo_i, hi_i + 1)).union(range(lo_j, hi_j + 1)))
        self.perm[i], self.perm[j] = self.perm[j], self.perm[i]
        new_s, new_m = self._blocks(blocks)
        s = self.s + (new_s.sum(axis=0) - self.block_s[blocks].sum(axis=0))
        m = self.m + (new_m.sum(axis=0) - self.block_m[blocks].sum(axis=0))
        value = self._log_det(s, m)
        if value < best:
            self.block_s[blocks], self.block_m[blocks] = new_s, new_m
            self.s, self.m = s, m
            self.accepted += 1
            if self.accepted % self.resum_every == 0:
                self._resum()
            return value
        self.perm[i], self.perm[j] = self.perm[j], self.perm[i]
        return None


def local_search(
    weight: torch.Tensor | np.ndarray,
    d: int,
    n_iter: int,
    start: Sequence[int] | None = None,
    rng: np.random.Generator | int | None = None,
) -> list[int]:
    """Stochastic local search over input-channel permutations of ``weight`` (4-D conv or 2-D linear).

    Draws ``n_iter`` random position pairs up front (``rng.integers(C_in, size=(n_iter, 2))``),
    swaps each pair in turn and keeps the swap if the subvectors' covariance determinant
    decreases. ``start`` defaults to the identity; ``rng`` is a Generator or a seed.
    """
    w = _conv_weight(weight, d)
    c_in = w.shape[1]
    perm = np.arange(c_in) if start is None else np.array(start, dtype=np.int64)
    if perm.shape != (c_in,) or not np.array_equal(np.sort(perm), np.arange(c_in)):
        raise QbenchError(f"start must be a permutation of range({c_in}), got {list(start)[:8]}...")
    if n_iter <= 0:
        return perm.tolist()
    pairs = np.random.default_rng(rng).integers(c_in, size=(n_iter, 2))
    search = _SwapSearch(w, d, perm)
    best = search.log_det()
    for i, j in pairs.tolist():
        if i == j:
            continue
        value = search.try_swap(i, j, best)
        if value is not None:
            best = value
    return search.perm.tolist()


def find_permutation(weight: torch.Tensor | np.ndarray, d: int, n_iter: int, rng: np.random.Generator) -> list[int]:
    """Greedy start (where ``d`` is a multiple of kh*kw), then local search."""
    w = _conv_weight(weight, d)
    start = greedy_permutation(w, d) if d % (w.shape[2] * w.shape[3]) == 0 else None
    return local_search(w, d, n_iter, start, rng)


# ---------------------------------------------------------------------------------------
# Groups: which layers share one channel permutation
# ---------------------------------------------------------------------------------------


@dataclass
class Group:
    """Layers sharing one channel space: ``parents`` produce it (Conv2d/Linear rows, BatchNorm),
    ``children`` consume it (Conv2d/Linear input columns). Names as in ``model.named_modules()``."""

    parents: list[str]
    children: list[str]


_KEEP_MODULES = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Sigmoid,
    nn.Tanh,
    nn.Hardtanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Softplus,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
    nn.Identity,
    nn.Dropout,
    nn.Dropout2d,
)
_KEEP_FUNCTIONS = {
    F.relu,
    F.relu_,
    torch.relu,
    torch.relu_,
    F.relu6,
    F.leaky_relu,
    F.elu,
    F.gelu,
    F.silu,
    F.mish,
    F.hardtanh,
    F.hardswish,
    F.hardsigmoid,
    torch.sigmoid,
    torch.tanh,
    F.dropout,
    F.max_pool2d,
    F.avg_pool2d,
    F.adaptive_avg_pool2d,
    F.adaptive_max_pool2d,
}
_KEEP_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "contiguous"}
_ELEMENTWISE_FUNCTIONS = {
    operator.add,
    operator.iadd,
    operator.sub,
    operator.isub,
    operator.mul,
    operator.imul,
    operator.truediv,
    torch.add,
    torch.sub,
    torch.mul,
    torch.div,
}
_ELEMENTWISE_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_"}
_SQUEEZE_FUNCTIONS = {torch.flatten, torch.reshape, torch.squeeze}
_SQUEEZE_METHODS = {"flatten", "view", "reshape", "squeeze"}
_SHAPE_QUERY_METHODS = {"size", "dim"}


class _Spaces:
    """Union-find over graph nodes: nodes in one set carry the same channel order."""

    def __init__(self):
        self.up: dict = {}
        self.bad: set = set()

    def find(self, node):
        self.up.setdefault(node, node)
        while self.up[node] is not node:
            self.up[node] = self.up[self.up[node]]
            node = self.up[node]
        return node

    def union(self, a, b) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra is not rb:
            self.up[rb] = ra

    def poison(self, node) -> None:
        self.bad.add(node)


def _shape(node) -> tuple[int, ...] | None:
    from torch.fx.passes.shape_prop import TensorMetadata

    meta = node.meta.get("tensor_meta") if hasattr(node, "meta") else None
    return tuple(meta.shape) if isinstance(meta, TensorMetadata) else None


def _input_nodes(node) -> list:
    return list(node.all_input_nodes)


def _keeps_channels(node, source) -> bool:
    out, inp = _shape(node), _shape(source)
    return out is not None and inp is not None and len(out) >= 2 and len(inp) >= 2 and out[1] == inp[1]


def _squeezes_to_channels(node, source) -> bool:
    """(N, C, 1, ..., 1) -> (N, C): the channel axis survives a flatten/view/reshape/squeeze."""
    out, inp = _shape(node), _shape(source)
    return out is not None and inp is not None and len(inp) >= 2 and all(s == 1 for s in inp[2:]) and out == inp[:2]


class _LayerTracer(torch.fx.Tracer):
    """torch.fx's tracer, with every Conv2d/Linear/BatchNorm (subclasses too: a product-
    quantized layer is a Conv2d whose weight is decoded from its codes) kept as one call."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, (nn.Conv2d, nn.Linear, nn.modules.batchnorm._BatchNorm)):
            return True
        return super().is_leaf_module(m, qualname)


def _trace(model: nn.Module, example: torch.Tensor):
    from torch.fx.passes.shape_prop import ShapeProp

    graph_module = torch.fx.GraphModule(model, _LayerTracer().trace(model))
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()  # no BatchNorm statistics updates while propagating shapes
        with torch.no_grad():
            ShapeProp(graph_module).propagate(example)
    finally:
        for m, training in modes.items():
            m.training = training
    return graph_module


def permutation_groups(model: nn.Module, example: torch.Tensor) -> list[Group]:
    """Derive the permutation groups of ``model`` by tracing it on ``example`` with torch.fx.

    Each Conv2d/Linear input is followed back through operations that keep channels in
    place (activations, pooling, dropout, identity, BatchNorm (a parent), elementwise
    add/sub/mul/div of same-channel tensors, flatten/view to (N, C) of a 1x1 map) to the
    Conv2d/Linear layers producing it; consumers sharing producers form one group. A
    channel space that meets anything else (concatenation, padding, slicing, a model
    input or output, a grouped convolution, an unknown function) is dropped. Returns []
    when the model cannot be traced.
    """
    try:
        graph_module = _trace(model, example)
    except Exception as exc:  # tracing is best effort: an untraceable model has no groups
        log.info(
            "permutation_groups: cannot trace %s (%s: %s); no groups", type(model).__name__, type(exc).__name__, exc
        )
        return []
    return _groups_from_graph(graph_module)


def _groups_from_graph(graph_module) -> list[Group]:
    modules = dict(graph_module.named_modules())
    spaces = _Spaces()
    producers: dict[str, object] = {}  # module name -> output node (space) of its first call
    consumers: dict[str, object] = {}  # module name -> input node (space)
    norms: dict[str, object] = {}
    order: dict[str, int] = {}

    def role(table: dict, name: str, node, index: int) -> None:
        # a module called twice must see one permutation: join the spaces of its calls
        if name in table:
            spaces.union(table[name], node)
        else:
            table[name] = node
            order.setdefault(name, index)

    def barrier(node) -> None:
        spaces.poison(node)
        for source in _input_nodes(node):
            spaces.poison(source)

    for index, node in enumerate(graph_module.graph.nodes):
        spaces.find(node)
        inputs = _input_nodes(node)
        if node.op in ("placeholder", "get_attr", "output"):
            barrier(node)
        elif node.op == "call_module":
            module = modules[node.target]
            source = inputs[0] if len(inputs) == 1 else None
            if source is None:
                barrier(node)
            elif _is_layer(module) and _layer_input_ok(module, source):
                role(consumers, node.target, source, index)
                role(producers, node.target, node, index)
            elif isinstance(module, _BatchNorm) and _keeps_channels(node, source):
                spaces.union(source, node)
                role(norms, node.target, node, index)
            elif _keeps(module) and _keeps_channels(node, source):
                spaces.union(source, node)
            elif isinstance(module, nn.Flatten) and _squeezes_to_channels(node, source):
                spaces.union(source, node)
            else:
                barrier(node)
        elif node.op in ("call_function", "call_method"):
            _visit_function(node, inputs, spaces, barrier)
        else:
            barrier(node)

    return _collect_groups(spaces, producers, consumers, norms, order, modules)


def _visit_function(node, inputs: list, spaces: _Spaces, barrier: Callable) -> None:
    target, is_method = node.target, node.op == "call_method"
    if is_method and target in _SHAPE_QUERY_METHODS:
        return  # reads the shape only
    if not is_method and target is getattr and len(node.args) > 1 and node.args[1] in ("shape", "dtype", "device"):
        return
    if (target in _KEEP_METHODS) if is_method else (target in _KEEP_FUNCTIONS):
        tensors = [n for n in inputs if _shape(n) is not None]
        if len(tensors) == 1 and node.args and node.args[0] is tensors[0] and _keeps_channels(node, tensors[0]):
            spaces.union(tensors[0], node)
            return
    elif (target in _ELEMENTWISE_METHODS) if is_method else (target in _ELEMENTWISE_FUNCTIONS):
        if _elementwise(node, inputs, spaces):
            return
    elif (target in _SQUEEZE_METHODS) if is_method else (target in _SQUEEZE_FUNCTIONS):
        source = node.args[0] if node.args else None
        others = [n for n in inputs if n is not source and _shape(n) is not None]
        if source in inputs and not others and _squeezes_to_channels(node, source):
            spaces.union(source, node)
            return
    barrier(node)


def _elementwise(node, inputs: list, spaces: _Spaces) -> bool:
    """Join same-channel operands of a broadcasting elementwise op; False if an operand does not fit."""
    out = _shape(node)
    if out is None or len(out) < 2:
        return False
    joined = []
    for operand in inputs:
        shape = _shape(operand)
        if shape is None:
            return False
        if len(shape) == 0:
            continue  # a 0-d tensor broadcasts over everything
        if len(shape) != len(out):
            return False
        if shape[1] == out[1]:
            joined.append(operand)
        elif shape[1] != 1:
            return False  # an operand broadcast over channels (size 1) stays untouched
    for operand in joined:
        spaces.union(operand, node)
    return bool(joined)


def _is_layer(module: nn.Module) -> bool:
    """A Conv2d (not grouped) or Linear, subclasses included: a product-quantized layer not
    yet compressed exposes its full-precision weight as ``weight`` (once compressed, its
    weight is decoded from the codes and cannot be permuted in place)."""
    if bool(getattr(module, "compressed", False)):
        return False
    if isinstance(module, nn.Conv2d):
        return module.groups == 1
    return isinstance(module, nn.Linear)


def _layer_input_ok(module: nn.Module, source) -> bool:
    shape = _shape(source)
    # Linear acts on the last axis: only (N, C) inputs put its features on the channel axis
    return shape is not None and len(shape) == (4 if isinstance(module, nn.Conv2d) else 2)


def _keeps(module: nn.Module) -> bool:
    if isinstance(module, nn.PReLU):
        return module.num_parameters == 1
    return isinstance(module, _KEEP_MODULES)


def _channels(module: nn.Module, as_child: bool) -> int:
    if isinstance(module, nn.Conv2d):
        return module.in_channels if as_child else module.out_channels
    if isinstance(module, nn.Linear):
        return module.in_features if as_child else module.out_features
    return module.num_features


def _collect_groups(spaces: _Spaces, producers, consumers, norms, order, modules) -> list[Group]:
    bad_roots = {spaces.find(n) for n in spaces.bad}
    by_root: dict[object, tuple[list[str], list[str], list[str]]] = {}
    for table, slot in ((producers, 0), (norms, 1), (consumers, 2)):
        for name, node in table.items():
            by_root.setdefault(spaces.find(node), ([], [], []))[slot].append(name)
    groups = []
    for root, (made_by, normed_by, used_by) in by_root.items():
        if root in bad_roots or not made_by or not used_by:
            continue
        parents = sorted(made_by + normed_by, key=order.__getitem__)
        children = sorted(used_by, key=order.__getitem__)
        sizes = {_channels(modules[n], False) for n in parents} | {_channels(modules[n], True) for n in children}
        if len(sizes) != 1:
            log.info("permutation_groups: dropping %s -> %s (channel counts %s)", parents, children, sizes)
            continue
        groups.append(Group(parents=parents, children=children))
    groups.sort(key=lambda g: min(order[n] for n in g.parents + g.children))
    return groups


# ---------------------------------------------------------------------------------------
# Applying permutations
# ---------------------------------------------------------------------------------------


def apply_permutation(model: nn.Module, group: Group, permutation: Sequence[int]) -> None:
    """Permute the channel space of ``group`` in place: parents' output channels, children's inputs.

    With ``p = permutation``, every child's new input channel ``i`` is its old channel
    ``p[i]``, and every parent's new output channel ``i`` is its old ``p[i]``, so the
    network computes the same function.
    """
    modules = dict(model.named_modules())
    for name in group.parents + group.children:
        if name not in modules:
            raise QbenchError(f"permutation group names {name!r}, which is not a module of {type(model).__name__}")
    with torch.no_grad():
        for name in group.parents:
            _permute_parent(name, modules[name], permutation)
        for name in group.children:
            _permute_child(name, modules[name], permutation)


def _index(tensor: torch.Tensor, permutation: Sequence[int], name: str, dim: int) -> torch.Tensor:
    if tensor.shape[dim] != len(permutation):
        raise QbenchError(
            f"{name}: a permutation of {len(permutation)} channels does not fit axis {dim} of shape "
            f"{tuple(tensor.shape)}; the group mixes layers of different widths"
        )
    return torch.as_tensor(np.asarray(permutation), dtype=torch.long, device=tensor.device)


def _permute_rows(tensor: torch.Tensor | None, permutation: Sequence[int], name: str, dim: int = 0) -> None:
    if tensor is not None:
        tensor.data.copy_(tensor.data.index_select(dim, _index(tensor, permutation, name, dim)))


def _permute_parent(name: str, module: nn.Module, permutation: Sequence[int]) -> None:
    if _is_layer(module):
        _permute_rows(module.weight, permutation, name)
        _permute_rows(module.bias, permutation, name)
    elif isinstance(module, _BatchNorm):
        for tensor in (module.weight, module.bias, module.running_mean, module.running_var):
            _permute_rows(tensor, permutation, name)
    else:
        raise QbenchError(f"{name}: cannot permute the output channels of a {type(module).__name__}")


def _permute_child(name: str, module: nn.Module, permutation: Sequence[int]) -> None:
    if not _is_layer(module):
        raise QbenchError(f"{name}: cannot permute the input channels of a {type(module).__name__}")
    _permute_rows(module.weight, permutation, name, dim=1)


def permute_model(
    model: nn.Module,
    groups: Sequence[Group],
    subvector_size: Callable[[str, nn.Module], int | None],
    sls_iterations: int = 10_000,
    seed: int = 0,
) -> list[dict]:
    """Find and apply the PQF permutation of every group, in place; one record per group.

    ``subvector_size(name, module)`` is the product-quantization subvector size ``d`` of a
    child, or None if it is not quantized. The permutation is optimised on the group's
    first optimizable child (greedy, then ``sls_iterations`` swaps of local search) and
    kept only if it does not raise that child's covariance determinant.

    A record: ``parents``, ``children``, ``child`` (the layer optimised, None if none
    was optimizable), ``subvector_size``, ``cov_det_before``/``cov_det_after`` and their
    logs, ``permuted`` (applied or not) and ``seconds``.
    """
    modules = dict(model.named_modules())
    streams = np.random.SeedSequence(seed).spawn(len(groups))  # one independent stream per group
    records = []
    for group, stream in zip(groups, streams, strict=True):
        started = time.perf_counter()
        record = _permute_group(model, group, modules, subvector_size, sls_iterations, np.random.default_rng(stream))
        record["seconds"] = time.perf_counter() - started
        records.append(record)
    return records


def _permute_group(
    model: nn.Module, group: Group, modules: dict, subvector_size: Callable, n_iter: int, rng: np.random.Generator
) -> dict:
    record = {"parents": list(group.parents), "children": list(group.children), "child": None}
    record.update(subvector_size=None, permuted=False, cov_det_before=None, cov_det_after=None)
    record.update(log_cov_det_before=None, log_cov_det_after=None)
    chosen = _first_optimizable(group, modules, subvector_size)
    if chosen is None:
        return record
    name, w, d = chosen
    permutation = find_permutation(w, d, n_iter, rng)
    before, after = _subvectors(w, d), _subvectors(w, d, permutation)
    log_before, log_after = _log_cov_det(before), _log_cov_det(after)
    permuted = log_after <= log_before  # keep the identity if the search made things worse
    if permuted:
        apply_permutation(model, group, permutation)
    else:
        log.warning("%s: the permuted cov-det is higher than the identity's; keeping the identity", name)
        after, log_after = before, log_before
    record.update(child=name, subvector_size=d, permuted=permuted)
    record.update(cov_det_before=cov_det(before), cov_det_after=cov_det(after))
    record.update(log_cov_det_before=log_before, log_cov_det_after=log_after)
    return record


def _first_optimizable(group: Group, modules: dict, subvector_size: Callable) -> tuple[str, np.ndarray, int] | None:
    """The first child with a subvector size that a channel permutation can improve."""
    for name in group.children:
        if name not in modules:
            raise QbenchError(f"permutation group names {name!r}, which is not a module of the model")
        module = modules[name]
        if not _is_layer(module):
            raise QbenchError(f"{name}: a permutation child must be a Conv2d (groups=1) or Linear, got {module}")
        d = subvector_size(name, module)
        if d is None:
            continue
        try:
            w = _conv_weight(module.weight, int(d))
        except QbenchError as exc:
            raise QbenchError(exc.message, where=name) from None
        if _optimizable(w, int(d)):
            return name, w, int(d)
    return None


__all__ = [
    "Group",
    "apply_permutation",
    "cov_det",
    "find_permutation",
    "greedy_permutation",
    "local_search",
    "permutation_groups",
    "permute_model",
]
