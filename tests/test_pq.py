"""The product-quantization core (methods/pq.py) on fixed tensors with hand-computed values:
the two block layouts, the two centroid-count rules, one EM step, k-means, the PQ layers
and the size accounting."""

from __future__ import annotations

import math

import pytest
import torch
from qbench.methods.bgd import BGD
from qbench.methods.pq import (
    PQConv2d,
    PQLinear,
    bgd_centroids,
    centroid_means,
    columns_from_rows,
    decode,
    em_distances,
    em_step,
    kmeans,
    pq_footprint,
    pq_layers,
    pqf_centroids,
    rows_from_columns,
    subvectors,
    to_pq,
)
from qbench.methods.pqf import PQF
from torch import nn


def _bgd_unrolled(w: torch.Tensor, n_blocks: int) -> torch.Tensor:
    """BGD's layout, spelled as its code does it: W as (C_in k k) x C_out, cut into n_blocks
    row chunks laid side by side; column j is one subvector."""
    m = w.reshape(w.shape[0], -1).t()
    return torch.cat(m.chunk(n_blocks, dim=0), dim=1)


def test_row_and_column_layouts_hold_the_same_subvectors():
    w = torch.arange(8.0).reshape(2, 4)  # linear: C_out 2, C_in 4, blocks of 2
    rows = subvectors(w, 2)
    assert rows.tolist() == [[0, 1], [2, 3], [4, 5], [6, 7]]  # (o0,b0) (o0,b1) (o1,b0) (o1,b1)
    cols = _bgd_unrolled(w, 2).t()
    assert cols.tolist() == [[0, 1], [4, 5], [2, 3], [6, 7]]  # j = b * C_out + o
    # BGD assignments j -> PQF codes [o, b]
    assert rows_from_columns(torch.tensor([0, 1, 2, 3]), 2).tolist() == [[0, 2], [1, 3]]
    assert columns_from_rows(torch.tensor([[0, 2], [1, 3]])).tolist() == [0, 1, 2, 3]


def test_layouts_agree_on_a_convolution_and_decode_rebuilds_it():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 2, 3, 3, generator=g)  # C_out 3, rows of 18 = 2 blocks of 9
    rows = subvectors(w, 9)
    cols = _bgd_unrolled(w, 2).t()
    assignments = torch.arange(6)  # every column its own codeword, in BGD's order
    codes = rows_from_columns(assignments, 3)
    assert torch.equal(decode(cols, codes, w.shape), w)
    assert torch.equal(cols[codes.reshape(-1)], rows)


@pytest.mark.parametrize(
    ("n", "k", "bgd", "pqf_blocks", "pqf_cout", "pqf"),
    [
        (512, 256, 64, 8, 64, 128),  # ResNet-50 layer1.0.conv1 (64x64 1x1, blocks of 8): n/4 = 128
        (4096, 256, 256, 64, 64, 256),  # ResNet-18 layer1 convs: plenty of subvectors
        (100, 256, 16, 10, 10, 16),  # n/4 = 25: both 16
        (128000, 2048, 2048, 128, 1000, 2048),  # the ResNet-18 classifier
        (80, 2048, 16, 8, 10, 16),
    ],
)
def test_centroid_count_rules(n, k, bgd, pqf_blocks, pqf_cout, pqf):
    assert bgd_centroids(n, k) == bgd  # largest power of two strictly below n / 4
    assert pqf_centroids(pqf_blocks, pqf_cout, k) == pqf  # at or below


def test_bgd_rule_keeps_k_when_the_layer_is_tiny():
    """``bisect_left`` gives index 0 when n / 4 <= 1, and ``powers[-1]`` wraps to 2^15:
    the official code then keeps k (reproduced as it is)."""
    assert bgd_centroids(4, 256) == 256


def test_one_em_step_by_hand():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # G = A^T A = [[2, 1], [1, 2]]
    w = torch.tensor([[0.0, 0.0], [1.0, 0.0], [10.0, 10.0], [11.0, 10.0]])
    c = torch.tensor([[0.0, 0.0], [10.0, 10.0]])
    d = em_distances(a, w, c)
    # ||A (w - c)||^2 = (w - c)^T G (w - c)
    assert d[1].tolist() == pytest.approx([2.0, 542.0])
    assert d[3].tolist() == pytest.approx([2 * 121 + 2 * 110 + 2 * 100, 2.0])
    new, codes, empty = em_step(a, w, c, torch.Generator().manual_seed(0))
    assert codes.tolist() == [0, 0, 1, 1] and empty == 0
    assert torch.allclose(new, torch.tensor([[0.5, 0.0], [10.5, 10.0]]), atol=1e-5)  # A full rank: the means


def test_em_step_projects_on_the_activations_row_space():
    """``c = A^+ A mean``: with activations along the first axis only, the second coordinate
    of every codeword is projected away (BGD's solver, not the plain mean)."""
    a = torch.tensor([[1.0, 0.0], [2.0, 0.0]])
    w = torch.tensor([[0.0, 4.0], [2.0, 6.0], [10.0, 1.0]])
    c = torch.tensor([[0.0, 0.0], [10.0, 0.0]])
    new, codes, _ = em_step(a, w, c, torch.Generator().manual_seed(0))
    assert codes.tolist() == [0, 0, 1]
    assert torch.allclose(new, torch.tensor([[1.0, 0.0], [10.0, 0.0]]), atol=1e-5)


def test_em_step_splits_the_most_populated_cluster_for_an_empty_one():
    a = torch.eye(2)
    w = torch.tensor([[0.0, 0.0], [0.1, 0.0], [0.2, 0.0], [5.0, 5.0]])
    c = torch.tensor([[0.1, 0.0], [5.0, 5.0], [100.0, 100.0]])  # the third gets nothing
    new, codes, empty = em_step(a, w, c, torch.Generator().manual_seed(0), eps=1e-3)
    assert empty == 1
    assert sorted(torch.bincount(codes, minlength=3).tolist()) == [1, 1, 2]
    assert torch.isfinite(new).all()


def test_centroid_means_zero_an_empty_cluster():
    x = torch.tensor([[1.0, 1.0], [3.0, 3.0]])
    means = centroid_means(x, torch.tensor([0, 0]), 2)
    assert means.tolist() == [[2.0, 2.0], [0.0, 0.0]]  # PQF's update_codebook


@pytest.mark.parametrize("annealed", [False, True])
def test_kmeans_ends_on_a_fixed_point(annealed):
    """The returned codewords are the means of the returned clusters (the annealed variant's
    noise is scaled by (1 - i/n)^0.5: zero at its last update), each cluster's codeword is
    its members' nearest on well-separated data, and the error falls below the initial one."""
    g = torch.Generator().manual_seed(1)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    x = torch.cat([c + 0.1 * torch.randn(50, 2, generator=g) for c in centres])
    codebook, codes = kmeans(x, 4, 10, torch.Generator().manual_seed(0), annealed=annealed)
    assert codes.shape == (200,) and codebook.shape == (4, 2)
    assert torch.allclose(codebook, centroid_means(x, codes, 4), atol=1e-5)
    err = (codebook[codes] - x).pow(2).sum(1).mean()
    init = x[torch.randperm(200, generator=torch.Generator().manual_seed(0))[:4]]
    init_err = torch.cdist(x, init).pow(2).min(1).values.mean()
    assert err < init_err


def test_pq_layer_computes_the_source_until_compressed_then_the_codes():
    conv = nn.Conv2d(2, 3, 3, padding=1, bias=True)
    x = torch.randn(1, 2, 5, 5)
    ref = conv(x)
    pq = to_pq(conv, 4, 9)
    assert isinstance(pq, PQConv2d) and "weight" not in dict(pq.named_parameters())
    assert torch.allclose(pq(x), ref)
    codebook = torch.randn(4, 9)
    codes = torch.tensor([[0, 1], [2, 3], [3, 0]])
    pq.set_codes(codebook, codes)
    w = codebook[codes.reshape(-1)].reshape(3, 2, 3, 3)
    assert torch.allclose(pq(x), nn.functional.conv2d(x, w, conv.bias, padding=1))
    assert set(pq.state_dict()) == {"bias", "codebook", "codes", "compressed"}
    with pytest.raises(ValueError, match="outside the codebook"):
        pq.set_codes(codebook, codes + 2)


def test_size_is_counted_as_both_projects_count_it():
    """codes at log2 k bits, fp16 codebooks, every other parameter at 32 bits, BatchNorm
    statistics not counted; the reference is every parameter at 32 bits."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.Conv2d(8, 16, 3), nn.Flatten())
    model.add_module("fc", nn.Linear(16, 10))
    model[2] = to_pq(model[2], 256, 9)
    model.fc = to_pq(model.fc, 16, 4)
    model[2].set_codes(torch.zeros(256, 9), torch.zeros(16, 8, dtype=torch.long))
    model.fc.set_codes(torch.zeros(16, 4), torch.zeros(10, 4, dtype=torch.long))
    fp = pq_footprint(model)
    pq_conv = 16 * 8 * 8 + 256 * 9 * 16 + 16 * 32  # codes, codebook, bias
    pq_fc = 40 * 4 + 16 * 4 * 16 + 10 * 32
    other = 8 * 3 * 9 * 32 + 2 * 8 * 32  # first conv, BN scale and shift
    assert fp.total_bytes == (pq_conv + pq_fc + other) / 8
    assert fp.fp32_bytes == (8 * 27 + 16 + 16 * 72 + 16 + 160 + 10) * 4
    assert fp.audit_ok


@pytest.mark.parametrize("cls", [BGD, PQF])
def test_methods_plan_every_layer_but_the_first(cls):
    from qbench.harness.models import create_model

    model = create_model("resnet18", num_classes=1000, image_size=224)
    method = cls(8, 32, regime="large", block_pw=4)
    method.prepare(model)
    layers = dict(pq_layers(model))
    assert "conv1" not in layers and len(layers) == 20  # 16 3x3, 3 downsample, fc
    assert layers["layer1.0.conv1"].d == 18 and layers["layer2.0.downsample.0"].d == 4
    assert layers["fc"].d == 4 and layers["fc"].k == 2048 and isinstance(layers["fc"], PQLinear)
    assert method.notation() == "large blocks"
    assert math.prod(layers["layer4.1.conv2"].codes.shape) == 512 * 512 * 9 // 18


def test_pqf_permutes_its_own_layers_and_keeps_the_function():
    """The groups are traced through the PQ layers (Conv2d subclasses) of a prepared model;
    permuting them before k-means leaves the network's outputs unchanged."""
    from qbench.harness.models import create_model
    from qbench.methods.permute import permutation_groups, permute_model

    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=10, image_size=32)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
    PQF(8, 32, regime="large").prepare(model)
    groups = permutation_groups(model, x[:1])
    assert len(groups) == 12  # 9 inside the blocks, 3 residual streams
    sizes = {n: m.d for n, m in pq_layers(model)}
    records = permute_model(model, groups, lambda n, m: sizes.get(n), sls_iterations=50)
    assert any(r["permuted"] for r in records)
    with torch.no_grad():
        assert torch.allclose(model(x), ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
