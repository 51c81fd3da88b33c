"""``qbench bench``: how much a quantization method costs per training step.

For a model, one or more methods and bit-widths, times full training steps (forward,
loss, backward, optimizer step, the method's extra loss and per-step hook) against full
precision in the same process, on a fixed synthetic batch, the way the runner's loop
takes them (:mod:`qbench.harness.train`: bf16 autocast and channels_last on CUDA, SGD
with momentum). Each configuration runs eager and, where asked, under ``torch.compile``
(the model, fake-quantizers included; the optimizer step stays eager, as in the runner).

Timing: ``--warmup`` steps first (compilation, cuDNN autotuning, allocator growth),
then ``--steps`` steps, each bracketed by CUDA events (on the CPU, a host clock): the
median step time is the figure, ``images/s`` is batch size over it. Peak memory is the
most the CUDA caching allocator held at once over the timed steps. ``syncs/step`` counts
the operations of one eager step that wait for the GPU (``.item()``, ``bool(tensor)``,
host copies), which stall the pipeline and, under ``torch.compile``, break the graph.

``--dataset`` additionally times one whole training epoch of that dataset's training
split (its real batching and augmentation on the device included, evaluation
excluded), after one warm-up epoch.

Ratios are against the full-precision run of the same process: ``x FP`` against the
same mode (compiled against compiled), ``x FP eager`` against the eager baseline.
"""

from __future__ import annotations

import gc
import json
import math
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import date
from pathlib import Path

import click

from .errors import QbenchError
from .suite import parse_bits as suite_parse_bits
from .suite import parse_option_pairs

# torch is imported inside the functions: ``qbench --help`` and the other commands
# should not pay for it.

# input side and channels of the datasets a model is made for (others: ImageNet, 224, RGB)
NATIVE = {
    "resnet20": (32, 3),
    "resnet56": (32, 3),
    "vgg7": (32, 3),
    "lenet5": (28, 1),
    "small_cnn": (8, 1),
}


@dataclass
class BenchConfig:
    """What to measure: one model and batch shape, the configurations to compare."""

    model: str
    batch_size: int
    image_size: int
    num_classes: int
    in_channels: int = 3
    methods: list[tuple[str, int, int]] = field(default_factory=list)  # (method, w, a)
    method_options: dict = field(default_factory=dict)
    model_options: dict = field(default_factory=dict)
    modes: tuple[str, ...] = ("eager",)
    steps: int = 30
    warmup: int = 10
    amp: bool = True
    channels_last: bool = True
    compile_backend: str = "inductor"
    lr: float = 1e-3
    dataset: str | None = None
    data_root: str | None = None
    dataset_options: dict = field(default_factory=dict)


@dataclass
class BenchResult:
    label: str
    method: str
    w_bits: int
    a_bits: int
    mode: str
    step_ms: float = math.nan
    step_ms_p10: float = math.nan
    step_ms_p90: float = math.nan
    images_per_s: float = math.nan
    peak_mem_mib: float = math.nan
    warmup_s: float = math.nan
    syncs_per_step: int | None = None
    epoch_s: float | None = None
    epoch_images: int | None = None
    x_fp: float | None = None
    x_fp_eager: float | None = None
    mem_x_fp: float | None = None
    error: str = ""


def parse_bits(text: str) -> tuple[int, int]:
    """``W4A4`` -> (4, 4), with the suite's rules (bits in 1..32)."""
    try:
        b = suite_parse_bits(text)
    except ValueError as e:
        raise QbenchError(str(e), "--bits") from None
    return b.w, b.a


def environment(device) -> dict:
    import torch

    env = {
        "date": date.today().isoformat(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
    }
    if device.type == "cuda":
        env["cuda"] = torch.version.cuda
        env["gpu_memory_gib"] = round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
    return env


def _build(cfg: BenchConfig, method_name: str, w: int, a: int, device, example):
    """The model under ``method`` on ``device``, calibrated on the example batch, with the
    runner's optimizer; returns (model, method, optimizer, recipe)."""
    import torch
    from qbench.methods import MethodContext, Recipe, get_method

    from .models import create_model
    from .train import default_param_groups, make_optimizer

    model = create_model(
        cfg.model,
        num_classes=cfg.num_classes,
        in_channels=cfg.in_channels,
        image_size=cfg.image_size,
        **cfg.model_options,
    )
    method = get_method(method_name)(w, a, **(cfg.method_options if method_name != "fp32" else {}))
    recipe = Recipe(
        calib_batches=1,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        epochs=1,
        weight_decay=5e-5,
        momentum=0.9,
        nesterov=True,
        amp=cfg.amp,
        channels_last=cfg.channels_last,
    )
    ctx = MethodContext(device=device, recipe=recipe, calib_batches=lambda: iter([example]))
    model = method.prepare(model, ctx)
    model.to(device)
    if cfg.channels_last and device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    method.calibrate(model, ctx)
    model.train()
    groups = method.param_groups(model, recipe) or default_param_groups(model, recipe.weight_decay, recipe.wd_on)
    opt = make_optimizer(groups, recipe)
    return model, method, opt, recipe


def _step_fn(model, fwd: Callable, method, opt, recipe, device):
    """The runner's training step (:func:`qbench.harness.train.make_train_step`) followed by
    the method's per-step hook, as one call."""
    from .train import make_train_step

    train_step = make_train_step(model, opt, recipe, device, method.extra_loss, forward=fwd)
    counter = {"step": 0}

    def step(x, y):
        loss, _ = train_step(x, y)
        counter["step"] += 1
        method.on_step(model, counter["step"])
        return loss

    return step


def _count_syncs(step: Callable, x, y) -> int | None:
    """Operations of one step that synchronise with the GPU (CUDA only)."""
    import torch

    if x.device.type != "cuda":
        return None
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step(x, y)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    return sum("synchroniz" in str(w.message).lower() for w in caught)


def _time_steps(step: Callable, x, y, n: int, device) -> list[float]:
    import torch

    times = []
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
        for start, end in events:
            start.record()
            step(x, y)
            end.record()
        torch.cuda.synchronize()
        times = [s.elapsed_time(e) for s, e in events]
    else:
        for _ in range(n):
            t = time.perf_counter()
            step(x, y)
            times.append((time.perf_counter() - t) * 1000)
    return times


def _time_epoch(step: Callable, data, cfg: BenchConfig, device) -> tuple[float, int]:
    """Seconds for one pass over the training split (after a warm-up pass)."""
    import torch

    cl = cfg.channels_last and device.type == "cuda"
    g = torch.Generator().manual_seed(0)

    def one_epoch() -> int:
        n = 0
        for x, y in data.train.batches(
            cfg.batch_size, train=True, device=device, generator=g, channels_last=cl, drop_last=True
        ):
            step(x, y)
            n += y.shape[0]
        return n

    one_epoch()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    n = one_epoch()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t, n


def _free(device) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_bench(cfg: BenchConfig, device, log: Callable[[str], None] = lambda s: None) -> list[BenchResult]:
    """Measure every (configuration, mode); the full-precision baseline first."""
    import torch

    torch.manual_seed(0)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    data = None
    if cfg.dataset:
        from .data import load_dataset

        data = load_dataset(cfg.dataset, cfg.data_root, **cfg.dataset_options)
    x = torch.randn(cfg.batch_size, cfg.in_channels, cfg.image_size, cfg.image_size, device=device)
    if cfg.channels_last and device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, cfg.num_classes, (cfg.batch_size,), device=device)
    configs = [("fp32", 32, 32)] + [c for c in cfg.methods if c[0] != "fp32"]
    results: list[BenchResult] = []
    for mode in cfg.modes:
        for name, w, a in configs:
            label = "fp32" if name == "fp32" else f"{name} W{w}A{a}"
            res = BenchResult(label, name, w, a, mode)
            log(f"{label} ({mode}) ...")
            model = opt = step = None
            try:
                model, method, opt, recipe = _build(cfg, name, w, a, device, (x, y))
                if mode == "compiled":
                    torch._dynamo.reset()
                    fwd = torch.compile(model, backend=cfg.compile_backend)
                else:
                    fwd = model
                step = _step_fn(model, fwd, method, opt, recipe, device)
                t0 = time.perf_counter()
                for _ in range(cfg.warmup):
                    step(x, y)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                res.warmup_s = time.perf_counter() - t0
                if mode == "eager":
                    res.syncs_per_step = _count_syncs(step, x, y)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                times = sorted(_time_steps(step, x, y, cfg.steps, device))
                res.step_ms = statistics.median(times)
                res.step_ms_p10 = times[int(0.1 * (len(times) - 1))]
                res.step_ms_p90 = times[int(0.9 * (len(times) - 1))]
                res.images_per_s = cfg.batch_size / (res.step_ms / 1000)
                if device.type == "cuda":
                    res.peak_mem_mib = torch.cuda.max_memory_allocated(device) / 2**20
                if data is not None:
                    res.epoch_s, res.epoch_images = _time_epoch(step, data, cfg, device)
            except QbenchError:
                raise
            except Exception as e:  # one failing configuration does not hide the others
                res.error = " ".join(f"{type(e).__name__}: {e}".split())[:300]
            finally:
                del model, opt, step
                _free(device)
            results.append(res)
    _ratios(results)
    return results


def _ratios(results: list[BenchResult]) -> None:
    fp = {r.mode: r for r in results if r.method == "fp32" and not r.error}
    eager = fp.get("eager")
    for r in results:
        base = fp.get(r.mode)
        if r.error or base is None:
            continue
        r.x_fp = r.step_ms / base.step_ms
        if eager is not None:
            r.x_fp_eager = r.step_ms / eager.step_ms
        if not math.isnan(r.peak_mem_mib) and not math.isnan(base.peak_mem_mib):
            r.mem_x_fp = r.peak_mem_mib / base.peak_mem_mib


def format_table(cfg: BenchConfig, env: dict, results: list[BenchResult]) -> str:
    amp = "bf16 autocast" if cfg.amp and env["device"].startswith("cuda") else "fp32"
    layout = "channels_last" if cfg.channels_last and env["device"].startswith("cuda") else "NCHW"
    lines = [
        f"{cfg.model} @ {cfg.image_size}px, batch {cfg.batch_size}, {env['gpu']}, "
        f"torch {env['torch']}, {amp}, {layout}, median of {cfg.steps} steps after {cfg.warmup}",
        f"{'config':14s} {'mode':9s} {'step ms':>8s} {'images/s':>9s} {'x FP':>6s} "
        f"{'x FP eager':>10s} {'peak MiB':>9s} {'mem x FP':>8s} {'syncs':>5s}"
        + (f" {'epoch s':>8s}" if cfg.dataset else ""),
    ]

    def f(v, fmt: str) -> str:
        width = int(fmt.split(".")[0].rstrip("dfs") or 0)
        missing = v is None or (isinstance(v, float) and math.isnan(v))
        return f"{'-':>{width}s}" if missing else format(v, fmt)

    for r in results:
        if r.error:
            lines.append(f"{r.label:14s} {r.mode:9s} failed: {r.error}")
            continue
        line = (
            f"{r.label:14s} {r.mode:9s} {r.step_ms:8.2f} {r.images_per_s:9.0f} {f(r.x_fp, '6.2f')} "
            f"{f(r.x_fp_eager, '10.2f')} {f(r.peak_mem_mib, '9.0f')} {f(r.mem_x_fp, '8.2f')} "
            f"{f(r.syncs_per_step, '5d')}"
        )
        if cfg.dataset:
            line += f" {f(r.epoch_s, '8.2f')}"
        lines.append(line)
    return "\n".join(lines)


@click.command("bench")
@click.option("--model", "model_name", default="resnet18", show_default=True, help="Registered model name.")
@click.option(
    "--method",
    "methods",
    multiple=True,
    default=("lsq",),
    show_default=True,
    help="Method(s) to compare with full precision (repeatable).",
)
@click.option(
    "--bits",
    "bits",
    multiple=True,
    default=("W4A4",),
    show_default=True,
    help="Bit-width(s) W<w>A<a> (repeatable).",
)
@click.option("--batch-size", default=256, show_default=True, type=int)
@click.option("--image-size", default=None, type=int, help="Input side (default: 224, or 32 for CIFAR nets).")
@click.option("--num-classes", default=None, type=int, help="Classes (default: 1000 at 224, else 10).")
@click.option("--in-channels", default=None, type=int, help="Input channels (default: the model's dataset's).")
@click.option("--steps", default=30, show_default=True, type=int, help="Timed steps (median reported).")
@click.option("--warmup", default=10, show_default=True, type=int, help="Untimed steps first.")
@click.option(
    "--compile/--no-compile",
    "compiled",
    default=None,
    help="Also time under torch.compile (default: on CUDA only).",
)
@click.option("--eager/--no-eager", default=True, show_default=True, help="Time eager mode.")
@click.option("--compile-backend", default="inductor", show_default=True)
@click.option("--amp/--no-amp", default=True, show_default=True, help="bf16 autocast on CUDA.")
@click.option(
    "--channels-last/--no-channels-last",
    default=True,
    show_default=True,
    help="channels_last memory format on CUDA.",
)
@click.option("--option", "options", multiple=True, help="Method option key=value (repeatable).")
@click.option("--model-option", "model_options", multiple=True, help="Model option key=value (repeatable).")
@click.option("--dataset", default=None, help="Also time one training epoch of this dataset.")
@click.option("--data-root", default=None, type=click.Path(file_okay=False))
@click.option("--dataset-option", "dataset_options", multiple=True, help="Dataset option key=value.")
@click.option("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available).")
@click.option(
    "--json",
    "json_path",
    default=None,
    type=click.Path(dir_okay=False),
    help="Write the records (environment + one per configuration and mode) here.",
)
def bench(
    model_name,
    methods,
    bits,
    batch_size,
    image_size,
    num_classes,
    in_channels,
    steps,
    warmup,
    compiled,
    eager,
    compile_backend,
    amp,
    channels_last,
    options,
    model_options,
    dataset,
    data_root,
    dataset_options,
    device,
    json_path,
) -> None:
    """Time training steps of a model under quantization methods against full precision."""
    import torch

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise QbenchError("CUDA is not available on this machine", "--device")
    if compiled is None:
        compiled = dev.type == "cuda"
    modes = tuple(m for m, on in (("eager", eager), ("compiled", compiled)) if on)
    if not modes:
        raise QbenchError("nothing to time: both --no-eager and --no-compile", "--eager")
    if steps < 1 or warmup < 0 or batch_size < 1:
        raise QbenchError("--steps and --batch-size must be positive, --warmup not negative", "--steps")
    from qbench.methods import METHODS

    for m in methods:
        METHODS.get(m, "--method")
    native_size, native_channels = NATIVE.get(model_name, (224, 3))
    image_size = image_size or native_size
    in_channels = in_channels or native_channels
    if num_classes is None:
        num_classes = 1000 if image_size >= 64 else 10
    cfg = BenchConfig(
        model=model_name,
        batch_size=batch_size,
        image_size=image_size,
        num_classes=num_classes,
        in_channels=in_channels,
        methods=[(m, *parse_bits(b)) for m in methods for b in bits],
        method_options=parse_option_pairs(options, "--option"),
        model_options=parse_option_pairs(model_options, "--model-option"),
        modes=modes,
        steps=steps,
        warmup=warmup,
        amp=amp,
        channels_last=channels_last,
        compile_backend=compile_backend,
        dataset=dataset,
        data_root=data_root,
        dataset_options=parse_option_pairs(dataset_options, "--dataset-option"),
    )
    from .models import MODELS

    MODELS.get(model_name, "--model")
    env = environment(dev)
    results = run_bench(cfg, dev, log=lambda s: click.echo(s, err=True))
    click.echo(format_table(cfg, env, results))
    if json_path:
        record = {
            "environment": env,
            "config": asdict(cfg),
            "results": [asdict(r) for r in results],
        }
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(record, indent=2, default=str))
