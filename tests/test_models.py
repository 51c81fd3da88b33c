"""Models: the registry, shapes, a forward and backward pass, parameter counts from the
papers, channels_last, weights from a file or the torch hub cache, and the
pre-activation layout of EasyQuantization's ResNet-18."""

from __future__ import annotations

import pytest
import torch
from qbench.harness.errors import QbenchError
from qbench.harness.models import MODELS, create_model, first_last_layers
from torch import nn

# name -> (kwargs, parameter count, where the count comes from)
PAPER_COUNTS = {
    "resnet18": (dict(num_classes=1000, image_size=224), 11.7e6, 0.05e6),  # He et al.; torchvision
    "resnet34": (dict(num_classes=1000, image_size=224), 21.8e6, 0.05e6),
    "resnet50": (dict(num_classes=1000, image_size=224), 25.6e6, 0.05e6),
    "mobilenet_v2": (dict(num_classes=1000, image_size=224), 3.5e6, 0.05e6),  # Sandler et al.
    "preact_resnet18": (dict(num_classes=1000, image_size=224), 11.7e6, 0.05e6),
    "resnet20": (dict(num_classes=10, image_size=32), 0.27e6, 0.005e6),  # He et al. table 6
    "resnet56": (dict(num_classes=10, image_size=32), 0.85e6, 0.01e6),
}

# exact counts of the architectures as their papers' code defines them. Bayesian Bits'
# LeNet5Quantized (benchmarks/image_net/models/mnist_models.py) and VGGQuantized
# (benchmarks/image_net/models/cifar_models.py, the class --model vggquantized builds) were
# built with torch from the official repository (github.com/Qualcomm-AI-research/BayesianBits)
# in a one-off script, counting the weight, bias and folded-BN gamma/beta of every conv and
# linear layer: 582,026 and 12,979,082 (their quantizers hold no parameters at construction).
EXACT = {
    # 32*25+32 + 64*32*25+64 + 1024*512+512 + 512*10+10
    "lenet5": (dict(num_classes=10, in_channels=1, image_size=28), 582_026),
    # convs 4,574,592 + BN 3,584 + 8192*1024 + BN1d 2,048 + 1024*10+10
    "vgg7": (dict(num_classes=10, image_size=32), 12_979_082),
}

SMALL = {  # cheap shapes for the forward/backward check on a CPU
    "lenet5": dict(num_classes=10, in_channels=1, image_size=28),
    "vgg7": dict(num_classes=10, image_size=32),
    "resnet18": dict(num_classes=10, image_size=64, stem="imagenet"),
    "resnet34": dict(num_classes=10, image_size=64, stem="imagenet"),
    "resnet50": dict(num_classes=10, image_size=64, stem="imagenet"),
    "mobilenet_v2": dict(num_classes=10, image_size=64),
    "preact_resnet18": dict(num_classes=10, image_size=64, stem="imagenet"),
    "resnet20": dict(num_classes=10, image_size=32),
    "resnet56": dict(num_classes=10, image_size=32),
    "small_cnn": dict(num_classes=10, in_channels=1, image_size=8),
}


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_registry_holds_the_papers_models():
    assert set(SMALL) <= set(MODELS.names())
    with pytest.raises(QbenchError, match="did you mean 'resnet18'"):
        create_model("resnet81", num_classes=10)


@pytest.mark.parametrize("name", sorted(PAPER_COUNTS))
def test_parameter_counts_match_the_papers(name):
    kwargs, count, tol = PAPER_COUNTS[name]
    assert abs(n_params(create_model(name, **kwargs)) - count) <= tol


@pytest.mark.parametrize("name", sorted(EXACT))
def test_exact_parameter_counts(name):
    kwargs, count = EXACT[name]
    assert n_params(create_model(name, **kwargs)) == count


@pytest.mark.parametrize("name", sorted(SMALL))
def test_forward_backward_and_channels_last(name):
    torch.manual_seed(0)
    kw = SMALL[name]
    m = create_model(name, **kw)
    x = torch.randn(2, kw.get("in_channels", 3), kw["image_size"], kw["image_size"])
    out = m(x)
    assert out.shape == (2, kw["num_classes"])
    out.square().mean().backward()
    grads = [p.grad for p in m.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    m.eval()
    with torch.no_grad():
        ref = m(x)
        cl = m.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(cl, ref, rtol=1e-4, atol=1e-4)
    first, last = first_last_layers(m)
    assert isinstance(m.get_submodule(first), nn.Conv2d)
    assert isinstance(m.get_submodule(last), nn.Linear)


def test_torchvision_resnet18_is_torchvision_at_224():
    from torchvision.models import resnet18

    ours, ref = create_model("resnet18", num_classes=1000, image_size=224), resnet18()
    assert [(k, v.shape) for k, v in ours.state_dict().items()] == [(k, v.shape) for k, v in ref.state_dict().items()]
    assert isinstance(ours.maxpool, nn.MaxPool2d) and ours.conv1.kernel_size == (7, 7)
    small = create_model("resnet18", num_classes=10, image_size=32)
    assert small.conv1.kernel_size == (3, 3) and isinstance(small.maxpool, nn.Identity)


def test_lenet5_and_vgg7_layouts():
    lenet = create_model("lenet5", num_classes=10, in_channels=1, image_size=28)
    convs = [m for m in lenet.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [
        (1, 32, (5, 5)),
        (32, 64, (5, 5)),
    ]
    assert [m.out_features for m in lenet.modules() if isinstance(m, nn.Linear)] == [512, 10]
    vgg = create_model("vgg7", num_classes=10, image_size=32)
    assert [c.out_channels for c in vgg.modules() if isinstance(c, nn.Conv2d)] == [
        128,
        128,
        256,
        256,
        512,
        512,
    ]
    assert [(m.in_features, m.out_features) for m in vgg.modules() if isinstance(m, nn.Linear)] == [
        (8192, 1024),
        (1024, 10),
    ]
    assert sum(isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)) for m in vgg.modules()) == 7


# per-layer MACs of one input as the official code counts them for its relative BOPs
# (mixed_precision_utils.get_per_layer_macs on the classes above, 1x28x28 and 3x32x32), in
# layer order; obtained once with the official repository, as the counts above
OFFICIAL_MACS = {
    "lenet5": (dict(num_classes=10, in_channels=1, image_size=28), [460_800, 3_276_800, 524_288, 5_120]),
    "vgg7": (
        dict(num_classes=10, image_size=32),
        [3_538_944, 150_994_944, 75_497_472, 150_994_944, 75_497_472, 150_994_944, 8_388_608, 10_240],
    ),
}


@pytest.mark.parametrize("name", sorted(OFFICIAL_MACS))
def test_macs_per_layer_match_the_official_bop_count(name):
    from qbench.methods.footprint import count_macs

    kwargs, expected = OFFICIAL_MACS[name]
    model = create_model(name, **kwargs)
    x = torch.zeros(1, kwargs.get("in_channels", 3), kwargs["image_size"], kwargs["image_size"])
    assert list(count_macs(model, x).values()) == expected


def test_lenet5_and_vgg7_module_order():
    """ReLU after every conv/linear but the last, then max-pooling; VGG-7's BN right after each
    conv and the 1024-unit linear (where the official layers fold it), no conv bias there."""
    lenet = create_model("lenet5", num_classes=10, in_channels=1, image_size=28)
    assert [type(m).__name__ for m in lenet.features] == ["Conv2d", "ReLU", "MaxPool2d"] * 2
    assert [type(m).__name__ for m in lenet.classifier] == ["Linear", "ReLU", "Linear"]
    assert all(m.bias is not None for m in lenet.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    vgg = create_model("vgg7", num_classes=10, image_size=32)
    block = ["Conv2d", "BatchNorm2d", "ReLU"]
    assert [type(m).__name__ for m in vgg.features] == (block * 2 + ["MaxPool2d"]) * 3
    assert [type(m).__name__ for m in vgg.classifier] == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    biased = [m.bias is not None for m in vgg.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert biased == [False] * 7 + [True]


def test_preact_resnet18_normalises_every_inner_convolution_input():
    """EasyQuantization's bacs order: each conv but the stem sees BN -> ReLU output, so a
    quantizer on its input gets a non-negative, normalised tensor."""
    torch.manual_seed(0)
    m = create_model("preact_resnet18", num_classes=10, image_size=64, stem="imagenet")
    seen = {}

    def hook(name):
        def fn(_mod, inputs):
            seen[name] = float(inputs[0].min())

        return fn

    for name, mod in m.named_modules():
        if isinstance(mod, nn.Conv2d):
            mod.register_forward_pre_hook(hook(name))
    m(torch.randn(2, 3, 64, 64))
    inner = {k: v for k, v in seen.items() if k != "conv1"}
    assert len(inner) == 16 + 3  # 16 block convolutions + 3 shortcut 1x1 convolutions
    assert all(v >= 0 for v in inner.values())
    assert seen["conv1"] < 0
    block = m.layer2[0]
    assert isinstance(block.shortcut[0], nn.AvgPool2d)
    assert [type(x) for x in block.shortcut[1:]] == [nn.BatchNorm2d, nn.ReLU, nn.Conv2d]
    assert block.bn1.num_features == 64 and block.bn2.num_features == 128
    # no BN/ReLU after the stem; BN (no ReLU) before the pooling head
    assert not isinstance(m.maxpool, nn.BatchNorm2d) and m.bn2.num_features == 512


def test_weights_from_a_local_file(tmp_path):
    torch.manual_seed(1)
    src = create_model("resnet18", num_classes=1000, image_size=224)
    path = tmp_path / "r18.pth.tar"
    torch.save({"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}, "epoch": 3}, path)
    m = create_model("resnet18", num_classes=1000, image_size=224, weights=str(path))
    assert torch.equal(m.conv1.weight, src.conv1.weight) and torch.equal(m.fc.bias, src.fc.bias)
    # another number of classes: everything but the classifier is loaded
    m10 = create_model("resnet18", num_classes=10, image_size=224, weights=str(path))
    assert torch.equal(m10.layer4[1].conv2.weight, src.layer4[1].conv2.weight)
    assert m10.fc.out_features == 10
    # a model it does not fit
    with pytest.raises(QbenchError, match="do not fit the model: missing"):
        create_model("resnet34", num_classes=1000, image_size=224, weights=str(path))
    with pytest.raises(QbenchError, match="does not exist"):
        create_model("resnet18", num_classes=1000, weights=str(tmp_path / "nope.pth"))


def test_torchvision_weights_from_the_hub_cache_or_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # the hub cache is then tmp_path/hub
    monkeypatch.setattr(
        torch.hub,
        "load_state_dict_from_url",
        lambda *a, **k: (_ for _ in ()).throw(OSError("offline")),
    )
    with pytest.raises(QbenchError, match=r"not in the torch hub cache .* put resnet18-f37072fd.pth"):
        create_model("resnet18", num_classes=1000, weights="IMAGENET1K_V1")
    with pytest.raises(QbenchError, match="unknown weights 'IMAGENET9'"):
        create_model("resnet18", num_classes=1000, weights="IMAGENET9")
    torch.manual_seed(2)
    src = create_model("resnet18", num_classes=1000)
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(src.state_dict(), tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth")
    m = create_model("resnet18", num_classes=1000, weights="DEFAULT")
    assert torch.equal(m.layer1[0].conv1.weight, src.layer1[0].conv1.weight)


def test_quantized_models_train_a_step():
    """The papers' nets under LSQ W4A4: forward, backward, finite gradients on the steps."""
    from qbench.methods import MethodContext, Recipe, get_method

    for name in ("lenet5", "preact_resnet18"):
        kw = SMALL[name]
        m = create_model(name, **kw)
        x = torch.randn(2, kw.get("in_channels", 3), kw["image_size"], kw["image_size"])
        ctx = MethodContext(
            device=torch.device("cpu"),
            recipe=Recipe(calib_batches=1),
            calib_batches=lambda x=x: iter([(x, None)]),
        )
        method = get_method("lsq")(4, 4)
        q = method.prepare(m, ctx)
        method.calibrate(q, ctx)
        q.train()
        q(x).logsumexp(1).mean().backward()
        steps = [p for n, p in q.named_parameters() if n.endswith(".step")]
        assert steps and all(p.grad is not None and torch.isfinite(p.grad).all() for p in steps)
