r"""Product quantization of weights: the core shared by ``bgd`` and ``pqf``.

A layer's weight, viewed as a matrix :math:`W \in \mathbb{R}^{C_{out} \times C_{in} k_h k_w}`
(a linear layer: :math:`C_{out} \times C_{in}`), is cut along its rows into
``n_blocks = C_in k_h k_w / d`` consecutive subvectors of size ``d``; every subvector is
replaced by the index of its nearest codeword in a codebook of ``k`` codewords shared by
the whole layer. Stored: the codes (``log2 k`` bits each) and the codebook.

* **Layouts** of the same subvectors. *Row layout* (PQF's ``codes_matrix``, and how
  :class:`PQConv2d` / :class:`PQLinear` hold them): ``codes[o, b]`` is the code of output
  ``o``'s block ``b`` (``W.reshape(C_out, -1).reshape(-1, d)``, row-major). *Column layout*
  (BGD's ``assignments``): BGD transposes :math:`W` to :math:`(C_{in} k_h k_w) \times C_{out}`,
  cuts it into ``n_blocks`` row chunks and lays them side by side, so its subvector
  ``j = b C_out + o`` is output ``o``'s block ``b``: :func:`rows_from_columns` and
  :func:`columns_from_rows` convert.
* **Centroid counts for small layers** (both clamp ``k`` to about a quarter of the number
  of subvectors ``n``, for stability, to a power of two): BGD (``quantize.py``:
  ``bisect_left`` over powers of two) takes the largest power of two *strictly below*
  ``n / 4``; PQF (``coding.get_num_centroids``) the largest *at or below* it. They differ
  when ``n / 4`` is a power of two (ResNet-50's ``layer1.0.conv1``: 64 vs 128).
* **k-means** (PQF, ``compression/kmeans.py``): codebook initialised with ``k`` distinct
  random subvectors plus :math:`\mathcal{N}(0, 10^{-5})` noise; assignment to the nearest
  codeword (squared Euclidean distance); each codeword the mean of its subvectors, an empty
  cluster's codeword set to zero (the official default, ``resolve_empty_clusters=False``).
  **Annealed k-means** (``kmeans_sr.src``, "stochastic relaxation", PQF's default): for
  ``i = 0..n_iter``, assign on the clean subvectors, update on subvectors plus Gaussian
  noise of the per-dimension standard deviation scaled by :math:`(1 - i/n_{iter})^{1/2}`.
* **EM with the activation-weighted objective** (BGD, ``quantization/em.py`` and ``pq.py``):
  minimise :math:`\|A (W_j - c_{a_j})\|^2` summed over subvectors, with :math:`A` the layer's
  input activations unfolded into ``d``-sized pieces (the in-domain inputs: the layer's
  *outputs* are reconstructed, not its weights). Initialisation: ``k`` random subvectors
  (drawn with replacement). E-step: exhaustive nearest codeword under that metric. An empty
  cluster: the most populated cluster is split (its codeword copied to the empty one and
  both moved apart by :math:`\pm\epsilon` noise, :math:`\epsilon = 10^{-8}`), then all are
  reassigned, until none is empty. M-step: :math:`c_k = A^{+} A \bar W_k` (the solver's
  ``A_pinv @ (A @ M_k).sum(1) / |k|``; the mean when :math:`A` has full column rank). The
  activations are resampled every iteration (``n_samples // C_out`` positions, unrolled
  over the blocks).

Deviations (numerics only): the E-step distances are computed through the Gram matrix
:math:`G = A^\top A` (:math:`(w-c)^\top G (w-c)`), which is exact in real arithmetic and
far cheaper than BGD's broadcast ``(A (M - c)).norm()``; activation positions are sampled
lazily from the stored feature maps instead of unfolding all of them first (the same
distribution: uniform over images and output positions).
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from .base import Method, MethodContext
from .layers import first_last_layers
from .modules import set_submodule

# -- layouts and rules ----------------------------------------------------------------------


def weight_matrix(w: torch.Tensor) -> torch.Tensor:
    """A conv/linear weight as ``(C_out, C_in k_h k_w)``."""
    return w.reshape(w.shape[0], -1)


def subvectors(w: torch.Tensor, d: int) -> torch.Tensor:
    """The subvectors of ``w`` in row layout: ``(C_out n_blocks, d)``."""
    m = weight_matrix(w)
    if m.shape[1] % d:
        raise ValueError(f"a row of {m.shape[1]} weights does not split into blocks of {d}")
    return m.reshape(-1, d)


def rows_from_columns(assignments: torch.Tensor, c_out: int) -> torch.Tensor:
    """BGD's column-layout assignments ``(n_blocks C_out,)`` as row-layout codes
    ``(C_out, n_blocks)``."""
    return assignments.reshape(-1, c_out).t().contiguous()


def columns_from_rows(codes: torch.Tensor) -> torch.Tensor:
    """Row-layout codes ``(C_out, n_blocks)`` as BGD's column-layout assignments."""
    return codes.t().reshape(-1).contiguous()


def decode(codebook: torch.Tensor, codes: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """The weight of ``shape`` rebuilt from row-layout ``codes`` and the ``codebook``."""
    return codebook[codes.long()].reshape(shape)


def bgd_centroids(n_subvectors: int, k: int, threshold: int = 4) -> int:
    """BGD's clamp: ``min(k, the largest power of two strictly below n / threshold)``
    (``quantize.py``; powers of two from 1 to 2^15)."""
    powers = [2**i for i in range(16)]
    idx = bisect_left(powers, n_subvectors / threshold)
    return min(k, powers[idx - 1]) if idx > 0 else min(k, powers[-1])


def pqf_centroids(n_blocks: int, c_out: int, k: int) -> int:
    """PQF's clamp: ``min(k, the largest power of two at or below C_out n_blocks / 4)``
    (``coding.get_num_centroids``)."""
    return min(k, int(2 ** math.floor(math.log2(c_out * n_blocks / 4))))


# -- layers ---------------------------------------------------------------------------------


def code_dtype(k: int) -> torch.dtype:
    """The smallest integer type holding codes of a ``k``-codeword codebook."""
    return torch.uint8 if k <= 256 else torch.int16 if k <= 32768 else torch.int32


class _PQMixin:
    """A layer whose weight is ``codebook[codes]``: ``codebook`` a (k, d) Parameter, ``codes``
    a (C_out, n_blocks) integer buffer (row layout). ``source`` keeps the full-precision
    weight the layer was built from (not part of the state) until it is compressed."""

    codebook: nn.Parameter
    codes: torch.Tensor
    weight_shape: tuple[int, ...]

    def _pq_init(self, k: int, d: int, source: torch.Tensor) -> None:
        self.weight_shape = tuple(source.shape)
        self.d = d
        n_blocks = weight_matrix(source).shape[1] // d
        del self.weight  # the Parameter goes; ``weight`` is the property below
        self.codebook = nn.Parameter(torch.zeros(k, d, device=source.device))
        self.register_buffer(
            "codes", torch.zeros(self.weight_shape[0], n_blocks, dtype=code_dtype(k), device=source.device)
        )
        self.register_buffer("compressed", torch.tensor(False, device=source.device))
        self.register_buffer("source", source.detach().clone(), persistent=False)

    @property
    def k(self) -> int:
        return self.codebook.shape[0]

    @property
    def n_subvectors(self) -> int:
        return self.codes.numel()

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        """The decoded weight once compressed; before, the full-precision ``source`` (so a
        layer not yet quantized computes what the original layer did)."""
        if bool(self.compressed):
            return decode(self.codebook, self.codes, self.weight_shape)
        return self.source

    def set_codes(self, codebook: torch.Tensor, codes: torch.Tensor) -> None:
        """Install a codebook ``(k, d)`` (both may differ from the current ones) and
        row-layout codes ``(C_out, row / d)``; the layer is then compressed."""
        k, d = codebook.shape
        row = math.prod(self.weight_shape[1:])
        if row % d or codes.numel() != self.weight_shape[0] * (row // d):
            raise ValueError(
                f"codes of shape {tuple(codes.shape)} in blocks of {d} do not fit a weight of {self.weight_shape}"
            )
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= k):
            raise ValueError(f"codes outside the codebook of {k} codewords")
        dev = self.codes.device
        self.d = d
        self.codebook = nn.Parameter(codebook.detach().to(dev, torch.float32).clone())
        self.codes = codes.detach().to(dev, code_dtype(k)).reshape(self.weight_shape[0], row // d).clone()
        self.compressed.fill_(True)

    def counts(self) -> torch.Tensor:
        """How many subvectors use each codeword."""
        return torch.bincount(self.codes.reshape(-1).long(), minlength=self.k)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", k={self.k}, d={self.d}"  # type: ignore[misc]


class PQConv2d(_PQMixin, nn.Conv2d):
    pass


class PQLinear(_PQMixin, nn.Linear):
    pass


PQ_LAYERS = (PQConv2d, PQLinear)


def to_pq(module: nn.Module, k: int, d: int) -> nn.Module:
    """A PQ layer sharing ``module``'s configuration and bias; its weight kept as ``source``."""
    cls = PQConv2d if isinstance(module, nn.Conv2d) else PQLinear
    new = cls.__new__(cls)
    new.__dict__.update(module.__dict__)
    new._parameters = dict(module._parameters)
    new._buffers = dict(module._buffers)
    new._modules = dict(module._modules)
    new._pq_init(k, d, module.weight.data)
    return new


def pq_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, PQ_LAYERS)]


def swap_layers(model: nn.Module, plan: dict[str, tuple[int, int]]) -> nn.Module:
    """Replace each layer named in ``plan`` (name -> (k, d)) by its PQ layer, in place."""
    for name, (k, d) in plan.items():
        set_submodule(model, name, to_pq(model.get_submodule(name), k, d))
    return model


def block_size(module: nn.Module, cv: int, pw: int, fc: int) -> int | None:
    """The subvector size for ``module`` (3x3-like convs ``cv``, 1x1 convs ``pw``, linear
    ``fc``), or None when the layer cannot be cut into such blocks (grouped convs too)."""
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            return None
        kh, kw = module.kernel_size
        d = pw if kh * kw == 1 else cv
        n = module.in_channels * kh * kw
    elif isinstance(module, nn.Linear):
        d, n = fc, module.in_features
    else:
        return None
    return d if n % d == 0 else None


# -- options and layer plan -------------------------------------------------------------------


class PQOptions(BaseModel):
    """Options shared by the product-quantization methods."""

    model_config = ConfigDict(extra="forbid")
    #: the papers' compression regimes: block sizes 9/4 ("small") or 18/8 ("large")
    regime: Literal["small", "large"] = "small"
    #: block size of 3x3 (and larger) convolutions; default from the regime (9 or 18)
    block_cv: int | None = Field(default=None, ge=1)
    #: block size of 1x1 convolutions; default from the regime (4 or 8)
    block_pw: int | None = Field(default=None, ge=1)
    #: block size of linear layers
    block_fc: int = Field(default=4, ge=1)
    #: codewords of linear layers (the classifier)
    k_fc: int = Field(default=2048, ge=2, le=32768)

    def blocks(self) -> tuple[int, int, int]:
        cv = self.block_cv or (9 if self.regime == "small" else 18)
        pw = self.block_pw or (4 if self.regime == "small" else 8)
        return cv, pw, self.block_fc


def plan_layers(
    model: nn.Module, k: int, opts: PQOptions, rule: Callable[[nn.Module, int, int, int], int]
) -> dict[str, tuple[int, int]]:
    """name -> (codewords, block size) for every layer to compress: each Conv2d/Linear but
    the first one, that cuts into whole blocks (grouped convolutions stay full precision)."""
    first, _ = first_last_layers(model)
    cv, pw, fc = opts.blocks()
    plan = {}
    for name, m in model.named_modules():
        if name == first or not isinstance(m, (nn.Conv2d, nn.Linear)) or isinstance(m, PQ_LAYERS):
            continue
        d = block_size(m, cv, pw, fc)
        if d is None:
            continue
        n_vectors = m.weight.numel() // d
        kk = opts.k_fc if isinstance(m, nn.Linear) else k
        plan[name] = (rule(m, n_vectors, d, kk), d)
    return plan


def kl_distillation(teacher: nn.Module):
    """``loss_fn`` for ``ctx.fit``: KL(teacher softmax || student), batch mean (BGD, PQF)."""

    def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target = F.softmax(teacher(x).float(), dim=1)
        return F.kl_div(F.log_softmax(out.float(), dim=1), target, reduction="batchmean")

    return loss_fn


# -- k-means (PQF) --------------------------------------------------------------------------


def _sq_distances(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return (x * x).sum(1, keepdim=True) + (c * c).sum(1)[None, :] - 2.0 * x @ c.t()


def assign(x: torch.Tensor, codebook: torch.Tensor, chunk: int = 1 << 16) -> torch.Tensor:
    """The nearest codeword of each row of ``x`` (squared Euclidean distance)."""
    return torch.cat([_sq_distances(p, codebook).argmin(1) for p in x.split(chunk)])


def centroid_means(x: torch.Tensor, codes: torch.Tensor, k: int) -> torch.Tensor:
    """The mean of the rows assigned to each codeword; zero for an empty cluster."""
    sums = torch.zeros(k, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, codes, x)
    n = torch.bincount(codes, minlength=k).clamp(min=1).to(x.dtype)
    return sums / n[:, None]


def kmeans(
    x: torch.Tensor,
    k: int,
    n_iter: int,
    generator: torch.Generator,
    annealed: bool = False,
    noise: float = 1e-5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PQF's k-means (``annealed``: its stochastic relaxation); returns (codebook, codes)."""
    dev = x.device
    n = x.shape[0]
    first = torch.randperm(n, generator=generator)[:k].to(dev)
    codebook = x[first] + torch.randn(k, x.shape[1], generator=generator).to(dev) * noise
    std = x.std(0) if annealed else None
    codes = assign(x, codebook)
    for i in range(n_iter + 1 if annealed else n_iter):
        codes = assign(x, codebook)
        target = x
        if annealed:
            scale = (1.0 - i / n_iter) ** 0.5 if n_iter else 0.0
            target = x + torch.randn(x.shape, generator=generator).to(dev) * std * scale
        codebook = centroid_means(target, codes, k)
    return codebook, codes


# -- EM on activations (BGD) ----------------------------------------------------------------


def unroll(a: torch.Tensor, n_blocks: int) -> torch.Tensor:
    """BGD's ``unroll_activations``: ``(m, n_blocks d)`` -> ``(n_blocks m, d)``."""
    return torch.cat(a.chunk(n_blocks, dim=1), dim=0)


class ActivationSampler:
    """Rows of a layer's unfolded input (``(C_in k_h k_w)``-long patches for a conv, the
    input vector for a linear layer), drawn uniformly over stored images and positions."""

    def __init__(self, inputs: torch.Tensor, module: nn.Module):
        self.conv = isinstance(module, nn.Conv2d)
        if self.conv:
            ph, pw = module.padding if isinstance(module.padding, tuple) else (module.padding,) * 2
            self.k = module.kernel_size
            self.stride = module.stride
            self.x = F.pad(inputs, (pw, pw, ph, ph))
            n, c, h, w = self.x.shape
            self.out_h = (h - self.k[0]) // self.stride[0] + 1
            self.out_w = (w - self.k[1]) // self.stride[1] + 1
            self.positions = n * self.out_h * self.out_w
        else:
            self.x = inputs.reshape(inputs.shape[0], -1)
            self.positions = self.x.shape[0]

    def sample(self, m: int, generator: torch.Generator) -> torch.Tensor:
        idx = torch.randint(self.positions, (m,), generator=generator)
        if not self.conv:
            return self.x[idx.to(self.x.device)]
        per = self.out_h * self.out_w
        img, pos = idx // per, idx % per
        oi, oj = pos // self.out_w, pos % self.out_w
        dev = self.x.device
        rows = (oi * self.stride[0])[:, None] + torch.arange(self.k[0])
        cols = (oj * self.stride[1])[:, None] + torch.arange(self.k[1])
        c = torch.arange(self.x.shape[1])
        patches = self.x[
            img.to(dev)[:, None, None, None],
            c.to(dev)[None, :, None, None],
            rows.to(dev)[:, None, :, None],
            cols.to(dev)[:, None, None, :],
        ]
        return patches.reshape(m, -1)


def em_distances(a: torch.Tensor, w: torch.Tensor, codebook: torch.Tensor, chunk: int = 1 << 15) -> torch.Tensor:
    """``||a (w_j - c)||^2`` for every subvector ``w_j`` (rows of ``w``) and codeword ``c``:
    ``(n_subvectors, k)``, through the Gram matrix of ``a``, in float64: the expansion
    ``w G w - 2 w G c + c G c`` cancels, and a codeword split off another by ``eps`` (the
    empty-cluster rule) must still be told apart from it."""
    a, w, codebook = a.double(), w.double(), codebook.double()
    g = a.t() @ a
    cg = codebook @ g
    cc = (cg * codebook).sum(1)
    out = []
    for p in w.split(chunk):
        pg = p @ g
        out.append((pg * p).sum(1, keepdim=True) - 2.0 * pg @ codebook.t() + cc[None, :])
    return torch.cat(out)


def em_assign(a: torch.Tensor, w: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    return em_distances(a, w, codebook).argmin(1)


def em_step(
    a: torch.Tensor,
    w: torch.Tensor,
    codebook: torch.Tensor,
    generator: torch.Generator,
    eps: float = 1e-8,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """One BGD EM iteration on the unrolled activations ``a`` (m, d) and subvectors ``w``
    (n, d): E-step with empty clusters split, M-step ``c_k = A^+ A mean_k``. Returns the
    new (codebook, codes, number of empty clusters resolved)."""
    codebook = codebook.clone()
    k = codebook.shape[0]
    codes = em_assign(a, w, codebook)
    counts = torch.bincount(codes, minlength=k)
    n_empty = int((counts == 0).sum())
    tries = 0
    while bool((counts == 0).any()) and tries < 4 * k:  # a bound the official loop has not
        tries += 1
        empty = torch.nonzero(counts == 0).flatten()
        pick = empty[torch.randint(len(empty), (1,), generator=generator).item()]
        big = int(counts.argmax())
        e = torch.randn(codebook.shape[1], generator=generator).to(codebook) * eps
        codebook[pick] = codebook[big] + e
        codebook[big] = codebook[big] - e
        codes = em_assign(a, w, codebook)
        counts = torch.bincount(codes, minlength=k)
    projection = torch.linalg.pinv(a) @ a  # (d, d): A^+ A
    means = centroid_means(w, codes, k)
    return means @ projection.t(), codes, n_empty


def em_objective(a: torch.Tensor, w: torch.Tensor, codebook: torch.Tensor, codes: torch.Tensor) -> float:
    """BGD's book-keeping objective ``||A (W_hat - W)|| / sqrt(m n)`` on ``a``'s rows."""
    diff = codebook[codes] - w
    return float((a @ diff.t()).norm() / math.sqrt(a.shape[0] * w.shape[0]))


def em_quantize(
    sampler: ActivationSampler,
    w: torch.Tensor,
    n_blocks: int,
    c_out: int,
    k: int,
    n_iter: int,
    n_samples: int,
    generator: torch.Generator,
    eps: float = 1e-8,
    log: Callable[[int, float, int], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BGD's layer quantization (``PQ.encode``): ``w`` in row layout (C_out n_blocks, d);
    ``n_samples // C_out`` activation rows per iteration, resampled every iteration, and a
    fixed evaluation sample for the objective. Returns (codebook, row-layout codes)."""
    m = max(1, n_samples // c_out)
    dev = w.device
    eval_a = unroll(sampler.sample(m, generator).to(dev), n_blocks)[:128]
    init = torch.randint(w.shape[0], (k,), generator=generator).to(dev)
    codebook = w[init].clone()
    codes = torch.zeros(w.shape[0], dtype=torch.long, device=dev)
    for i in range(n_iter):
        a = unroll(sampler.sample(m, generator).to(dev), n_blocks)
        codebook, codes, empty = em_step(a, w, codebook, generator, eps)
        if log is not None:
            log(i, em_objective(eval_a, w, codebook, codes), empty)
    return codebook, codes


# -- size -----------------------------------------------------------------------------------


def pq_footprint(model: nn.Module, example: torch.Tensor | None = None):
    """What a product-quantized model stores, as both projects count it (BGD's
    ``quantize.py`` book-keeping and PQF's ``compute_model_nbits``, which agree): per PQ
    layer ``log2 k`` bits per code and the codebook in fp16; every other parameter (the
    first convolution, biases, BatchNorm's scale and shift) at 32 bits. BatchNorm's running
    statistics are not counted: both projects fold them into the scale and shift (their
    released files hold two vectors per BatchNorm). The reference (``fp32_bytes``) is every
    parameter of the uncompressed model at 32 bits, as both count it. BOPs count the PQ
    layers at 32 x 32: the codebooks are decoded into full-precision weights to run."""
    from .footprint import Footprint, LayerFootprint, count_macs

    macs = count_macs(model, example) if example is not None else {}
    layers: list[LayerFootprint] = []
    own: set[int] = set()
    total_bits = 0.0
    fp32_bits = 0.0
    for name, mod in model.named_modules():
        if isinstance(mod, PQ_LAYERS):
            code_bits = math.ceil(math.log2(mod.k)) if mod.k > 1 else 1
            bits = mod.n_subvectors * code_bits + mod.codebook.numel() * 16
            n_weights = math.prod(mod.weight_shape)
            own.add(id(mod.codebook))
            fp32_bits += n_weights * 32
            kind, wb = type(mod).__name__, code_bits
        elif isinstance(mod, (nn.Conv2d, nn.Linear)):
            n_weights = mod.weight.numel()
            bits = n_weights * 32
            own.add(id(mod.weight))
            fp32_bits += bits
            kind, wb = type(mod).__name__, 32
        else:
            continue
        if getattr(mod, "bias", None) is not None:
            bits += mod.bias.numel() * 32
            fp32_bits += mod.bias.numel() * 32
            own.add(id(mod.bias))
        m = macs.get(name, 0)
        layers.append(
            LayerFootprint(
                name=name, kind=kind, w_bits=wb, a_bits=32, params=n_weights, bytes=bits / 8, macs=m, bops=m * 32 * 32
            )
        )
        total_bits += bits
    for p in model.parameters():
        if id(p) in own:
            continue
        total_bits += p.numel() * 32
        fp32_bits += p.numel() * 32
    return Footprint(
        total_bytes=total_bits / 8,
        fp32_bytes=fp32_bits / 8,
        bops=sum(layer.bops for layer in layers),
        audit_ok=all(int(mod.codes.max()) < mod.k for _, mod in pq_layers(model)) if pq_layers(model) else True,
        layers=layers,
    )


class PQMethod(Method):
    """What BGD and PQF share: the layer plan (:meth:`plan`, each method's centroid rule),
    the swap to PQ layers, the regime as the leaderboard's notation, codebooks rounded to
    fp16 as both projects store them, and the size as both count it."""

    weight_bits = tuple(range(1, 16))  # W<b>: 2^b codewords per layer
    act_bits = (32,)

    def plan(self, model: nn.Module) -> dict[str, tuple[int, int]]:
        raise NotImplementedError

    def notation(self) -> str:
        return f"{self.options.regime} blocks"

    def prepare(self, model: nn.Module, ctx: MethodContext | None = None) -> nn.Module:
        return swap_layers(model, self.plan(model))

    def finalize(self, model: nn.Module) -> nn.Module:
        with torch.no_grad():
            for _, m in pq_layers(model):
                m.codebook.copy_(m.codebook.half().float())
        return model

    def footprint(self, model: nn.Module, example: torch.Tensor | None = None):
        return pq_footprint(model, example)
