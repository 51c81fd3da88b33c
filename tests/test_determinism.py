"""CPU evaluation is deterministic (``qbench.harness.determinism``): bit-identical logits
whatever the thread count or the oneDNN setting, so that a quantized network's top-1 does
not move with the machine's load.

The synthetic tests need no data: an exact sum that float32 gets right or wrong depending
on the order of its terms (the boundary case in its purest form), and a randomly
initialised APoT W4A4 ResNet-20. One test repeats the check on the first images of the
released 4-bit APoT checkpoint and skips without ``../shared/data``.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from qbench.harness.determinism import deterministic_cpu


@pytest.fixture(autouse=True)
def _restore_torch_settings():
    threads = torch.get_num_threads()
    mkldnn = torch.backends.mkldnn.enabled
    yield
    torch.set_num_threads(threads)
    torch.backends.mkldnn.set_flags(mkldnn, None, None, None)


def _flags() -> tuple[int, bool, bool]:
    return torch.get_num_threads(), torch.backends.mkldnn.enabled, torch._C._get_nnpack_enabled()


def test_settings_are_pinned_and_restored():
    torch.set_num_threads(2)
    before = _flags()
    with deterministic_cpu():
        assert _flags() == (1, False, False)
    assert _flags() == before
    with pytest.raises(RuntimeError, match="boom"):
        with deterministic_cpu(threads=None):
            assert torch.get_num_threads() == 2
            raise RuntimeError("boom")
    assert _flags() == before
    assert torch.equal(torch.ones(3).sum(), torch.tensor(3.0))  # the function mode is gone


# --- the boundary case: an exact sum whose float32 value depends on the order ------------

#: three channels whose products sum to exactly 1; in float32, 2**25 + 1 rounds to 2**25,
#: so an order that does not cancel the two big terms first gives 0
TERMS = (2.0**25, 1.0, -(2.0**25))


def _conv_sums(order: tuple[int, ...]) -> torch.Tensor:
    """``conv2d`` (1x1) and ``linear`` of the three terms, channels in ``order``."""
    x = torch.tensor([TERMS[i] for i in order]).view(1, 3, 1, 1).expand(4, 3, 5, 5).contiguous()
    w = torch.ones(8, 3, 1, 1)
    conv = F.conv2d(x, w)
    lin = F.linear(x[:, :, 0, 0], w[:, :, 0, 0])
    return torch.cat([conv.flatten(), lin.flatten()])


def test_float32_sums_depend_on_their_order():
    """Why pinning is needed: the exact sum is 1 (a quantizer rounding at 0.5 gives 1), but
    float32 gives 0 for some orders of the same terms (whatever the backend)."""
    results = [_conv_sums(order) for order in itertools.permutations(range(3))]
    assert any(not bool((r == 1).all()) for r in results)


def test_pinned_sums_are_exact_in_every_order():
    torch.set_num_threads(2)
    for order in itertools.permutations(range(3)):
        with deterministic_cpu():
            r = _conv_sums(order)
        assert r.dtype == torch.float32
        assert bool((r == 1).all()), (order, r)
        with deterministic_cpu(threads=2):
            assert bool((_conv_sums(order) == 1).all())


def test_pinned_convolutions_do_not_depend_on_the_batch():
    """Batched convolutions are evaluated a few images at a time (``CHUNK_BYTES``); each
    image's result is the float64 one rounded, whatever batch it came in."""
    from qbench.harness.determinism import CHUNK_BYTES

    g = torch.Generator().manual_seed(3)
    x = torch.randn(24, 16, 32, 32, generator=g)
    w = torch.randn(8, 16, 3, 3, generator=g)
    assert 16 * 32 * 32 * 9 * 8 * 24 > CHUNK_BYTES  # the batch is split
    with deterministic_cpu():
        whole = F.conv2d(x, w, padding=1, stride=2)
        single = torch.cat([F.conv2d(x[i : i + 1], w, padding=1, stride=2) for i in range(24)])
        unbatched = F.conv2d(x[5], w, padding=1, stride=2)
    assert whole.dtype == torch.float32 and whole.shape == (24, 8, 16, 16)
    assert torch.equal(whole, single) and torch.equal(whole[5], unbatched)
    assert torch.equal(whole, F.conv2d(x.double(), w.double(), padding=1, stride=2).float())


def test_pinned_reductions_do_not_depend_on_threads():
    """The mean of a 64x64x3x3 weight (36,864 elements, above the 32,768 grain size) is split
    among threads in float32; pinned, it is the same with 1 and 2 threads."""
    w = torch.randn(64, 64, 3, 3, generator=torch.Generator().manual_seed(0))
    stats = []
    for threads in (1, 2):
        with deterministic_cpu(threads=threads):
            stats.append(torch.stack([w.mean(), w.std(), w.sum(), torch.mean(w), *torch.std_mean(w)]))
    assert stats[0].dtype == torch.float32
    assert torch.equal(stats[0], stats[1])
    assert stats[0][0].item() == w.double().mean().float().item()


def test_other_dtypes_pass_through():
    x = torch.randn(4, 3, dtype=torch.float64)
    with deterministic_cpu():
        assert F.linear(x, torch.ones(2, 3, dtype=torch.float64)).dtype == torch.float64
        assert x.sum(dtype=torch.float32).dtype == torch.float32
        assert torch.ones(3, dtype=torch.int64).sum().dtype == torch.int64


# --- a quantized network ------------------------------------------------------------------


def _apot_resnet20(bits: int = 4):
    from qbench.harness.models import create_model
    from qbench.methods import get_method

    torch.manual_seed(0)
    net = create_model("resnet20", num_classes=10, in_channels=3, image_size=32, where="test")
    method = get_method("apot", "test")(bits, bits)
    net = method.prepare(net, None)
    return method, net


def _logits(net, x: torch.Tensor, **pin) -> torch.Tensor:
    with torch.no_grad(), deterministic_cpu(**pin):
        return net(x)


def test_quantized_network_logits_are_bit_identical_across_threads_and_backends():
    method, net = _apot_resnet20()
    net = method.finalize(net).eval()
    x = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    runs = {}
    for threads, mkldnn in ((1, True), (2, True), (2, False)):
        torch.set_num_threads(threads)
        torch.backends.mkldnn.set_flags(mkldnn, None, None, None)
        runs[(threads, mkldnn)] = _logits(net, x)
    runs["pinned with 2 threads"] = _logits(net, x, threads=2)
    first = runs[(1, True)]
    for key, logits in runs.items():
        assert torch.equal(logits, first), key


def test_evaluate_is_deterministic_on_the_cpu():
    """``train.evaluate`` pins the CPU path: the same loss (a float64 sum of every logit's
    contribution) with 1 and 2 threads and with oneDNN on or off."""
    from qbench.harness.data.base import TensorSplit
    from qbench.harness.train import evaluate

    try:
        from qbench.methods.recipe import Recipe
    except ImportError:  # before the recipe moved
        from qbench.harness.suite import Recipe

    method, net = _apot_resnet20()
    net = method.finalize(net)
    g = torch.Generator().manual_seed(2)
    split = TensorSplit(
        torch.randint(0, 256, (96, 3, 32, 32), generator=g, dtype=torch.uint8),
        torch.randint(0, 10, (96,), generator=g),
        (0.491, 0.482, 0.447),
        (0.247, 0.243, 0.262),
    )
    recipe = Recipe(train=False, eval_batch_size=32, amp=False, channels_last=False)
    results = []
    for threads, mkldnn in ((1, True), (2, True), (2, False)):
        torch.set_num_threads(threads)
        torch.backends.mkldnn.set_flags(mkldnn, None, None, None)
        results.append(evaluate(net, split, recipe, torch.device("cpu")))
        assert _flags()[:2] == (threads, mkldnn)  # restored
    assert results[0].n == 96
    assert all(r == results[0] for r in results), results


# --- the released 4-bit APoT checkpoint -------------------------------------------------


def test_apot_4bit_checkpoint_slice_is_bit_identical(shared_data):
    ckpt = shared_data / "apot" / "res20_4bit.pth.tar"
    jpeg = shared_data / "cifar10-jpeg"
    if not ckpt.is_file() or not (jpeg / "test.tar.gz").is_file():
        pytest.skip(f"APoT checkpoint or CIFAR-10-JPEG not found under {shared_data}")
    from qbench.harness.data import load_dataset
    from qbench.methods.apot import import_checkpoint

    data = load_dataset(
        "cifar10",
        None,
        "--dataset",
        path=str(jpeg),
        format="jpeg",
        mean=[0.491, 0.482, 0.447],
        std=[0.247, 0.243, 0.262],
    )
    x, _ = next(iter(data.splits["test"].batches(300, train=False, device=torch.device("cpu"))))
    method, net = _apot_resnet20(4)
    import_checkpoint(torch.load(ckpt, map_location="cpu", weights_only=True), net)
    net = method.finalize(net).eval()
    runs = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        runs.append(_logits(net, x))
    runs.append(_logits(net, x, threads=2))
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])
