"""The EasyQuantization methods (DoReFa, PACT, LSQ, LQ-Net) and uniform through the method
API: registration, each paper's first/last-layer policy, options, PACT's alpha decay,
LQ-Net's ternary mode, and a short fine-tune on real digits with the bit audit."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from qbench.harness.data import load_dataset
from qbench.harness.models import create_model
from qbench.methods import METHODS, MethodContext, Recipe, get_method
from qbench.methods.dorefa import DoReFaAct, DoReFaWeight
from qbench.methods.lqnet import LQQuantizer
from qbench.methods.lsq import LSQQuantizer
from qbench.methods.modules import Identity, quant_layers
from qbench.methods.pact import PACTAct

NAMES = ["uniform", "lsq", "dorefa", "pact", "lqnet"]


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _ctx(data=None, **recipe) -> MethodContext:
    r = Recipe(**{"weight_decay": 1e-4, "calib_batches": 2, **recipe})
    cpu = torch.device("cpu")
    batches = (lambda: data.train.batches(64, train=False, device=cpu)) if data else (lambda: iter(()))
    return MethodContext(device=cpu, recipe=r, calib_batches=batches)


def _model():
    torch.manual_seed(0)
    return create_model("small_cnn", num_classes=10, in_channels=1, image_size=8, width=8)


def test_registered_with_papers():
    for name in NAMES + ["fp32"]:
        assert name in METHODS
    for name in NAMES:
        cls = get_method(name)
        assert cls.paper is not None and cls.paper.year >= 2016 and cls.paper.url
    for name in ["dorefa", "pact", "lqnet", "lsq"]:
        assert get_method(name).comment, f"{name} states its deviations"


@pytest.mark.parametrize(
    "name, layers",
    [
        # DoReFa (official code): FP weights at both ends, the last layer's input quantized
        ("dorefa", {"features.0": None, "features.3": (2, 2), "fc": (32, 2)}),
        ("pact", {"features.0": None, "features.3": (2, 2), "fc": None}),
        ("lqnet", {"features.0": None, "features.3": (2, 2), "fc": None}),
        ("lsq", {"features.0": (8, 8), "features.3": (2, 2), "fc": (8, 8)}),
    ],
)
def test_first_last_layer_policy(name, layers):
    model = get_method(name)(2, 2).prepare(_model(), _ctx())
    for layer, bits in layers.items():
        mod = model.get_submodule(layer)
        if bits is None:
            assert not hasattr(mod, "weight_quantizer"), layer
        else:
            assert (mod.w_bits, mod.a_bits) == bits, layer


def test_quantizer_kinds():
    kinds = {
        "dorefa": (DoReFaWeight, DoReFaAct),
        "pact": (DoReFaWeight, PACTAct),  # weights with DoReFa's quantizer, as the paper
        "lqnet": (LQQuantizer, LQQuantizer),
        "lsq": (LSQQuantizer, LSQQuantizer),
    }
    for name, (wq, aq) in kinds.items():
        model = get_method(name)(4, 4).prepare(_model(), _ctx())
        mod = model.get_submodule("features.3")
        assert isinstance(mod.weight_quantizer, wq) and isinstance(mod.act_quantizer, aq)


def test_options_are_validated():
    with pytest.raises(ValidationError):
        get_method("pact")(4, 4, alpha_init=-1.0)
    with pytest.raises(ValidationError):
        get_method("lqnet")(2, 2, tenary=True)
    with pytest.raises(ValidationError):
        get_method("dorefa")(2, 2, first_last="first")


def test_pact_alpha_decay_term():
    method = get_method("pact")(4, 4, alpha_init=2.0, alpha_decay=0.01)
    model = method.prepare(_model(), _ctx())
    alphas = [m.alpha for m in model.modules() if isinstance(m, PACTAct)]
    assert len(alphas) == 2
    loss = method.extra_loss(model)
    assert torch.isclose(loss, torch.tensor(0.5 * 0.01 * 2 * 4.0))
    loss.backward()
    assert all(torch.isclose(a.grad, torch.tensor(0.01 * 2.0)) for a in alphas)
    # default lambda_alpha: the recipe's weight decay
    method = get_method("pact")(4, 4, alpha_init=2.0)
    model = method.prepare(_model(), _ctx(weight_decay=5e-4))
    assert torch.isclose(method.extra_loss(model), torch.tensor(0.5 * 5e-4 * 2 * 4.0))


def test_lqnet_ternary_mode():
    model = get_method("lqnet")(2, 2, ternary=True).prepare(_model(), _ctx())
    qs = [m for m in model.modules() if isinstance(m, LQQuantizer)]
    assert qs and all(q.ternary and q.max_levels() == 3 and q.bits == 2 for q in qs)
    # only 2-bit quantizers become ternary
    model = get_method("lqnet")(4, 2, ternary=True).prepare(_model(), _ctx())
    mod = model.get_submodule("features.3")
    assert not mod.weight_quantizer.ternary and mod.act_quantizer.ternary


def _sgd(model, method, data, steps: int, lr: float) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    model.train()
    gen = torch.Generator().manual_seed(0)
    done = 0
    while done < steps:
        for x, y in data.train.batches(64, train=True, device=torch.device("cpu"), generator=gen):
            loss = torch.nn.functional.cross_entropy(model(x), y)
            extra = method.extra_loss(model)
            if extra is not None:
                loss = loss + extra
            opt.zero_grad()
            loss.backward()
            opt.step()
            done += 1
            if done == steps:
                return


def _accuracy(model, data) -> float:
    x, y = next(iter(data.test.batches(360, train=False, device=torch.device("cpu"))))
    model.eval()
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


@pytest.fixture(scope="module")
def baseline(digits):
    """A briefly trained full-precision small CNN (3 epochs), the methods' starting point."""
    model = _model()
    _sgd(model, get_method("fp32")(), digits, 66, 0.05)
    assert _accuracy(model, digits) > 0.6
    return model.state_dict()


@pytest.mark.parametrize("name", NAMES)
def test_short_finetune_on_digits_passes_the_audit(name, digits, baseline):
    """From the baseline: prepare, calibrate, 20 SGD steps at W2A2 on real digits,
    finalize: the quantized model still predicts, and every quantized weight tensor
    holds at most its allowed levels."""
    torch.manual_seed(0)
    method = get_method(name)(2, 2, **({"alpha_init": 3.0} if name == "pact" else {}))
    ctx = _ctx(digits)
    model = _model()
    model.load_state_dict(baseline)
    model = method.prepare(model, ctx)
    method.calibrate(model, ctx)
    _sgd(model, method, digits, 20, 0.01)
    model = method.finalize(model)
    acc = _accuracy(model, digits)
    assert acc > 0.3, f"{name} W2A2 learned nothing ({acc:.2f})"
    x = next(iter(digits.test.batches(1, train=False, device=torch.device("cpu"))))[0]
    fp = method.footprint(model, x)
    assert fp.audit_ok
    quantized = [lf for lf in fp.layers if lf.w_bits == 2]
    assert quantized and all(lf.distinct_max <= lf.levels_allowed for lf in quantized)
    assert fp.bops > 0 and fp.compression_ratio > 1
    for _, mod in quant_layers(model):
        if not isinstance(mod.weight_quantizer, Identity):
            assert mod.weight_quantizer.bits in (2, 8)
