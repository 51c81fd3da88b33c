"""Suite files: validation of the whole file, then expansion into cells.

A suite declares a grid (dataset x model x method x bit-widths x seeds) with training
recipes settable at any level (``defaults`` < experiment < method entry < per-bits) and
overridable below. :func:`load_suite` validates everything before anything runs: unknown
keys, unknown datasets/models/methods (with a did-you-mean), bit-widths outside 1..32 or
unsupported by the method, non-positive epochs, method options, missing files. Each error
is one :class:`QbenchError` naming the file and the key path.

:func:`expand` turns a suite into cells, parents first: the full-precision baseline of a
dataset/model, then methods initialised from it, and progressive chains (APoT trains
4 bits from 5, 3 from 4, ...).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    ValidationError,
    field_validator,
)
from qbench.methods.recipe import Recipe

from .errors import QbenchError

_STRICT = ConfigDict(extra="forbid")


_BITS = re.compile(r"^W(\d+)A(\d+)$")


class Bits(BaseModel):
    model_config = _STRICT
    w: int
    a: int

    @property
    def label(self) -> str:
        return f"W{self.w}A{self.a}"


def parse_bits(value: Any) -> Bits:
    if isinstance(value, str):
        m = _BITS.match(value.strip().upper())
        if not m:
            raise ValueError(f"bit-width {value!r} is not of the form W<bits>A<bits> (e.g. W4A4, W2A32)")
        w, a = int(m.group(1)), int(m.group(2))
    elif isinstance(value, dict):
        w, a = value.get("w"), value.get("a")
        if not isinstance(w, int) or not isinstance(a, int) or set(value) - {"w", "a"}:
            raise ValueError(f"bit-width {value!r} must be W<bits>A<bits> or {{w: int, a: int}}")
    else:
        raise ValueError(f"bit-width {value!r} must be W<bits>A<bits> (e.g. W4A4)")
    for role, b in (("weight", w), ("activation", a)):
        if not 1 <= b <= 32:
            raise ValueError(f"{role} bits {b} out of range 1..32 in {value!r}")
    return Bits(w=w, a=a)


class MethodEntry(BaseModel):
    model_config = _STRICT
    method: str
    bits: list[Any] = Field(min_length=1)
    options: dict[str, Any] = {}
    recipe: dict[str, Any] = {}
    bit_recipes: dict[str, dict[str, Any]] = {}
    init: Literal["baseline", "scratch", "progressive"] | None = None
    seeds: list[int] | None = None
    comment: str = ""

    @field_validator("bits")
    @classmethod
    def _bits(cls, v: list[Any]) -> list[Bits]:
        return [parse_bits(b) for b in v]


class Baseline(BaseModel):
    model_config = _STRICT
    recipe: dict[str, Any] = {}
    options: dict[str, Any] = {}
    comment: str = ""


class Experiment(BaseModel):
    model_config = _STRICT
    dataset: str | list[str]
    model: str | list[str]
    dataset_options: dict[str, Any] = {}
    model_options: dict[str, Any] = {}
    recipe: dict[str, Any] = {}
    seeds: list[int] | None = None
    comment: str = ""
    baseline: Baseline = Baseline()
    methods: list[MethodEntry] = []


class Defaults(BaseModel):
    model_config = _STRICT
    seeds: list[int] = Field([0], min_length=1)
    recipe: dict[str, Any] = {}
    dataset_options: dict[str, Any] = {}
    model_options: dict[str, Any] = {}


class SuiteFile(BaseModel):
    model_config = _STRICT
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    description: str = ""
    tolerance: NonNegativeFloat = 0.5
    defaults: Defaults = Defaults()
    experiments: list[Experiment] = Field(min_length=1)


# -- cells -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    """One unit of work: a fully resolved (dataset, model, method, bits, seed, recipe)."""

    suite: str
    dataset: str
    model: str
    method: str
    w_bits: int
    a_bits: int
    seed: int
    recipe: dict
    dataset_options: dict = field(default_factory=dict)
    model_options: dict = field(default_factory=dict)
    options: dict = field(default_factory=dict)
    parent: str | None = None
    parent_method: str | None = None
    comment: str = ""
    tolerance: float = 0.5
    method_version: int = 1
    #: the seed-independent configuration: cells that differ only in their seed (and their
    #: parents' seeds) share it; the leaderboard averages over a group
    group: str = ""

    def identity(self) -> dict:
        """Everything that determines the result (not the suite name or comments): the
        options are the method's validated options with their defaults filled in, and the
        method's ``version`` is part of it."""
        return {
            "dataset": self.dataset,
            "dataset_options": self.dataset_options,
            "model": self.model,
            "model_options": self.model_options,
            "method": self.method,
            "method_version": self.method_version,
            "options": self.options,
            "w_bits": self.w_bits,
            "a_bits": self.a_bits,
            "seed": self.seed,
            "recipe": self.recipe,
            "parent": self.parent,
        }

    @property
    def id(self) -> str:
        return _digest(self.identity(), 16)

    def group_of(self, parent_group: str | None) -> str:
        """This cell's group given its parent's group (see ``group``)."""
        ident = {k: v for k, v in self.identity().items() if k not in ("seed", "parent")}
        return _digest({**ident, "parent_group": parent_group}, 12)

    @property
    def typed_recipe(self) -> Recipe:
        return Recipe(**self.recipe)

    @property
    def bits_label(self) -> str:
        return "FP32" if self.method == "fp32" else f"W{self.w_bits}A{self.a_bits}"

    @property
    def label(self) -> str:
        return f"{self.dataset}/{self.model} {self.method} {self.bits_label} seed {self.seed}"

    def config(self) -> dict:
        return {
            "id": self.id,
            "suite": self.suite,
            **self.identity(),
            "parent_method": self.parent_method,
            "comment": self.comment,
            "tolerance": self.tolerance,
            "group": self.group,
        }


def _digest(obj: dict, n: int) -> str:
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:n]


@dataclass
class Suite:
    path: Path
    spec: SuiteFile
    cells: list[Cell]

    @property
    def name(self) -> str:
        return self.spec.name


def _loc(parts: tuple) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def _unknown_key(key: str) -> str:
    known = {f for m in (SuiteFile, Defaults, Experiment, Baseline, MethodEntry, Recipe) for f in m.model_fields}
    close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
    return "unknown key" + (f" (did you mean {close[0]!r}?)" if close else "")


def _recipe(partial: dict, where: str) -> None:
    """Validate a partial recipe; the error names the key inside it."""
    try:
        Recipe(**partial)
    except ValidationError as e:
        err = e.errors()[0]
        if err["type"] == "extra_forbidden":
            raise QbenchError(_unknown_key(str(err["loc"][-1])), f"{where}.{_loc(err['loc'])}") from None
        raise QbenchError(f"{_msg(err)} (got {err.get('input')!r})", f"{where}.{_loc(err['loc'])}") from None
    except TypeError as e:
        raise QbenchError(str(e), where) from None


def _msg(err: dict) -> str:
    """Pydantic's message without its "Value error, " / "Assertion failed, " prefix."""
    msg = str(err.get("msg", ""))
    for prefix in ("Value error, ", "Assertion failed, "):
        if msg.startswith(prefix):
            return msg[len(prefix) :]
    return msg


def validate_options(cls, options: dict, where: str) -> dict:
    """A method's options validated by its ``Options`` model, returned with every default
    filled in (so ``{}`` and the defaults written out are the same cell)."""
    try:
        return cls.Options(**options).model_dump(mode="json")
    except ValidationError as e:
        err = e.errors()[0]
        if err["type"] == "extra_forbidden":
            key = str(err["loc"][-1])
            close = difflib.get_close_matches(key, list(cls.Options.model_fields), n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            known = ", ".join(cls.Options.model_fields) or "none"
            raise QbenchError(
                f"unknown option{hint}; {cls.name} options: {known}", f"{where}.{_loc(err['loc'])}"
            ) from None
        raise QbenchError(f"{_msg(err)} (got {err.get('input')!r})", f"{where}.{_loc(err['loc'])}") from None


_FILE_KEYS = {"weights", "checkpoint", "path", "file", "init_checkpoint"}


def _check_files(opts: dict, base: Path, where: str) -> dict:
    """Option values that name files must exist; relative paths are taken from the suite's folder."""
    out = dict(opts)
    for k, v in opts.items():
        if (k in _FILE_KEYS or k.endswith("_file")) and isinstance(v, str) and ("/" in v or "." in v):
            p = Path(v).expanduser()
            p = p if p.is_absolute() else (base / p)
            if not p.exists():
                raise QbenchError(f"file not found: {p}", f"{where}.{k}")
            out[k] = str(p.resolve())
    return out


def load_suite(path: str | Path) -> Suite:
    """Read, validate and expand a suite file. Raises QbenchError naming file and key."""
    path = Path(path)
    if not path.is_file():
        raise QbenchError("suite file not found", str(path))
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark else ""
        raise QbenchError(f"not valid YAML{line}: {getattr(e, 'problem', e)}", str(path)) from None
    if not isinstance(raw, dict):
        raise QbenchError("a suite must be a mapping with name, experiments, ...", str(path))
    try:
        spec = SuiteFile.model_validate(raw)
    except ValidationError as e:
        errs = sorted(e.errors(), key=lambda x: x["type"] != "extra_forbidden")  # unknown keys first
        err = errs[0]
        msg = _msg(err)
        if err["type"] == "extra_forbidden":
            msg = _unknown_key(str(err["loc"][-1]))
        elif err["type"] == "missing":
            msg = "required key is missing"
        raise QbenchError(msg, f"{path}: {_loc(err['loc'])}") from None
    cells = expand(spec, path)
    return Suite(path=path, spec=spec, cells=cells)


def parse_option_pairs(pairs: tuple[str, ...] | list[str], flag: str) -> dict:
    """``key=value`` options from the command line (``--option``, ``--model-option``, ...):
    a value is read as JSON (so ``1e-4`` is a number), else as YAML (``[a, b]``, ``true``,
    plain words as strings)."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise QbenchError(f"expected key=value, got {pair!r}", flag)
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            try:
                out[key] = yaml.safe_load(value)
            except yaml.YAMLError as e:
                raise QbenchError(f"value of {key!r} is not valid YAML: {e}", flag) from None
    return out


def _merge(*dicts: dict) -> dict:
    out: dict = {}
    for d in dicts:
        out.update(d)
    return out


def _as_list(v: str | list[str]) -> list[str]:
    return [v] if isinstance(v, str) else list(v)


def expand(spec: SuiteFile, path: Path) -> list[Cell]:
    """Validate names, options and recipes against the registries and build the cells,
    parents before children, each cell once."""
    from qbench.methods import get_method

    from .data import DATASETS
    from .models import MODELS

    f = str(path)
    base = path.resolve().parent
    _recipe(spec.defaults.recipe, f"{f}: defaults.recipe")
    cells: dict[str, Cell] = {}

    def add(cell: Cell) -> Cell:
        parent_group = cells[cell.parent].group if cell.parent else None
        cell = replace(cell, group=cell.group_of(parent_group))
        return cells.setdefault(cell.id, cell)

    fp32 = get_method("fp32")

    for i, exp in enumerate(spec.experiments):
        ew = f"{f}: experiments[{i}]"
        _recipe(exp.recipe, f"{ew}.recipe")
        _recipe(exp.baseline.recipe, f"{ew}.baseline.recipe")
        datasets, models = _as_list(exp.dataset), _as_list(exp.model)
        for d in datasets:
            DATASETS.get(d, f"{ew}.dataset")
        for m in models:
            MODELS.get(m, f"{ew}.model")
        dopts = _check_files(_merge(spec.defaults.dataset_options, exp.dataset_options), base, f"{ew}.dataset_options")
        mopts = _check_files(_merge(spec.defaults.model_options, exp.model_options), base, f"{ew}.model_options")
        base_opts = validate_options(fp32, exp.baseline.options, f"{ew}.baseline.options")
        entries = []
        for j, entry in enumerate(exp.methods):
            mw = f"{ew}.methods[{j}]"
            cls = get_method(entry.method, f"{mw}.method")
            _recipe(entry.recipe, f"{mw}.recipe")
            labels = {b.label for b in entry.bits}
            for k, b in enumerate(entry.bits):
                if b.w not in cls.weight_bits or b.a not in cls.act_bits:
                    raise QbenchError(
                        f"{entry.method} does not support {b.label} "
                        f"(weights {min(cls.weight_bits)}..{max(cls.weight_bits)}, "
                        f"activations {min(cls.act_bits)}..{max(cls.act_bits)} bits)",
                        f"{mw}.bits[{k}]",
                    )
            for label, partial in entry.bit_recipes.items():
                if label not in labels:
                    raise QbenchError(
                        f"{label!r} is not one of this entry's bits {sorted(labels)}", f"{mw}.bit_recipes"
                    )
                _recipe(partial, f"{mw}.bit_recipes.{label}")
            opts = _check_files(validate_options(cls, entry.options, f"{mw}.options"), base, f"{mw}.options")
            entries.append((entry, cls, opts))
        for d in datasets:
            for m in models:
                seeds = exp.seeds or spec.defaults.seeds
                common = dict(
                    suite=spec.name,
                    dataset=d,
                    model=m,
                    dataset_options=dopts,
                    model_options=mopts,
                    tolerance=spec.tolerance,
                )
                baselines = {}
                for s in seeds:
                    r = Recipe(**_merge(spec.defaults.recipe, exp.recipe, exp.baseline.recipe)).model_dump()
                    baselines[s] = add(
                        Cell(
                            method="fp32",
                            w_bits=32,
                            a_bits=32,
                            seed=s,
                            recipe=r,
                            options=base_opts,
                            method_version=fp32.version,
                            comment=exp.baseline.comment or exp.comment,
                            **common,
                        )
                    )
                for entry, cls, opts in entries:
                    init = entry.init or ("scratch" if cls.init == "scratch" else "baseline")
                    for s in entry.seeds or seeds:
                        prev: Cell | None = baselines.get(s)
                        if prev is None:  # entry-specific seed: its own baseline
                            r = Recipe(**_merge(spec.defaults.recipe, exp.recipe, exp.baseline.recipe)).model_dump()
                            prev = add(
                                Cell(
                                    method="fp32",
                                    w_bits=32,
                                    a_bits=32,
                                    seed=s,
                                    recipe=r,
                                    options=base_opts,
                                    method_version=fp32.version,
                                    **common,
                                )
                            )
                        for b in entry.bits:
                            r = Recipe(
                                **_merge(
                                    spec.defaults.recipe, exp.recipe, entry.recipe, entry.bit_recipes.get(b.label, {})
                                )
                            ).model_dump()
                            parent = None if init == "scratch" else prev
                            cell = add(
                                Cell(
                                    method=entry.method,
                                    w_bits=b.w,
                                    a_bits=b.a,
                                    seed=s,
                                    recipe=r,
                                    options=opts,
                                    method_version=cls.version,
                                    parent=parent.id if parent else None,
                                    parent_method=parent.method if parent else None,
                                    comment="; ".join(c for c in (exp.comment, entry.comment) if c),
                                    **common,
                                )
                            )
                            if init == "progressive":
                                prev = cell
    return list(cells.values())
