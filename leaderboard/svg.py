"""Static SVG charts drawn at build time (no JavaScript, no CDN): line charts of training
curves and scatter plots with their Pareto frontier and a label beside each point. An axis
pads around its data but stays within what the quantity can be (:data:`PERCENT`,
:data:`NON_NEGATIVE`). Every label is escaped here; the result is
:class:`markupsafe.Markup`, ready to be placed in an autoescaped template."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from markupsafe import Markup, escape

PALETTE = [
    "#1f77b4",
    "#d62728",
    "#2ca02c",
    "#ff7f0e",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#17becf",
    "#7f7f7f",
    "#bcbd22",
]
W, H = 600, 300
M_LEFT, M_RIGHT, M_TOP, M_BOTTOM = 58, 124, 30, 44


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1e6 or a < 1e-3:
        return f"{v:.1e}"
    if a >= 100:
        return f"{v:.0f}"
    return f"{v:.3g}"


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About ``n`` round tick values covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return []
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / max(1, n)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.floor(lo / step) * step
    ticks = [round(start, 12)]
    while ticks[-1] < hi - step * 1e-9 and len(ticks) < 50:  # the last tick covers hi
        ticks.append(round(start + len(ticks) * step, 12))
    return ticks


@dataclass
class Axis:
    lo: float
    hi: float
    scale: str = "linear"  # linear | log10 | log2
    ticks: Sequence[float] = ()

    def f(self, v: float) -> float:
        if self.scale == "log10":
            return math.log10(v)
        if self.scale == "log2":
            return math.log2(v)
        return v

    def frac(self, v: float) -> float:
        a, b = self.f(self.lo), self.f(self.hi)
        return 0.5 if b == a else (self.f(v) - a) / (b - a)


#: no bounds: the axis pads freely around its data
UNBOUNDED = (-math.inf, math.inf)
#: a percentage (accuracy, relative BOPs): its axis stays within [0, 100]
PERCENT = (0.0, 100.0)
#: a series that cannot be negative (a learning rate, a loss, a size)
NON_NEGATIVE = (0.0, math.inf)


def _axis(values: list[float], scale: str, pad: float = 0.05, bounds: tuple[float, float] = UNBOUNDED) -> Axis:
    """An axis over ``values`` padded by ``pad`` of their span on each side, but never past
    ``bounds`` (an accuracy axis does not run to 102 %, a learning rate's below 0); bounds
    widen to cover the data itself should a value lie outside them."""
    vals = [v for v in values if math.isfinite(v) and (scale == "linear" or v > 0)]
    if not vals:
        return Axis(0.0, 1.0, "linear", nice_ticks(0, 1))
    lo, hi = min(vals), max(vals)
    lo_b, hi_b = min(bounds[0], lo), max(bounds[1], hi)
    if scale == "log2":
        lo2, hi2 = math.floor(math.log2(lo)), math.ceil(math.log2(hi))
        if hi2 == lo2:
            lo2, hi2 = lo2 - 1, hi2 + 1
        return Axis(2.0**lo2, 2.0**hi2, scale, [2.0**k for k in range(lo2, hi2 + 1)])
    if scale == "log10":
        lo10, hi10 = math.log10(lo), math.log10(hi)
        span = max(hi10 - lo10, 0.2)
        lo10 = max(lo10 - span * pad, math.log10(lo_b) if lo_b > 0 else -math.inf)
        hi10 = min(hi10 + span * pad, math.log10(hi_b) if hi_b < math.inf else math.inf)
        ticks = [m * 10.0**k for k in range(math.floor(lo10), math.ceil(hi10) + 1) for m in (1, 2, 5)]
        ticks = [t for t in ticks if lo10 - 1e-12 <= math.log10(t) <= hi10 + 1e-12]
        return Axis(10**lo10, 10**hi10, scale, ticks)
    span = (hi - lo) or (abs(hi) or 1.0)
    ticks = nice_ticks(max(lo - span * pad, lo_b), min(hi + span * pad, hi_b))
    inside = [t for t in ticks if lo_b <= t <= hi_b]  # a round tick past a bound is dropped
    a_lo, a_hi = max(ticks[0], lo_b), min(ticks[-1], hi_b)
    return Axis(a_lo, a_hi, scale, inside if len(inside) >= 2 else [a_lo, a_hi])


def _range(values: list[float]) -> str:
    vals = [v for v in values if math.isfinite(v)]
    return f"{min(vals)!r} {max(vals)!r}" if vals else ""


class _Canvas:
    """One chart's frame. The ``<svg>`` carries its axes' ranges (``data-x-axis``,
    ``data-y-axis``: "lo hi") and its data's (``data-x-data``, ``data-y-data``: "min max"),
    and each tick label its exact value (``data-v``), for a reader or a test to check."""

    def __init__(
        self,
        title: str,
        xlabel: str,
        ylabel: str,
        x: Axis,
        y: Axis,
        label: str,
        xs: Sequence[float] = (),
        ys: Sequence[float] = (),
    ):
        self.x, self.y = x, y
        self.pw, self.ph = W - M_LEFT - M_RIGHT, H - M_TOP - M_BOTTOM
        self.parts: list[str] = [
            f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" viewBox="0 0 {W} {H}" '
            f'width="{W}" height="{H}" role="img" aria-label="{escape(label)}" '
            f'data-x-axis="{x.lo!r} {x.hi!r}" data-y-axis="{y.lo!r} {y.hi!r}" '
            f'data-x-data="{_range(list(xs))}" data-y-data="{_range(list(ys))}">',
            f'<text x="{W / 2}" y="18" text-anchor="middle" class="t">{escape(title)}</text>',
            f'<rect x="{M_LEFT}" y="{M_TOP}" width="{self.pw}" height="{self.ph}" class="plot"/>',
        ]
        for t in x.ticks:
            px = self.px(t)
            self.parts.append(f'<line x1="{px:.1f}" y1="{M_TOP}" x2="{px:.1f}" y2="{M_TOP + self.ph}" class="g"/>')
            self.parts.append(
                f'<text class="tx" data-v="{t!r}" x="{px:.1f}" y="{M_TOP + self.ph + 14}" text-anchor="middle">'
                f"{escape(_fmt(t))}</text>"
            )
        for t in y.ticks:
            py = self.py(t)
            self.parts.append(f'<line x1="{M_LEFT}" y1="{py:.1f}" x2="{M_LEFT + self.pw}" y2="{py:.1f}" class="g"/>')
            self.parts.append(
                f'<text class="ty" data-v="{t!r}" x="{M_LEFT - 5}" y="{py + 4:.1f}" text-anchor="end">'
                f"{escape(_fmt(t))}</text>"
            )
        self.parts.append(
            f'<text x="{M_LEFT + self.pw / 2}" y="{H - 8}" text-anchor="middle" class="l">{escape(xlabel)}</text>'
        )
        self.parts.append(
            f'<text transform="translate(14 {M_TOP + self.ph / 2}) rotate(-90)" '
            f'text-anchor="middle" class="l">{escape(ylabel)}</text>'
        )

    def px(self, v: float) -> float:
        return M_LEFT + self.x.frac(v) * self.pw

    def py(self, v: float) -> float:
        return M_TOP + (1 - self.y.frac(v)) * self.ph

    def add(self, s: str) -> None:
        self.parts.append(s)

    def legend(self, items: list[tuple[str, str, bool]], shapes: dict[str, str] | None = None) -> None:
        """(label, colour, hollow) entries, right of the plot; ``shapes``: label -> marker."""
        for i, (label, color, hollow) in enumerate(items[:16]):
            y = M_TOP + 8 + i * 15
            x = M_LEFT + self.pw + 14
            fill = "white" if hollow else color
            short = label if len(label) <= 16 else label[:15] + "\u2026"
            self.parts.append(marker((shapes or {}).get(label, "circle"), x, y - 4, 4, fill, color))
            self.parts.append(
                f'<text x="{x + 8}" y="{y}" class="lg">{escape(short)}<title>{escape(label)}</title></text>'
            )

    def point_labels(
        self,
        points: list[tuple[float, float, str, str]],
        lines: Sequence[tuple[float, float, float, float]] = (),
    ) -> None:
        """A text label beside each (px, py, text, colour) point, in SVG coordinates: points
        of one text within a few pixels of each other (the seeds of one configuration) share
        a label; each label takes the first spot around its point that overlaps no other
        label, no point and no line of ``lines`` (x0, y0, x1, y1: the frontier's segments) and
        stays in the plot, else the spot that overlaps least, with a leader line when it sits
        away from its point."""
        clusters: list[tuple[float, float, str, str]] = []
        for x, y, text, color in points:
            if not any(t == text and abs(x - cx) < 14 and abs(y - cy) < 14 for cx, cy, t, _ in clusters):
                clusters.append((x, y, text, color))
        r = 5.5  # about a marker's half size
        taken = [(x - r, y - r, x + r, y + r) for x, y, _, _ in points]
        taken += [(min(x0, x1) - 1, min(y0, y1) - 1, max(x0, x1) + 1, max(y0, y1) + 1) for x0, y0, x1, y1 in lines]
        area = (M_LEFT + 1, M_TOP + 1, M_LEFT + self.pw - 1, M_TOP + self.ph - 1)
        for x, y, text, color in clusters:
            w, h = LABEL_CHAR_W * len(text) + 2, LABEL_H
            best, best_cost = None, math.inf
            for dx, dy in _label_spots(w, h):
                box = (x + dx, y + dy - h / 2, x + dx + w, y + dy + h / 2)
                cost = sum(_overlap(box, t) for t in taken) + 4 * (w * h - _overlap(box, area))
                if cost < best_cost:
                    best, best_cost = box, cost
                if cost == 0:
                    break
            assert best is not None
            taken.append(best)
            x0, y0, x1, y1 = best
            if not (x0 - 8 <= x <= x1 + 8 and y0 - 8 <= y <= y1 + 8):  # far from its point: a leader
                lx, ly = min(max(x, x0), x1), min(max(y, y0), y1)
                self.parts.append(
                    f'<line x1="{x:.1f}" y1="{y:.1f}" x2="{lx:.1f}" y2="{ly:.1f}" stroke="{color}" '
                    f'stroke-width="0.7" class="leader"/>'
                )
            self.parts.append(
                f'<text x="{x0 + 1:.1f}" y="{y1 - 2.5:.1f}" class="pl" fill="{color}" '
                f'data-tag="{escape(text)}">{escape(text)}</text>'
            )

    def done(self) -> Markup:
        return Markup("".join(self.parts) + "</svg>")


#: the size a point label is laid out with (10 px text; its width estimated per character)
LABEL_CHAR_W, LABEL_H = 6.0, 12.0


def _label_spots(w: float, h: float) -> list[tuple[float, float]]:
    """Where a label of w x h may go, as (left, vertical centre) offsets from its point,
    nearest first: right, left, above, below, the diagonals, then a row further out."""
    near = [(8, 0), (-8 - w, 0), (-w / 2, -h), (-w / 2, h), (6, -h), (6, h), (-6 - w, -h), (-6 - w, h)]
    far = [(dx * k, dy * k) for k in (2, 3) for dx, dy in ((8, 0), (6, -h), (6, h))]
    far += [(-8 * k - w, dy * k) for k in (2, 3) for dy in (0, -h, h)]
    far += [(-w / 2, dy * k) for k in (2, 3) for dy in (-h, h)]
    return near + far


def _overlap(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    """The area two (x0, y0, x1, y1) boxes share."""
    return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))


def empty_chart(title: str, message: str) -> Markup:
    return Markup(
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" viewBox="0 0 {W} 60" width="{W}" '
        f'height="60" role="img" aria-label="{escape(title)}">'
        f'<text x="{W / 2}" y="20" text-anchor="middle" class="t">{escape(title)}</text>'
        f'<text x="{W / 2}" y="44" text-anchor="middle">{escape(message)}</text></svg>'
    )


def line_chart(
    series: dict[str, list[tuple[float, float]]],
    title: str,
    xlabel: str,
    ylabel: str,
    ylog: bool = False,
    integer_x: bool = True,
    ybounds: tuple[float, float] = UNBOUNDED,
) -> Markup:
    """One polyline (with point markers) per named series of (x, y) points; ``integer_x``:
    the x axis counts something (epochs), so its ticks are whole numbers; ``ybounds``: what
    the y axis may span at most (:data:`PERCENT`, :data:`NON_NEGATIVE`)."""
    series = {k: [(x, y) for x, y in v if math.isfinite(y) and (not ylog or y > 0)] for k, v in series.items()}
    series = {k: v for k, v in series.items() if v}
    if not series:
        return empty_chart(title, "no data logged")
    xs = [x for v in series.values() for x, _ in v]
    ys = [y for v in series.values() for _, y in v]
    xaxis = _axis(xs, "linear", pad=0.0)
    if integer_x:
        lo, hi = math.floor(min(xs)), math.ceil(max(xs))
        hi = max(hi, lo + 1)
        step = max(1, math.ceil((hi - lo) / 8))
        xaxis = Axis(lo, hi, "linear", list(range(lo, hi + 1, step)))
    yaxis = _axis(ys, "log10" if ylog else "linear", bounds=ybounds)
    c = _Canvas(title, xlabel, ylabel, xaxis, yaxis, title, xs, ys)
    legend = []
    for i, (name, pts) in enumerate(series.items()):
        color = PALETTE[i % len(PALETTE)]
        path = " ".join(f"{c.px(x):.1f},{c.py(y):.1f}" for x, y in pts)
        c.add(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2" data-series="{escape(name)}"/>')
        for x, y in pts:
            c.add(
                f'<circle cx="{c.px(x):.1f}" cy="{c.py(y):.1f}" r="2.5" fill="{color}">'
                f"<title>{escape(name)}: {escape(_fmt(x))}, {escape(_fmt(y))}</title></circle>"
            )
        legend.append((name, color, False))
    c.legend(legend)
    return c.done()


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points not dominated by another (smaller-or-equal x and larger-or-equal y), by x."""
    best = -math.inf
    front = []
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if y > best:
            front.append((x, y))
            best = y
    return front


#: marker shapes, one per group where a chart tells groups apart by shape as well as colour
MARKERS = ("circle", "square", "triangle", "diamond", "triangle-down", "star")


def marker(shape: str, x: float, y: float, r: float, fill: str, stroke: str, attrs: str = "", inner: str = "") -> str:
    """One SVG marker centred on (x, y), ``r`` about its radius; ``attrs`` are extra
    attributes (already escaped), ``inner`` its children (a ``<title>``)."""
    style = f'fill="{fill}" stroke="{stroke}"'
    if shape == "square":
        el = f'<rect x="{x - r * 0.85:.1f}" y="{y - r * 0.85:.1f}" width="{r * 1.7:.1f}" height="{r * 1.7:.1f}" {style}'
    elif shape in ("triangle", "triangle-down", "diamond", "star"):
        if shape == "triangle":
            pts = [(0, -1.15), (1.05, 0.75), (-1.05, 0.75)]
        elif shape == "triangle-down":
            pts = [(0, 1.15), (1.05, -0.75), (-1.05, -0.75)]
        elif shape == "diamond":
            pts = [(0, -1.2), (1.2, 0), (0, 1.2), (-1.2, 0)]
        else:
            pts = [
                (math.sin(k * math.pi / 5) * (1.3 if k % 2 == 0 else 0.55),
                 -math.cos(k * math.pi / 5) * (1.3 if k % 2 == 0 else 0.55))
                for k in range(10)
            ]  # fmt: skip
        path = " ".join(f"{x + dx * r:.1f},{y + dy * r:.1f}" for dx, dy in pts)
        el = f'<polygon points="{path}" {style}'
    else:
        el = f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{r}" {style}'
    el += f' data-marker="{shape}"' if shape != "circle" else ""
    el += f" {attrs}" if attrs else ""
    return el + (f">{inner}</{el[1 : el.index(' ')]}>" if inner else "/>")


@dataclass
class Point:
    x: float
    y: float
    label: str  # the tooltip
    group: str  # colour key (the method)
    hollow: bool = False  # reported (hollow) or reproduced (filled)
    yerr: float = math.nan
    tag: str = ""  # the visible label beside the point (default: ``label``)


def scatter(
    points: list[Point],
    title: str,
    xlabel: str,
    ylabel: str,
    xscale: str = "log10",
    frontier: bool = True,
    shapes: bool = False,
    xbounds: tuple[float, float] = UNBOUNDED,
    ybounds: tuple[float, float] = UNBOUNDED,
) -> Markup:
    """A scatter plot with the Pareto frontier (lower x, higher y) of the filled points;
    ``shapes``: each group gets a marker shape as well as a colour; ``xbounds``/``ybounds``:
    what each axis may span at most. Every point is labelled with its ``tag`` (points of one
    tag drawn on top of each other share a label), placed where it collides with no other
    label or point where the plot has room."""
    points = [p for p in points if math.isfinite(p.x) and math.isfinite(p.y) and (xscale == "linear" or p.x > 0)]
    if not points:
        return empty_chart(title, "no points to plot")
    ys = [p.y for p in points]
    errs = [p.y + p.yerr for p in points if math.isfinite(p.yerr)] + [
        p.y - p.yerr for p in points if math.isfinite(p.yerr)
    ]
    # an error bar may not stretch the axis past its bounds (a mean of 99.9 +- 0.2 %)
    yaxis = _axis(ys + [e for e in errs if ybounds[0] <= e <= ybounds[1]], "linear", bounds=ybounds)
    xs = [p.x for p in points]
    c = _Canvas(title, xlabel, ylabel, _axis(xs, xscale, bounds=xbounds), yaxis, title, xs, ys)
    groups = list(dict.fromkeys(p.group for p in points))
    colors = {g: PALETTE[i % len(PALETTE)] for i, g in enumerate(groups)}
    shape_of = {g: MARKERS[i % len(MARKERS)] if shapes else "circle" for i, g in enumerate(groups)}
    segments: list[tuple[float, float, float, float]] = []
    if frontier:
        for hollow, dash in ((False, ""), (True, ' stroke-dasharray="4 3"')):
            front = pareto_front([(p.x, p.y) for p in points if p.hollow == hollow])
            if len(front) > 1:
                steps = [front[0]]
                for (_, y0), (x1, y1) in zip(front, front[1:], strict=False):
                    steps += [(x1, y0), (x1, y1)]
                path = " ".join(f"{c.px(x):.1f},{c.py(y):.1f}" for x, y in steps)
                pairs = zip(steps, steps[1:], strict=False)
                segments += [(c.px(a), c.py(b), c.px(u), c.py(v)) for (a, b), (u, v) in pairs]
                kind = "reported" if hollow else "reproduced"
                c.add(
                    f'<polyline points="{path}" fill="none" stroke="#555" stroke-width="1.2"{dash} '
                    f'class="front" data-front="{kind}"/>'
                )
    for p in points:
        color = colors[p.group]
        x, y = c.px(p.x), c.py(p.y)
        if math.isfinite(p.yerr) and p.yerr > 0:
            lo, hi = max(p.y - p.yerr, c.y.lo), min(p.y + p.yerr, c.y.hi)  # clipped to the axis
            c.add(f'<line x1="{x:.1f}" y1="{c.py(lo):.1f}" x2="{x:.1f}" y2="{c.py(hi):.1f}" stroke="{color}"/>')
        fill = "white" if p.hollow else color
        kind = "reported" if p.hollow else "reproduced"
        title = f"<title>{escape(p.label)} ({kind}): {escape(_fmt(p.y))} at {escape(_fmt(p.x))}</title>"
        attrs = f'stroke-width="1.6" class="pt" data-kind="{kind}" data-tag="{escape(p.tag or p.label)}"'
        c.add(marker(shape_of[p.group], x, y, 4.5, fill, color, attrs, title))
    c.point_labels([(c.px(p.x), c.py(p.y), p.tag or p.label, colors[p.group]) for p in points], segments)
    legend = [(g, colors[g], False) for g in groups]
    if any(p.hollow for p in points):
        legend.append(("reported", "#555", True))
    c.legend(legend, shape_of)
    return c.done()


#: bit widths drawn as evenly spaced levels (0 = pruned); others fall between on a log2 scale
BIT_TICKS = (0, 1, 2, 4, 8, 16, 32)


def _bit_level(b: float) -> float:
    return 0.0 if b <= 0 else 1.0 + math.log2(min(b, 32.0))


def layer_bits_chart(layers: list[tuple[str, float | None, float | None]], title: str = "bits per layer") -> Markup:
    """Bars of each layer's weight and activation bits, (name, w_bits, a_bits) in order;
    the y axis has a level per power of two, 0 (pruned) at the bottom."""
    layers = [(n, w, a) for n, w, a in layers if _num(w) or _num(a)]
    if not layers:
        return empty_chart(title, "no layer bits recorded")
    width = max(W, M_LEFT + M_RIGHT + 14 * len(layers))
    pw, ph = width - M_LEFT - M_RIGHT, H - M_TOP - M_BOTTOM
    top = _bit_level(32)

    def py(b: float) -> float:
        return M_TOP + (1 - _bit_level(b) / top) * ph

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart bits" viewBox="0 0 {width} {H}" width="{width}" '
        f'height="{H}" role="img" aria-label="{escape(title)}">',
        f'<text x="{width / 2}" y="18" text-anchor="middle" class="t">{escape(title)}</text>',
        f'<rect x="{M_LEFT}" y="{M_TOP}" width="{pw}" height="{ph}" class="plot"/>',
    ]
    for t in BIT_TICKS:
        parts.append(f'<line x1="{M_LEFT}" y1="{py(t):.1f}" x2="{M_LEFT + pw}" y2="{py(t):.1f}" class="g"/>')
        parts.append(f'<text x="{M_LEFT - 5}" y="{py(t) + 4:.1f}" text-anchor="end">{t}</text>')
    parts.append(
        f'<text transform="translate(14 {M_TOP + ph / 2}) rotate(-90)" text-anchor="middle" class="l">bits</text>'
        f'<text x="{M_LEFT + pw / 2}" y="{H - 8}" text-anchor="middle" class="l">layer (in model order)</text>'
    )
    slot = pw / len(layers)
    bar = max(1.0, slot * 0.38)
    for i, (name, w, a) in enumerate(layers):
        x0 = M_LEFT + i * slot + slot * 0.12
        for j, (role, b, color) in enumerate((("W", w, PALETTE[0]), ("A", a, PALETTE[3]))):
            if not _num(b):
                continue
            y = py(float(b))
            h = M_TOP + ph - y
            parts.append(
                f'<rect x="{x0 + j * bar:.1f}" y="{y:.1f}" width="{bar:.1f}" height="{max(h, 0):.1f}" '
                f'fill="{color}" class="bar" data-role="{role}" data-bits="{escape(_fmt(float(b)))}">'
                f"<title>{escape(name)}: {role} {escape(_fmt(float(b)))} bits</title></rect>"
            )
    for k, (label, color) in enumerate((("weights", PALETTE[0]), ("activations", PALETTE[3]))):
        y = M_TOP + 8 + k * 15
        x = M_LEFT + pw + 14
        parts.append(f'<rect x="{x - 4}" y="{y - 8}" width="8" height="8" fill="{color}"/>')
        parts.append(f'<text x="{x + 8}" y="{y}" class="lg">{label}</text>')
    return Markup("".join(parts) + "</svg>")


def _num(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))
