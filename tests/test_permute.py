"""The PQF permutation step (qbench.methods.permute): groups, optimisation, invariance."""

from __future__ import annotations

import copy
import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
import yaml
from qbench.harness.models import create_model
from qbench.methods import permute
from qbench.methods.errors import QbenchError
from qbench.methods.permute import (
    Group,
    apply_permutation,
    cov_det,
    greedy_permutation,
    local_search,
    permutation_groups,
    permute_model,
)
from torch import nn

# The hand-written groups of the official code (uber-research/permute-quantize-finetune,
# config/train_resnet18.yaml and config/train_resnet50.yaml, key model.permutations),
# rewritten in YAML flow style.
RESNET18_GROUPS = """\
- [{parents: [layer1.0.conv1, layer1.0.bn1]}, {children: [layer1.0.conv2]}]
- [{parents: [layer1.1.conv1, layer1.1.bn1]}, {children: [layer1.1.conv2]}]
- [{parents: [layer2.0.conv1, layer2.0.bn1]}, {children: [layer2.0.conv2]}]
- [{parents: [layer2.1.conv1, layer2.1.bn1]}, {children: [layer2.1.conv2]}]
- [{parents: [layer3.0.conv1, layer3.0.bn1]}, {children: [layer3.0.conv2]}]
- [{parents: [layer3.1.conv1, layer3.1.bn1]}, {children: [layer3.1.conv2]}]
- [{parents: [layer4.0.conv1, layer4.0.bn1]}, {children: [layer4.0.conv2]}]
- [{parents: [layer4.1.conv1, layer4.1.bn1]}, {children: [layer4.1.conv2]}]
- [{parents: [conv1, bn1, layer1.0.conv2, layer1.0.bn2, layer1.1.conv2, layer1.1.bn2]}, {children:
    [layer1.0.conv1, layer1.1.conv1, layer2.0.conv1, layer2.0.downsample.0]}]
- [{parents: [layer2.0.downsample.0, layer2.0.downsample.1, layer2.0.conv2, layer2.0.bn2,
    layer2.1.conv2, layer2.1.bn2]}, {children: [layer2.1.conv1, layer3.0.conv1, layer3.0.downsample.0]}]
- [{parents: [layer3.0.downsample.0, layer3.0.downsample.1, layer3.0.conv2, layer3.0.bn2,
    layer3.1.conv2, layer3.1.bn2]}, {children: [layer3.1.conv1, layer4.0.conv1, layer4.0.downsample.0]}]
- [{parents: [layer4.0.downsample.0, layer4.0.downsample.1, layer4.0.conv2, layer4.0.bn2,
    layer4.1.conv2, layer4.1.bn2]}, {children: [layer4.1.conv1, fc]}]
"""

RESNET50_GROUPS = """\
- [{parents: [conv1, bn1]}, {children: [layer1.0.conv1, layer1.0.downsample.0]}]
- [{parents: [layer1.0.conv1, layer1.0.bn1]}, {children: [layer1.0.conv2]}]
- [{parents: [layer1.0.conv2, layer1.0.bn2]}, {children: [layer1.0.conv3]}]
- [{parents: [layer1.0.conv3, layer1.0.bn3, layer1.0.downsample.0, layer1.0.downsample.1,
    layer1.1.conv3, layer1.1.bn3, layer1.2.conv3, layer1.2.bn3]}, {children: [layer1.1.conv1,
    layer1.2.conv1, layer2.0.conv1, layer2.0.downsample.0]}]
- [{parents: [layer1.1.conv1, layer1.1.bn1]}, {children: [layer1.1.conv2]}]
- [{parents: [layer1.1.conv2, layer1.1.bn2]}, {children: [layer1.1.conv3]}]
- [{parents: [layer1.2.conv1, layer1.2.bn1]}, {children: [layer1.2.conv2]}]
- [{parents: [layer1.2.conv2, layer1.2.bn2]}, {children: [layer1.2.conv3]}]
- [{parents: [layer2.0.conv1, layer2.0.bn1]}, {children: [layer2.0.conv2]}]
- [{parents: [layer2.0.conv2, layer2.0.bn2]}, {children: [layer2.0.conv3]}]
- [{parents: [layer2.0.conv3, layer2.0.bn3, layer2.0.downsample.0, layer2.0.downsample.1,
    layer2.1.conv3, layer2.1.bn3, layer2.2.conv3, layer2.2.bn3, layer2.3.conv3, layer2.3.bn3]},
    {children: [layer2.1.conv1, layer2.2.conv1, layer2.3.conv1, layer3.0.conv1, layer3.0.downsample.0]}]
- [{parents: [layer2.1.conv1, layer2.1.bn1]}, {children: [layer2.1.conv2]}]
- [{parents: [layer2.1.conv2, layer2.1.bn2]}, {children: [layer2.1.conv3]}]
- [{parents: [layer2.2.conv1, layer2.2.bn1]}, {children: [layer2.2.conv2]}]
- [{parents: [layer2.2.conv2, layer2.2.bn2]}, {children: [layer2.2.conv3]}]
- [{parents: [layer2.3.conv1, layer2.3.bn1]}, {children: [layer2.3.conv2]}]
- [{parents: [layer2.3.conv2, layer2.3.bn2]}, {children: [layer2.3.conv3]}]
- [{parents: [layer3.0.conv1, layer3.0.bn1]}, {children: [layer3.0.conv2]}]
- [{parents: [layer3.0.conv2, layer3.0.bn2]}, {children: [layer3.0.conv3]}]
- [{parents: [layer3.0.conv3, layer3.0.bn3, layer3.0.downsample.0, layer3.0.downsample.1,
    layer3.1.conv3, layer3.1.bn3, layer3.2.conv3, layer3.2.bn3, layer3.3.conv3, layer3.3.bn3,
    layer3.4.conv3, layer3.4.bn3, layer3.5.conv3, layer3.5.bn3]}, {children: [layer3.1.conv1,
    layer3.2.conv1, layer3.3.conv1, layer3.4.conv1, layer3.5.conv1, layer4.0.conv1,
    layer4.0.downsample.0]}]
- [{parents: [layer3.1.conv1, layer3.1.bn1]}, {children: [layer3.1.conv2]}]
- [{parents: [layer3.1.conv2, layer3.1.bn2]}, {children: [layer3.1.conv3]}]
- [{parents: [layer3.2.conv1, layer3.2.bn1]}, {children: [layer3.2.conv2]}]
- [{parents: [layer3.2.conv2, layer3.2.bn2]}, {children: [layer3.2.conv3]}]
- [{parents: [layer3.3.conv1, layer3.3.bn1]}, {children: [layer3.3.conv2]}]
- [{parents: [layer3.3.conv2, layer3.3.bn2]}, {children: [layer3.3.conv3]}]
- [{parents: [layer3.4.conv1, layer3.4.bn1]}, {children: [layer3.4.conv2]}]
- [{parents: [layer3.4.conv2, layer3.4.bn2]}, {children: [layer3.4.conv3]}]
- [{parents: [layer3.5.conv1, layer3.5.bn1]}, {children: [layer3.5.conv2]}]
- [{parents: [layer3.5.conv2, layer3.5.bn2]}, {children: [layer3.5.conv3]}]
- [{parents: [layer4.0.conv1, layer4.0.bn1]}, {children: [layer4.0.conv2]}]
- [{parents: [layer4.0.conv2, layer4.0.bn2]}, {children: [layer4.0.conv3]}]
- [{parents: [layer4.1.conv1, layer4.1.bn1]}, {children: [layer4.1.conv2]}]
- [{parents: [layer4.1.conv2, layer4.1.bn2]}, {children: [layer4.1.conv3]}]
- [{parents: [layer4.2.conv1, layer4.2.bn1]}, {children: [layer4.2.conv2]}]
- [{parents: [layer4.2.conv2, layer4.2.bn2]}, {children: [layer4.2.conv3]}]
- [{parents: [layer4.0.conv3, layer4.0.bn3, layer4.0.downsample.0, layer4.0.downsample.1,
    layer4.1.conv3, layer4.1.bn3, layer4.2.conv3, layer4.2.bn3]}, {children: [layer4.1.conv1,
    layer4.2.conv1, fc]}]
"""


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # these models are tiny: one thread is far faster than two on a shared, busy CPU
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _as_sets(groups) -> set:
    return {(frozenset(g.parents), frozenset(g.children)) for g in groups}


def _official(text: str) -> set:
    return {(frozenset(p["parents"]), frozenset(c["children"])) for p, c in yaml.safe_load(text)}


def _pqf_subvector_size(large: bool = True):
    """PQF's sizes: d=4 for pointwise convs and linears, k*k (or 2*k*k: "large") for kxk convs."""

    def size(name: str, module: nn.Module) -> int | None:
        if isinstance(module, nn.Linear):
            return 4 if module.in_features % 4 == 0 else None
        taps = module.kernel_size[0] * module.kernel_size[1]
        d = 4 if taps == 1 else taps * (2 if large else 1)
        return d if module.in_channels * taps % d == 0 else None

    return size


def _randomize_norms(model: nn.Module, seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.weight.data = torch.rand(n, generator=gen) + 0.5
            m.bias.data = torch.randn(n, generator=gen) * 0.2
            m.running_mean = torch.randn(n, generator=gen) * 0.2
            m.running_var = torch.rand(n, generator=gen) + 0.5
        elif isinstance(m, nn.Linear | nn.Conv2d) and m.bias is not None:
            m.bias.data = torch.randn(m.bias.shape, generator=gen) * 0.1
    return model.eval()


class Zoo(nn.Module):
    """Functional ops, a squeeze-excitation, a residual, spatial attention and a view to (N, C)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.se1 = nn.Conv2d(8, 4, 1)
        self.se2 = nn.Conv2d(4, 8, 1)
        self.spatial = nn.Conv2d(8, 1, 1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        y = self.conv2(x)
        s = torch.sigmoid(self.se2(F.relu(self.se1(F.adaptive_avg_pool2d(y, 1)))))
        y = y * s + x
        y = y * torch.sigmoid(self.spatial(y))
        z = F.adaptive_avg_pool2d(F.max_pool2d(y, 2), 1)
        return self.fc(z.view(z.size(0), -1))


ZOO_GROUPS = [
    Group(["conv1", "bn1", "conv2", "se2"], ["conv2", "se1", "spatial", "fc"]),
    Group(["se1"], ["se2"]),
]

MODELS = {
    "resnet18": (lambda: torchvision.models.resnet18(num_classes=10), (1, 3, 32, 32)),
    "resnet20": (lambda: create_model("resnet20", num_classes=10, image_size=32), (1, 3, 16, 16)),
    "resnet20_pad": (lambda: create_model("resnet20", num_classes=10, image_size=32, shortcut="pad"), (1, 3, 16, 16)),
    "small_cnn": (lambda: create_model("small_cnn", num_classes=10, image_size=8, in_channels=1), (2, 1, 8, 8)),
    "zoo": (Zoo, (2, 3, 16, 16)),
}


def _same(out: torch.Tensor, reference: torch.Tensor) -> bool:
    # float32 sums in another channel order: relative 1e-5, absolute at the scale of the outputs
    return torch.allclose(out, reference, rtol=1e-5, atol=1e-5 * reference.abs().max().item())


@functools.cache
def _pristine(name: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    factory, shape = MODELS[name]
    return _randomize_norms(factory(), 0), torch.randn(shape)


def _build(name: str) -> tuple[nn.Module, torch.Tensor]:
    """A fresh copy of model ``name`` (eval mode, non-trivial BatchNorm statistics) and an input."""
    model, x = _pristine(name)
    return copy.deepcopy(model), x.clone()


# ---------------------------------------------------------------------------------------
# Groups
# ---------------------------------------------------------------------------------------


def test_resnet18_groups_equal_the_official_configuration():
    with torch.device("meta"):  # shapes are all tracing needs
        model = torchvision.models.resnet18()
    groups = permutation_groups(model, torch.randn(1, 3, 32, 32, device="meta"))
    assert len(groups) == 12
    assert _as_sets(groups) == _official(RESNET18_GROUPS)


def test_resnet50_groups_equal_the_official_configuration():
    with torch.device("meta"):
        model = torchvision.models.resnet50()
    groups = permutation_groups(model, torch.randn(1, 3, 32, 32, device="meta"))
    assert len(groups) == 37
    assert _as_sets(groups) == _official(RESNET50_GROUPS)


def test_cifar_resnet20_groups():
    conv = permutation_groups(*_build("resnet20"))
    pad = permutation_groups(*_build("resnet20_pad"))
    inner = {
        (frozenset({f"layer{s}.{b}.conv1", f"layer{s}.{b}.bn1"}), frozenset({f"layer{s}.{b}.conv2"}))
        for s in (1, 2, 3)
        for b in range(3)
    }
    stage3 = (
        frozenset(
            {"layer3.0.downsample.0", "layer3.0.downsample.1"}
            | {f"layer3.{b}.{n}" for b in range(3) for n in ("conv2", "bn2")}
        ),
        frozenset({"layer3.1.conv1", "layer3.2.conv1", "fc"}),
    )
    assert len(conv) == 12 and inner < _as_sets(conv) and stage3 in _as_sets(conv)
    # zero-padded shortcuts slice and pad the residual streams: only the blocks' inner spaces remain
    assert _as_sets(pad) == inner


def test_small_cnn_and_zoo_groups():
    groups = permutation_groups(*_build("small_cnn"))
    assert [(g.parents, g.children) for g in groups] == [
        (["features.0", "features.1"], ["features.3"]),
        (["features.3", "features.4"], ["features.7"]),
        (["features.7", "features.8"], ["fc"]),
    ]
    assert _as_sets(permutation_groups(*_build("zoo"))) == _as_sets(ZOO_GROUPS)


class Cat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)
        self.c, self.bn, self.d = nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.d(F.relu(self.bn(self.c(torch.cat([self.a(x), self.b(x)], 1)))))


class Depthwise(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.dw, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 3, groups=8), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.b(self.dw(self.a(x)))


class SpatialFlatten(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.fc = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1), nn.Linear(16, 2)

    def forward(self, x):  # 2x2 map: flatten mixes channels with space
        return self.fc(torch.flatten(F.relu(self.b(self.a(x))), 1))


class Leaky(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.bn, self.b = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1)

    def forward(self, x):  # the hidden features are returned too
        h = F.relu(self.bn(self.a(x)))
        return self.b(h), h


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        (Cat(), [Group(["c", "bn"], ["d"])]),
        (Depthwise(), []),
        (SpatialFlatten(), [Group(["a"], ["b"])]),
        (Leaky(), []),
    ],
)
def test_paths_that_move_channels_drop_the_group(model, expected):
    assert permutation_groups(model, torch.randn(1, 3, 2, 2)) == expected


def test_untraceable_model_has_no_groups():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 1)

        def forward(self, x):
            h = self.a(x)
            return self.b(h) if h.sum() > 0 else self.b(-h)

    assert permutation_groups(Branchy(), torch.randn(1, 3, 4, 4)) == []


def test_tracing_leaves_batchnorm_statistics_and_mode_alone():
    model, x = _build("small_cnn")
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    permutation_groups(model, x)
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ---------------------------------------------------------------------------------------
# The network function is unchanged
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(MODELS))
def test_random_permutations_keep_the_outputs(name):
    model, x = _build(name)
    with torch.no_grad():
        reference = model(x)
    groups = permutation_groups(model, x)
    assert groups
    weights = {n: p.clone() for n, p in model.named_parameters()}
    gen = torch.Generator().manual_seed(1)
    for group in groups:
        width = dict(model.named_modules())[group.children[0]].weight.shape[1]
        apply_permutation(model, group, torch.randperm(width, generator=gen).tolist())
    assert any(not torch.equal(weights[n], p) for n, p in model.named_parameters())
    with torch.no_grad():
        assert _same(model(x), reference)


@pytest.mark.parametrize("name", ["resnet18", "resnet20", "resnet20_pad", "small_cnn", "zoo"])
def test_optimised_permutations_keep_the_outputs_and_lower_cov_det(name):
    model, x = _build(name)
    with torch.no_grad():
        reference = model(x)
    params = dict(model.named_parameters())
    groups = permutation_groups(model, x)
    records = permute_model(model, groups, _pqf_subvector_size(), sls_iterations=40, seed=0)
    assert len(records) == len(groups)
    optimised = [r for r in records if r["child"] is not None]
    assert optimised and any(r["permuted"] for r in optimised)
    for r in optimised:
        assert r["log_cov_det_after"] <= r["log_cov_det_before"]
        assert r["cov_det_after"] <= r["cov_det_before"] * (1 + 1e-9)
    assert all(params[n] is p for n, p in model.named_parameters())  # same Parameter objects
    with torch.no_grad():
        assert _same(model(x), reference)


def test_permute_model_is_reproducible_for_a_seed():
    def run(seed):
        model, x = _build("zoo")
        permute_model(model, permutation_groups(model, x), _pqf_subvector_size(), sls_iterations=30, seed=seed)
        return model.state_dict()

    a, b, c = run(0), run(0), run(1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_only_optimizable_children_are_optimised():
    model, x = _build("small_cnn")
    # d = k*k for 3x3 convs (PQF's small blocks) cannot gain: only the classifier's group is searched
    records = permute_model(model, permutation_groups(model, x), _pqf_subvector_size(large=False), sls_iterations=20)
    assert [r["child"] for r in records] == [None, None, "fc"]
    assert not records[0]["permuted"] and records[2]["subvector_size"] == 4


def test_identity_is_kept_when_the_permutation_is_worse(monkeypatch):
    # columns 0,1 and 2,3 are near copies: the identity pairs them in one subvector (tiny det)
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(64, 2, generator=gen, dtype=torch.float64)
    noise = 0.01 * torch.randn(64, 4, generator=gen, dtype=torch.float64)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 64)).double()
    model[2].weight.data = base.repeat_interleave(2, dim=1) + noise
    before = {k: v.clone() for k, v in model.state_dict().items()}
    monkeypatch.setattr(permute, "find_permutation", lambda *args: [0, 2, 1, 3])
    (record,) = permute_model(model, [Group(["0"], ["2"])], lambda n, m: 2)
    assert record["child"] == "2" and not record["permuted"]
    assert record["cov_det_after"] == record["cov_det_before"]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_mismatched_group_is_an_error():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Conv2d(4, 8, 1), nn.Conv2d(8, 2, 1))
    with pytest.raises(QbenchError, match="does not fit"):
        apply_permutation(model, Group(["0"], ["2"]), list(range(4)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_permute_model_on_cuda():
    model, x = _build("resnet20")
    model, x = model.cuda().double(), x.cuda().double()  # float32 convolutions may run in TF32 there
    with torch.no_grad():
        reference = model(x)
    permute_model(model, permutation_groups(model, x), _pqf_subvector_size(), sls_iterations=20)
    with torch.no_grad():
        assert _same(model(x), reference)


# ---------------------------------------------------------------------------------------
# The optimisation steps
# ---------------------------------------------------------------------------------------


def test_cov_det_is_the_determinant_of_the_covariance():
    x = np.random.default_rng(0).standard_normal((50, 3))
    assert cov_det(x) == pytest.approx(np.linalg.det(np.cov(x.T)), rel=1e-12)
    assert cov_det(torch.from_numpy(x).float()) == pytest.approx(cov_det(x), rel=1e-5)


def test_greedy_fills_the_least_variant_bucket_and_interleaves():
    # two output rows: column variances (a-b)^2/2 = 0.5, 8, 2, 0.125; d=2 -> 2 buckets of 2
    w = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 4.0, 2.0, 0.5]])
    # order by variance: 1, 2, 0, 3. Buckets start at variance 1: 1 -> b0 (tie, first; var 8),
    # 2 -> b1 (var 2), 0 -> b1 (var 2 < 8; b1 = [2, 0] full, closed first), 3 -> b0 = [1, 3].
    assert greedy_permutation(w, 2) == [2, 1, 0, 3]
    # small weights (variance < 1): buckets fill one after the other in decreasing variance order
    small = torch.tensor([[0.0] * 4, [0.1, 0.4, 0.2, 0.3]])  # order 1, 3, 2, 0
    assert greedy_permutation(small, 2) == [1, 2, 3, 0]
    assert greedy_permutation(small[:, :, None, None], 2) == [1, 2, 3, 0]


def test_greedy_on_3x3_ranks_channels_by_their_taps_cov_det():
    gen = torch.Generator().manual_seed(0)
    scales = torch.tensor([0.01, 0.05, 0.02, 0.04, 0.03, 0.06])
    w = torch.randn(32, 6, 3, 3, generator=gen) * scales[None, :, None, None]
    # order 5, 1, 3, 4, 2, 0 -> b0 = [5, 1, 3], b1 = [4, 2, 0], interleaved
    assert greedy_permutation(w, 18) == [5, 4, 1, 2, 3, 0]
    with pytest.raises(QbenchError, match="multiple of kh\\*kw"):
        greedy_permutation(w, 6)


def _naive_local_search(w: np.ndarray, d: int, n_iter: int, start, rng) -> list[int]:
    """The official loop: a full np.cov + det per candidate swap."""
    c_in = w.shape[1]
    perm = list(start)
    best = np.linalg.det(np.cov(w[:, perm].reshape(-1, d), rowvar=False))
    for i, j in rng.integers(c_in, size=(n_iter, 2)):
        candidate = perm.copy()
        candidate[i], candidate[j] = candidate[j], candidate[i]
        value = np.linalg.det(np.cov(w[:, candidate].reshape(-1, d), rowvar=False))
        if value < best:
            perm, best = candidate, value
    return perm


@pytest.mark.parametrize(
    ("shape", "d"),
    [((6, 8, 3, 3), 18), ((12, 16), 4), ((5, 8, 3, 3), 6), ((7, 6, 2, 2), 8), ((4, 12, 1, 3), 2)],
)
def test_local_search_makes_the_naive_decisions(shape, d):
    w = np.random.default_rng(3).standard_normal(shape)
    w4 = w.reshape(*shape, 1, 1) if w.ndim == 2 else w
    start = np.random.default_rng(4).permutation(shape[1]).tolist()
    fast = local_search(torch.from_numpy(w), d, 300, start, np.random.default_rng(5))
    assert fast == _naive_local_search(w4, d, 300, start, np.random.default_rng(5))
    assert fast != start
    assert cov_det(w4[:, fast].reshape(-1, d)) < cov_det(w4[:, start].reshape(-1, d))


def test_local_search_is_reproducible_for_a_seed():
    w = torch.randn(16, 32, generator=torch.Generator().manual_seed(0))
    a = local_search(w, 4, 200, None, np.random.default_rng(7))
    assert a == local_search(w, 4, 200, None, np.random.default_rng(7)) == local_search(w, 4, 200, None, 7)
    assert a != local_search(w, 4, 200, None, np.random.default_rng(8))
    assert sorted(a) == list(range(32))
    assert local_search(w, 4, 0, a[::-1], 7) == a[::-1]


def test_bad_subvector_size_is_an_error():
    with pytest.raises(QbenchError, match="does not divide"):
        local_search(torch.randn(4, 6), 4, 10)
    model = nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 2))
    with pytest.raises(QbenchError, match="^2: subvector size d=4 does not divide"):
        permute_model(model, [Group(["0"], ["2"])], lambda n, m: 4)
