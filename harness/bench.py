"""``qbench bench``: how much a quantization method costs per training step.

For a model, one or more methods (``--method all``: every registered one) and bit-widths,
times full training steps (forward, loss, backward, optimizer step, the method's extra
loss and per-step hook) against full precision in the same process, on a fixed synthetic
batch, the way the runner's loop takes them (:mod:`qbench.harness.train`: bf16 autocast
and channels_last on CUDA, SGD with momentum). Each configuration runs in every asked
mode: ``eager``; ``compiled`` (``torch.compile`` of the model, fake-quantizers included;
the optimizer step stays eager, as in the runner); ``cudagraphs`` (the same, with
``mode="reduce-overhead"``: the forward and backward replayed as CUDA graphs, as the
recipe key ``cudagraphs: true`` trains; CUDA only).

Rows: the full-precision baseline first, then each method at each bit-width (a method
that does not support the asked width runs at its nearest supported one, said in the row's
note; one that cannot be built here, e.g. a method that needs its own model family, is
skipped with the reason), each on the quantizers' fused kernels and/or their reference
functions (``--fused/--no-fused/--fused-both``: the ``path`` column; the fused kernels
exist on CUDA only, so on the CPU every row is ``ref``), then the peers (``--peer
torchao``: another library's fake-quantizers on the same layers, see
:mod:`qbench.harness.peers`). Methods that own their training (``Method.train``: Bayesian
Bits' stages, PQF's and BGD's distillation, BGD's layer-wise EM) are timed on the runner's
step after ``prepare`` and ``calibrate``: their own phases and a teacher's forward are not
in the figure (the row's note says so).

Timing: ``--warmup`` steps first (compilation, cuDNN autotuning, allocator growth),
then ``--steps`` steps, each bracketed by CUDA events (on the CPU, a host clock): the
median step time is the figure, ``images/s`` is batch size over it. Peak memory is the
most the CUDA caching allocator held at once over the timed steps (the peak is reset
before them, so each row counts its own). ``syncs/step`` counts the operations of one step
that wait for the GPU (``.item()``, ``bool(tensor)``, host copies), in every mode: they
stall the pipeline and, under ``torch.compile``, break the graph.

``--dataset`` additionally times one whole training epoch of that dataset's training
split (its real batching and augmentation on the device included, evaluation
excluded), after one warm-up epoch.

Ratios are against the full-precision run of the same process: ``x FP`` against the
same mode (compiled against compiled), ``x FP eager`` against the eager baseline, ``mem x
FP`` peak memory against the same mode's; ``x ref`` a fused row against the same
configuration and mode on the reference functions.
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
from importlib import metadata
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
    "bireal_resnet20": (32, 3),
    "bireal_resnet56": (32, 3),
    "vgg7": (32, 3),
    "lenet5": (28, 1),
    "small_cnn": (8, 1),
}

MODES = ("eager", "compiled", "cudagraphs")
#: dynamo's recompile limit in the compiled modes (:func:`_forward`)
RECOMPILE_LIMIT = 64
#: libraries whose fake-quantizers ``--peer`` can time (:mod:`qbench.harness.peers`; optional installs)
PEERS = ("torchao",)


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
    #: the quantizer paths to time: True the fused kernels, False the reference functions
    fused: tuple[bool, ...] = (True,)
    #: other libraries' fake-quantizers (:mod:`qbench.harness.peers`) at each asked bit-width
    peers: tuple[str, ...] = ()
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
    #: "fused" or "ref" (the quantizers' kernels), "-" without quantizers, else the peer's name
    path: str = "-"
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
    x_ref: float | None = None
    note: str = ""
    skipped: str = ""
    error: str = ""


@dataclass
class _Case:
    """One row of a mode: what to build and how its quantizers run."""

    label: str
    method: str
    w: int
    a: int
    path: str = "-"
    fused: bool | None = None
    peer: str | None = None
    note: str = ""


def parse_bits(text: str) -> tuple[int, int]:
    """``W4A4`` -> (4, 4), with the suite's rules (bits in 1..32)."""
    try:
        b = suite_parse_bits(text)
    except ValueError as e:
        raise QbenchError(str(e), "--bits") from None
    return b.w, b.a


def expand_methods(names: tuple[str, ...] | list[str]) -> list[str]:
    """``--method`` values (repeatable, comma lists, ``all``: every registered method but
    fp32) as checked names, in order, each once."""
    from qbench.methods import METHODS

    out: list[str] = []
    for text in names:
        for name in (n.strip() for n in text.split(",")):
            if not name:
                continue
            chosen = [m for m in METHODS.names() if m != "fp32"] if name == "all" else [name]
            for m in chosen:
                METHODS.get(m, "--method")
                if m not in out:
                    out.append(m)
    return out


def supported_bits(method_name: str, w: int, a: int) -> tuple[int, int, str]:
    """The method's nearest supported widths to (w, a), and a note when they differ."""
    from qbench.methods import get_method

    cls = get_method(method_name)

    def near(v: int, allowed: tuple[int, ...]) -> int:
        return min(allowed, key=lambda b: (abs(b - v), -b))

    sw, sa = near(w, cls.weight_bits), near(a, cls.act_bits)
    note = "" if (sw, sa) == (w, a) else f"W{w}A{a} unsupported: at W{sw}A{sa}"
    return sw, sa, note


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
    for lib in PEERS:  # the optional peers' versions, where installed
        try:
            env[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            pass
    return env


def fused_kernels_apply(device) -> bool:
    """Whether the quantizers' ``fused`` flag changes anything on ``device``: CUDA, with the
    kernels enabled (the default; ``QBENCH_FUSED=0`` turns them off; methods/fused.py)."""
    from qbench.methods import fused

    return device.type == "cuda" and fused.CUDA_ENABLED and fused.HAS_TRITON


def plan(cfg: BenchConfig, device) -> tuple[tuple[str, ...], list[_Case], list[str]]:
    """The modes and the rows of each mode on ``device``, and notes on what was left out."""
    notes: list[str] = []
    modes = cfg.modes
    if device.type != "cuda" and "cudagraphs" in modes:
        modes = tuple(m for m in modes if m != "cudagraphs")
        notes.append("cudagraphs: skipped (CUDA graphs need a CUDA device)")
    paths = tuple(dict.fromkeys(cfg.fused))
    if not fused_kernels_apply(device) and True in paths:
        paths = (False,)
        notes.append(
            "fused kernels: CUDA with triton only (and not QBENCH_FUSED=0): every row uses the reference functions"
        )
    if True in paths and set(modes) - {"eager"}:
        from qbench.methods import fused as _fused

        if not _fused.COMPILED_KERNELS:
            notes.append(
                "compiled modes: the quantizers trace their reference functions, which inductor fuses, so a fused "
                "row there runs the same graph as its ref row (QBENCH_FUSED_COMPILED=1 keeps the fused ops)"
            )
    cases = [_Case("fp32", "fp32", 32, 32)]
    seen = set()
    for name, w, a in cfg.methods:
        if name == "fp32":
            continue
        sw, sa, note = supported_bits(name, w, a)
        if (name, sw, sa) in seen:
            continue
        seen.add((name, sw, sa))
        note = "; ".join(n for n in (note, _training_note(name)) if n)
        for fused in paths:
            path = "fused" if fused else "ref"
            cases.append(_Case(f"{name} W{sw}A{sa}", name, sw, sa, path, fused, note=note))
    for peer in cfg.peers:
        for w, a in dict.fromkeys((w, a) for _, w, a in cfg.methods):
            note = f"compiled: graph breaks in its fake-quantizer, recompile limit {RECOMPILE_LIMIT}"
            cases.append(_Case(f"{peer} W{w}A{a}", f"peer:{peer}", w, a, peer, peer=peer, note=note))
    return modes, cases, notes


def _training_note(name: str) -> str:
    from qbench.methods import Method, get_method

    cls = get_method(name)
    parts = []
    if cls.train is not Method.train:
        parts.append("its own training phases not timed (runner step only)")
    if cls.needs_teacher:
        parts.append("no teacher forward (cross-entropy step)")
    return ", ".join(parts)


def _build(cfg: BenchConfig, case: _Case, device, example):
    """The model under the case's method (or peer) on ``device``, calibrated on the example
    batch, its quantizers on the case's path, with the runner's optimizer; returns (model,
    method, optimizer, recipe)."""
    import torch
    from qbench.methods import MethodContext, Recipe, get_method
    from qbench.methods.modules import set_fused

    from .models import create_model
    from .train import default_param_groups, make_optimizer

    model = create_model(
        cfg.model,
        num_classes=cfg.num_classes,
        in_channels=cfg.in_channels,
        image_size=cfg.image_size,
        **cfg.model_options,
    )
    if case.peer is not None:
        from .peers import peer_method

        method = peer_method(case.peer, case.w, case.a)
    else:
        options = cfg.method_options if case.method != "fp32" else {}
        method = get_method(case.method)(case.w, case.a, **options)
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
    if case.fused is not None:
        set_fused(model, case.fused)
    model.train()
    groups = method.param_groups(model, recipe) or default_param_groups(model, recipe.weight_decay, recipe.wd_on)
    opt = make_optimizer(groups, recipe)
    return model, method, opt, recipe


def _forward(model, mode: str, cfg: BenchConfig):
    """What the step calls forward: the model, or its compiled form for the mode."""
    import torch

    if mode == "eager":
        return model
    torch._dynamo.reset()
    # a graph break inside a layer's forward (torchao's per-token fake-quantizer has one)
    # leaves one resume function shared by every layer, recompiled per layer shape: with
    # dynamo's default limit of 8 the later layers would silently run eager
    name = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), RECOMPILE_LIMIT))
    if mode == "cudagraphs":
        return torch.compile(model, mode="reduce-overhead")
    return torch.compile(model, backend=cfg.compile_backend)


def _step_fn(model, fwd: Callable, method, opt, recipe, device, mode: str = "eager"):
    """The runner's training step (:func:`qbench.harness.train.make_train_step`) followed by
    the method's per-step hook, as one call."""
    from .train import make_train_step

    if mode == "cudagraphs":  # the step marks each iteration for the graphs, as a cell's does
        recipe = recipe.with_(compile=True, cudagraphs=True)
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


def _one_line(e: BaseException) -> str:
    text = e.message if isinstance(e, QbenchError) else f"{type(e).__name__}: {e}"
    return " ".join(text.split())[:300]


def _measure(cfg: BenchConfig, case: _Case, mode: str, device, x, y, data) -> BenchResult:
    """Build, warm up and time one row; a method that cannot be built here is skipped, a
    failure is recorded (neither hides the other rows)."""
    import torch

    res = BenchResult(case.label, case.method, case.w, case.a, mode, path=case.path, note=case.note)
    model = opt = step = None
    try:
        try:
            model, method, opt, recipe = _build(cfg, case, device, (x, y))
        except QbenchError as e:  # the method refuses this model or these bits
            res.skipped = _one_line(e)
            return res
        step = _step_fn(model, _forward(model, mode, cfg), method, opt, recipe, device, mode)
        t0 = time.perf_counter()
        for _ in range(cfg.warmup):
            step(x, y)
        if device.type == "cuda":
            torch.cuda.synchronize()
        res.warmup_s = time.perf_counter() - t0
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
    except Exception as e:  # one failing configuration does not hide the others
        res.error = _one_line(e)
    finally:
        del model, opt, step
        _free(device)
    return res


def run_bench(
    cfg: BenchConfig,
    device,
    log: Callable[[str], None] = lambda s: None,
    notes: list[str] | None = None,
) -> list[BenchResult]:
    """Measure every (row, mode); the full-precision baseline first in each mode. What was
    left out (a mode or path this device lacks) is appended to ``notes``."""
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
    modes, cases, left_out = plan(cfg, device)
    if notes is not None:
        notes.extend(left_out)
    for n in left_out:
        log(f"note: {n}")
    results: list[BenchResult] = []
    for mode in modes:
        for case in cases:
            log(f"{case.label} [{case.path}] ({mode}) ...")
            results.append(_measure(cfg, case, mode, device, x, y, data))
            log(f"  {_row_line(results[-1])}")  # as it comes: a run cut short keeps its rows
    _ratios(results)
    return results


def _row_line(r: BenchResult) -> str:
    if r.error or r.skipped:
        return f"error: {r.error}" if r.error else f"skipped: {r.skipped}"
    peak = "" if math.isnan(r.peak_mem_mib) else f", peak {r.peak_mem_mib:.0f} MiB"
    epoch = f", epoch {r.epoch_s:.2f} s" if r.epoch_s is not None else ""
    return f"{r.step_ms:.3f} ms a step{peak}, warm-up {r.warmup_s:.1f} s{epoch}"


def _ratios(results: list[BenchResult]) -> None:
    ok = [r for r in results if not (r.error or r.skipped)]
    fp = {r.mode: r for r in ok if r.method == "fp32"}
    ref = {(r.label, r.mode): r for r in ok if r.path == "ref"}
    eager = fp.get("eager")
    for r in ok:
        base = fp.get(r.mode)
        if r.path == "fused" and (r.label, r.mode) in ref:
            r.x_ref = r.step_ms / ref[r.label, r.mode].step_ms
        if base is None:
            continue
        r.x_fp = r.step_ms / base.step_ms
        if eager is not None:
            r.x_fp_eager = r.step_ms / eager.step_ms
        if not math.isnan(r.peak_mem_mib) and not math.isnan(base.peak_mem_mib):
            r.mem_x_fp = r.peak_mem_mib / base.peak_mem_mib


def format_table(cfg: BenchConfig, env: dict, results: list[BenchResult], notes: list[str] = ()) -> str:
    amp = "bf16 autocast" if cfg.amp and env["device"].startswith("cuda") else "fp32"
    layout = "channels_last" if cfg.channels_last and env["device"].startswith("cuda") else "NCHW"
    w = max([14, *(len(r.label) for r in results)])
    lines = [
        f"{cfg.model} @ {cfg.image_size}px, batch {cfg.batch_size}, {env['gpu']}, "
        f"torch {env['torch']}, {amp}, {layout}, median of {cfg.steps} steps after {cfg.warmup}",
        f"{'config':{w}s} {'path':7s} {'mode':10s} {'step ms':>8s} {'images/s':>9s} {'x FP':>6s} "
        f"{'x FP eager':>10s} {'x ref':>6s} {'peak MiB':>9s} {'mem x FP':>8s} {'syncs':>5s}"
        + (f" {'epoch s':>8s}" if cfg.dataset else "")
        + "  note",
    ]

    def f(v, fmt: str) -> str:
        width = int(fmt.split(".")[0].rstrip("dfs") or 0)
        missing = v is None or (isinstance(v, float) and math.isnan(v))
        return f"{'-':>{width}s}" if missing else format(v, fmt)

    for r in results:
        head = f"{r.label:{w}s} {r.path:7s} {r.mode:10s}"
        if r.skipped or r.error:
            lines.append(f"{head} {'skipped' if r.skipped else 'failed'}: {r.skipped or r.error}")
            continue
        line = (
            f"{head} {r.step_ms:8.2f} {r.images_per_s:9.0f} {f(r.x_fp, '6.2f')} "
            f"{f(r.x_fp_eager, '10.2f')} {f(r.x_ref, '6.2f')} {f(r.peak_mem_mib, '9.0f')} {f(r.mem_x_fp, '8.2f')} "
            f"{f(r.syncs_per_step, '5d')}"
        )
        if cfg.dataset:
            line += f" {f(r.epoch_s, '8.2f')}"
        lines.append(line + (f"  {r.note}" if r.note else ""))
    lines += [f"note: {n}" for n in notes]
    return "\n".join(lines)


@click.command("bench")
@click.option("--model", "model_name", default="resnet18", show_default=True, help="Registered model name.")
@click.option(
    "--method",
    "methods",
    multiple=True,
    default=("lsq",),
    show_default=True,
    help="Method(s) to compare with full precision: repeatable, comma lists, 'all' for every registered one.",
)
@click.option(
    "--bits",
    "bits",
    multiple=True,
    default=("W4A4",),
    show_default=True,
    help="Bit-width(s) W<w>A<a> (repeatable); a method that lacks one runs at its nearest.",
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
@click.option(
    "--cudagraphs/--no-cudagraphs",
    default=False,
    show_default=True,
    help="Also time torch.compile(mode='reduce-overhead') (CUDA graphs; CUDA only, a note on the CPU).",
)
@click.option("--eager/--no-eager", default=True, show_default=True, help="Time eager mode.")
@click.option("--compile-backend", default="inductor", show_default=True, help="Backend of the compiled mode.")
@click.option(
    "--fused/--no-fused",
    default=True,
    show_default=True,
    help="Quantizers on their fused kernels (CUDA) or on the reference functions.",
)
@click.option("--fused-both", is_flag=True, help="Time both quantizer paths in the same process (overrides --fused).")
@click.option(
    "--peer",
    "peers",
    multiple=True,
    type=click.Choice(PEERS),
    help="Add another library's fake-quantizers on the same layers at the same bits (optional install).",
)
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
    "--ddp",
    "ddp_devices",
    default=None,
    help="Instead: full-precision training images/s with DistributedDataParallel on these devices "
    "(cuda:0,cuda:1; cpu,cpu for gloo) against the first one alone, --batch-size per device.",
)
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
    cudagraphs,
    eager,
    compile_backend,
    fused,
    fused_both,
    peers,
    amp,
    channels_last,
    options,
    model_options,
    dataset,
    data_root,
    dataset_options,
    device,
    ddp_devices,
    json_path,
) -> None:
    """Time training steps of a model under quantization methods against full precision."""
    import torch

    if steps < 1 or warmup < 0 or batch_size < 1:
        raise QbenchError("--steps and --batch-size must be positive, --warmup not negative", "--steps")
    native_size, native_channels = NATIVE.get(model_name, (224, 3))
    image_size = image_size or native_size
    in_channels = in_channels or native_channels
    if num_classes is None:
        num_classes = 1000 if image_size >= 64 else 10
    if ddp_devices is not None:
        shape = (image_size, in_channels, num_classes)
        return _bench_ddp(model_name, ddp_devices, batch_size, *shape, steps, warmup, json_path, compiled, eager)

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise QbenchError("CUDA is not available on this machine", "--device")
    if compiled is None:
        compiled = dev.type == "cuda"
    modes = tuple(m for m, on in zip(MODES, (eager, compiled, cudagraphs), strict=True) if on)
    if not modes:
        raise QbenchError("nothing to time: --no-eager without --compile or --cudagraphs", "--eager")
    names = expand_methods(methods)
    from .peers import require_peer

    peers = tuple(dict.fromkeys(peers))
    for p in peers:
        require_peer(p)
    cfg = BenchConfig(
        model=model_name,
        batch_size=batch_size,
        image_size=image_size,
        num_classes=num_classes,
        in_channels=in_channels,
        methods=[(m, *parse_bits(b)) for m in names for b in bits],
        method_options=parse_option_pairs(options, "--option"),
        model_options=parse_option_pairs(model_options, "--model-option"),
        modes=modes,
        fused=(True, False) if fused_both else (fused,),
        peers=peers,
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
    notes: list[str] = []
    results = run_bench(cfg, dev, log=lambda s: click.echo(s, err=True), notes=notes)
    click.echo(format_table(cfg, env, results, notes))
    if json_path:
        record = {
            "environment": env,
            "config": asdict(cfg),
            "notes": notes,
            "results": [asdict(r) for r in results],
        }
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(record, indent=2, default=str))


def _bench_ddp(
    model_name, ddp_devices, batch_size, size, in_channels, num_classes, steps, warmup, json_path, compiled, eager
) -> None:
    """``qbench bench --ddp cuda:0,cuda:1``: training images per second of the full-precision
    model on the first device alone and with DDP on all of them (same process count per
    device, same per-device batch, synthetic data), and their ratio (the speed-up; 2.0 is
    perfect scaling on two devices); eager and (on CUDA, by default) compiled, each as a
    cell trains, and on CUDA eager also without DDP's unused-parameter search (a cell's setting)."""
    from .ddp import FIND_UNUSED, ddp_images_per_second
    from .models import MODELS
    from .plan import check_devices

    MODELS.get(model_name, "--model")
    devices = check_devices(ddp_devices.split(","), "--ddp")
    if len(devices) < 2:
        raise QbenchError("--ddp needs at least two devices (e.g. cuda:0,cuda:1)", "--ddp")
    on_cuda = devices[0].startswith("cuda")
    modes = [m for m, on in (("eager", eager), ("compiled", on_cuda if compiled is None else compiled)) if on]
    if not modes:
        raise QbenchError("nothing to time: --no-eager without --compile", "--eager")
    if "compiled" in modes and not on_cuda:
        raise QbenchError("--compile with --ddp needs CUDA devices", "--compile")
    kw = dict(
        model_name=model_name,
        image_size=size,
        batch_per_gpu=batch_size,
        steps=steps,
        warmup=warmup,
        num_classes=num_classes,
        in_channels=in_channels,
    )
    rows = []
    for mode in modes:
        one = ddp_images_per_second(devices=devices[:1], compile=mode == "compiled", **kw)
        rows.append((mode, "1 device", devices[0], one, 1.0))
        variants = [(f"DDP x{len(devices)}", FIND_UNUSED)]
        if mode == "eager" and FIND_UNUSED and on_cuda:  # a GPU diagnostic
            variants.append((f"DDP x{len(devices)}, no unused search", False))
        for name, find_unused in variants:
            many = ddp_images_per_second(devices=devices, compile=mode == "compiled", find_unused=find_unused, **kw)
            rows.append((mode, name, ",".join(devices), many, many / one))
    click.echo(f"{model_name} at {size}, batch {batch_size} per device, {steps} timed steps after {warmup}")
    click.echo(f"{'mode':<9} {'run':<28} {'devices':<24} {'images/s':>10} {'speed-up':>9}")
    for mode, name, devs, ips, up in rows:
        click.echo(f"{mode:<9} {name:<28} {devs:<24} {ips:>10.1f} {up:>8.2f}x")
    if json_path:
        import torch

        record = {"environment": environment(torch.device(devices[0])), "config": kw, "devices": devices}
        record["results"] = [
            {"mode": m, "run": n, "devices": d, "images_per_s": i, "speedup": u} for m, n, d, i, u in rows
        ]
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(record, indent=2, default=str))
