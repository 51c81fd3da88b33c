"""Suite files: validation of the whole file, then expansion into cells.

A suite declares a grid (dataset x model x method x bit-widths x seeds) with training
recipes settable at any level (``defaults`` < experiment < method entry < per-bits) and
overridable below. :func:`load_suite` validates everything before anything runs, within
seconds: the file itself (at most 1 MB of UTF-8 YAML, no duplicate keys, no anchors or
aliases, at most 20 levels deep), unknown keys, unknown datasets/models/methods (with a
did-you-mean), bit-widths outside 1..32 or unsupported by the method, non-positive
epochs, seeds, the options of methods, models and datasets (names and types, read from
the factories' signatures; keys and values MLflow can store), weights files that are not
loadable checkpoints, missing files, grids of more than 100,000 cells, and every distinct
model built once on the meta device for its dataset's shape (no memory, no data). Each
error is one :class:`QbenchError` naming the file and the key path.

:func:`expand` turns a suite into cells, parents first: the full-precision baseline of a
dataset/model, then methods initialised from it, and progressive chains (APoT trains
4 bits from 5, 3 from 4, ...).
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import inspect
import json
import posixpath
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
)
from qbench.methods.recipe import Recipe, identity_recipe

from .errors import QbenchError

_STRICT = ConfigDict(extra="forbid")

#: a suite file larger than this is refused before it is read
MAX_SUITE_BYTES = 1_000_000
#: mappings and lists nested deeper than this are refused (a suite needs about 8)
MAX_DEPTH = 20
#: a suite that expands to more cells than this is refused before the cells are built
MAX_CELLS = 100_000
#: the longest suite, dataset, model or method name
MAX_NAME = 100
#: the longest comment (stored as an MLflow tag with the experiment's and entry's joined)
MAX_COMMENT = 2_000
#: a model with more parameters than this is refused (a typo'd width, not a plan)
MAX_PARAMETERS = 1_000_000_000
#: MLflow's limits on a parameter (mlflow.utils.validation): the key's characters and
#: length, the value's length
MLFLOW_KEY = re.compile(r"[/\w.\- ]+")
MLFLOW_MAX_KEY = 250
MLFLOW_MAX_VALUE = 6_000
#: a seed is handed to numpy, which takes 0 .. 2**32 - 1
Seed = Annotated[int, Field(strict=True, ge=0, le=2**32 - 1)]
Seeds = Annotated[list[Seed], Field(min_length=1)]
Comment = Annotated[str, Field(max_length=MAX_COMMENT)]


_BITS = re.compile(r"^W(\d+)A(\d+)$")


class Bits(BaseModel):
    model_config = _STRICT
    w: int
    a: int

    @property
    def label(self) -> str:
        return f"W{self.w}A{self.a}"


def _short(value: Any, n: int = 60) -> str:
    """``repr(value)``, cut to about ``n`` characters (an error line quotes what it got)."""
    text = repr(value)
    return text if len(text) <= n else f"{text[:n]}... ({len(text)} characters)"


def _int(v: Any) -> bool:
    """An integer, and not a boolean (``True`` is an ``int`` to Python, not to a suite)."""
    return isinstance(v, int) and not isinstance(v, bool)


def parse_bits(value: Any) -> Bits:
    if isinstance(value, str):
        m = _BITS.match(value.strip().upper()) if len(value) <= 20 else None
        if not m:
            raise ValueError(f"bit-width {_short(value)} is not of the form W<bits>A<bits> (e.g. W4A4, W2A32)")
        w, a = int(m.group(1)), int(m.group(2))
    elif isinstance(value, dict):
        w, a = value.get("w"), value.get("a")
        if isinstance(w, bool) or isinstance(a, bool):
            raise ValueError(f"bit-width {_short(value)}: true/false is not a number of bits")
        if not _int(w) or not _int(a) or set(value) - {"w", "a"}:
            raise ValueError(f"bit-width {_short(value)} must be W<bits>A<bits> or {{w: int, a: int}}")
    else:
        raise ValueError(f"bit-width {_short(value)} must be W<bits>A<bits> (e.g. W4A4)")
    for role, b in (("weight", w), ("activation", a)):
        if not 1 <= b <= 32:
            raise ValueError(f"{role} bits {_short(b)} out of range 1..32 in {_short(value)}")
    return Bits(w=w, a=a)


class MethodEntry(BaseModel):
    model_config = _STRICT
    method: str
    bits: list[Any] = Field(min_length=1)
    options: dict[str, Any] = {}
    recipe: dict[str, Any] = {}
    bit_recipes: dict[str, dict[str, Any]] = {}
    init: Literal["baseline", "scratch", "progressive"] | None = None
    seeds: Seeds | None = None
    comment: Comment = ""

    @field_validator("bits")
    @classmethod
    def _bits(cls, v: list[Any]) -> list[Bits]:
        return [parse_bits(b) for b in v]


class Baseline(BaseModel):
    model_config = _STRICT
    recipe: dict[str, Any] = {}
    options: dict[str, Any] = {}
    comment: Comment = ""


class Experiment(BaseModel):
    model_config = _STRICT
    #: classification (the default), or detection / instance segmentation (see harness.detect)
    task: Literal["classification", "detection", "instance_segmentation"] = "classification"
    dataset: str | list[str]
    model: str | list[str]
    dataset_options: dict[str, Any] = {}
    model_options: dict[str, Any] = {}
    recipe: dict[str, Any] = {}
    seeds: Seeds | None = None
    comment: Comment = ""
    baseline: Baseline = Baseline()
    methods: list[MethodEntry] = []


class Defaults(BaseModel):
    model_config = _STRICT
    seeds: Seeds = [0]
    recipe: dict[str, Any] = {}
    dataset_options: dict[str, Any] = {}
    model_options: dict[str, Any] = {}


class SuiteFile(BaseModel):
    model_config = _STRICT
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=MAX_NAME)
    description: str = Field("", max_length=20_000)
    tolerance: float = Field(0.5, ge=0, allow_inf_nan=False)
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
    #: classification, detection or instance_segmentation (part of the identity unless classification)
    task: str = "classification"

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
            "recipe": identity_recipe(self.recipe),
            "parent": self.parent,
            # classification cells keep the ids they had before tasks existed
            **({"task": self.task} if self.task != "classification" else {}),
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


def _key(part: Any) -> str:
    """A key as a key path shows it: on one line, a long one cut short."""
    text = re.sub(r"[\x00-\x1f\x7f]", "?", str(part))
    return text if len(text) <= 60 else f"{text[:40]}...({len(text)} characters)"


def _loc(parts: tuple) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{_key(p)}" if out else _key(p))
    return out


def _unknown_key(key: str) -> str:
    known = {f for m in (SuiteFile, Defaults, Experiment, Baseline, MethodEntry, Recipe) for f in m.model_fields}
    close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
    return "unknown key" + (f" (did you mean {close[0]!r}?)" if close else "")


def _leaves(ann: Any) -> set:
    """The types an annotation admits (through ``Annotated``, unions and ``Literal``)."""
    origin = typing.get_origin(ann)
    if origin is Annotated:
        return _leaves(typing.get_args(ann)[0])
    if origin in (typing.Union, types.UnionType):
        return set().union(*(_leaves(a) for a in typing.get_args(ann)))
    if origin is Literal:
        return {type(a) for a in typing.get_args(ann)}
    return {origin or ann}


def _number_not_bool(ann: Any) -> bool:
    leaves = _leaves(ann)
    return bool(leaves & {int, float}) and not leaves & {bool, Any, object}


def _list_item(ann: Any) -> Any:
    """The item type of a list annotation (or of the list member of a union), else None."""
    origin = typing.get_origin(ann)
    if origin is Annotated:
        return _list_item(typing.get_args(ann)[0])
    if origin is list:
        args = typing.get_args(ann)
        return args[0] if args else None
    if origin in (typing.Union, types.UnionType):
        return next((i for a in typing.get_args(ann) if (i := _list_item(a)) is not None), None)
    return None


def _refuse_bools(model: type[BaseModel], data: dict, where: str) -> None:
    """``true`` where a model's field wants a number: pydantic would take it as 1."""
    for k, v in data.items():
        fld = model.model_fields.get(k) if isinstance(k, str) else None
        if fld is None:
            continue
        if isinstance(v, bool) and _number_not_bool(fld.annotation):
            raise QbenchError(f"{str(v).lower()} is a boolean; a number is expected", f"{where}.{_key(k)}")
        item = _list_item(fld.annotation)
        if isinstance(v, list) and item is not None and _number_not_bool(item):
            for i, x in enumerate(v):
                if isinstance(x, bool):
                    raise QbenchError(f"{str(x).lower()} is a boolean; a number is expected", f"{where}.{_key(k)}[{i}]")


def _recipe(partial: dict, where: str) -> None:
    """Validate a partial recipe; the error names the key inside it."""
    try:
        Recipe(**partial)
    except ValidationError as e:
        err = e.errors()[0]
        if err["type"] == "extra_forbidden":
            raise QbenchError(_unknown_key(str(err["loc"][-1])), f"{where}.{_loc(err['loc'])}") from None
        raise QbenchError(f"{_msg(err)} (got {_short(err.get('input'))})", f"{where}.{_loc(err['loc'])}") from None
    except TypeError as e:
        raise QbenchError(str(e), where) from None
    _refuse_bools(Recipe, partial, where)


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
        out = cls.Options(**options).model_dump(mode="json")
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
        raise QbenchError(f"{_msg(err)} (got {_short(err.get('input'))})", f"{where}.{_loc(err['loc'])}") from None
    except TypeError as e:  # a key that is not a string
        raise QbenchError(" ".join(str(e).split()), where) from None
    _refuse_bools(cls.Options, options, where)
    return out


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


# -- reading the file ----------------------------------------------------------------------

_BOMS = (
    (b"\xff\xfe\x00\x00", "UTF-32"),
    (b"\x00\x00\xfe\xff", "UTF-32"),
    (b"\xff\xfe", "UTF-16"),
    (b"\xfe\xff", "UTF-16"),
)


def _read_text(path: Path) -> str:
    """The file as text: at most :data:`MAX_SUITE_BYTES` (checked before reading), UTF-8."""
    f = str(path)
    limit = f"a suite file is at most {MAX_SUITE_BYTES // 1_000_000} MB"
    try:
        size = path.stat().st_size
        if size > MAX_SUITE_BYTES:
            raise QbenchError(f"the file is {size / 1e6:.1f} MB; {limit}", f)
        with path.open("rb") as fh:
            data = fh.read(MAX_SUITE_BYTES + 1)
    except OSError as e:
        raise QbenchError(f"cannot read the file ({type(e).__name__}: {e.strerror or e})", f) from None
    if len(data) > MAX_SUITE_BYTES:  # it grew since stat
        raise QbenchError(f"the file is larger than {MAX_SUITE_BYTES // 1_000_000} MB; {limit}", f)
    for bom, encoding in _BOMS:
        if data.startswith(bom):
            raise QbenchError(
                f"the file is {encoding} text (it starts with a {encoding} byte-order mark); save it as UTF-8", f
            )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise QbenchError(
            f"not UTF-8 text: byte 0x{data[e.start]:02x} at line {line} is not UTF-8; save the file as UTF-8", f
        ) from None
    if "\x00" in text:
        line = text.count("\n", 0, text.index("\x00")) + 1
        raise QbenchError(f"the file holds NUL bytes (line {line}): is it UTF-16? save it as UTF-8", f)
    return text.removeprefix("\ufeff")


@dataclass
class _Node:
    """A mapping or list open in :func:`_check_structure`: its key path and what comes next."""

    kind: str  # "map" | "seq"
    path: tuple
    role: str  # how it sits in its parent: "root", "key", "value", "item"
    expect_key: bool = True
    key: Any = None
    seen: dict = field(default_factory=dict)
    index: int = 0


def _check_structure(text: str, f: str) -> None:
    """One pass over the YAML events, before anything is built from them: anchors and
    aliases (a billion-laughs expansion), duplicate keys and nesting deeper than
    :data:`MAX_DEPTH` are refused with the line and the key path."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    stack: list[_Node] = []

    def where(path: tuple) -> str:
        return f"{f}: {_loc(path)}" if path else f

    def done(role: str) -> None:
        if not stack:
            return
        parent = stack[-1]
        if role == "item":
            parent.index += 1
        elif role == "key":
            parent.expect_key = False
        elif role == "value":
            parent.expect_key = True

    for ev in yaml.parse(text, Loader=loader):
        if isinstance(ev, (yaml.StreamStartEvent, yaml.StreamEndEvent, yaml.DocumentStartEvent, yaml.DocumentEndEvent)):
            continue
        if isinstance(ev, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            done(stack.pop().role)
            continue
        line = ev.start_mark.line + 1
        # where this node sits
        role, path = "root", ()
        if stack:
            parent = stack[-1]
            if parent.kind == "seq":
                role, path = "item", (*parent.path, parent.index)
            elif parent.expect_key:
                key = ev.value if isinstance(ev, yaml.ScalarEvent) else "?"
                if isinstance(ev, yaml.ScalarEvent):
                    if key in parent.seen:
                        raise QbenchError(
                            f"duplicate key {_key(key)!r} at line {line} (first at line {parent.seen[key]}): "
                            "a key may appear only once in a mapping",
                            where((*parent.path, key)),
                        )
                    parent.seen[key] = line
                parent.key = key
                role, path = "key", (*parent.path, key)
            else:
                role, path = "value", (*parent.path, parent.key)
        if isinstance(ev, yaml.AliasEvent) or getattr(ev, "anchor", None) is not None:
            raise QbenchError(
                f"YAML anchors and aliases (&name, *name) are not allowed in a suite (line {line}): "
                "write the value out where it is used",
                where(path),
            )
        if isinstance(ev, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            if len(stack) >= MAX_DEPTH:
                raise QbenchError(f"nested more than {MAX_DEPTH} levels deep (line {line})", where(path))
            stack.append(_Node("map" if isinstance(ev, yaml.MappingStartEvent) else "seq", path, role))
        else:
            done(role)


def _read_yaml(path: Path) -> Any:
    f = str(path)
    text = _read_text(path)
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        _check_structure(text, f)
        return yaml.load(text, Loader=loader)  # noqa: S506 - a safe loader
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        position = getattr(e, "position", None)  # a ReaderError: a character YAML does not allow
        if mark is not None:
            line = f" at line {mark.line + 1}"
        elif isinstance(position, int):
            line = f" at line {text.count(chr(10), 0, position) + 1}"
        else:
            line = ""
        problem = getattr(e, "problem", None) or getattr(e, "reason", None) or str(e)
        context = getattr(e, "context", None)
        if context and problem != str(e):
            problem = f"{context}, {problem}"
        char = getattr(e, "character", None)
        if char is not None:
            problem = f"{problem} (#x{ord(char) if isinstance(char, str) else char:04x})"
        raise QbenchError(f"not valid YAML{line}: {' '.join(str(problem).split())[:300]}", f) from None


def _one_line(text: str, limit: int) -> str:
    text = re.sub(r"[\x00-\x1f\x7f]+", " ", text)
    return text if len(text) <= limit else f"{text[:limit]}..."


def load_suite(path: str | Path) -> Suite:
    """Read, validate and expand a suite file. Raises QbenchError naming file and key, on
    one line."""
    try:
        return _load_suite(Path(path))
    except QbenchError as e:
        message, where = _one_line(e.message, 2000), _one_line(e.where, 1000) if e.where else None
        if (message, where) == (e.message, e.where):
            raise
        raise QbenchError(message, where) from None


def _load_suite(path: Path) -> Suite:
    if not path.is_file():
        raise QbenchError("suite file not found", str(path))
    raw = _read_yaml(path)
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
        elif not isinstance(err.get("input"), (dict, list)) and err["type"] != "value_error":
            msg = f"{msg} (got {_short(err.get('input'))})"
        raise QbenchError(msg, f"{path}: {_loc(err['loc'])}") from None
    if isinstance(raw.get("tolerance"), bool):
        raise QbenchError(f"{str(raw['tolerance']).lower()} is a boolean; a number is expected", f"{path}: tolerance")
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


# -- names, grid size, options of models and datasets ----------------------------------------


def _name(value: str, kind: str, where: str) -> str:
    if not value or len(value) > MAX_NAME:
        got = "an empty name" if not value else f"a name of {len(value)} characters"
        raise QbenchError(f"{got}; a {kind} name has 1 to {MAX_NAME} characters", where)
    return value


def _names(value: str | list[str], kind: str, where: str) -> list[str]:
    names = _as_list(value)
    if not names:
        raise QbenchError(f"an empty list: name at least one {kind}", where)
    return [_name(n, kind, f"{where}[{i}]" if isinstance(value, list) else where) for i, n in enumerate(names)]


def _count_cells(spec: SuiteFile, f: str) -> int:
    """How many cells the suite expands to at most (before any is built)."""
    total = 0
    for i, exp in enumerate(spec.experiments):
        seeds = set(exp.seeds or spec.defaults.seeds)
        per_pair = len(seeds)
        for entry in exp.methods:
            own = set(entry.seeds or seeds)
            per_pair += len(own) * len(entry.bits) + len(own - seeds)
        n = len(_as_list(exp.dataset)) * len(_as_list(exp.model)) * per_pair
        total += n
        if total > MAX_CELLS:
            raise QbenchError(
                f"the suite expands to more than {MAX_CELLS:,} cells (this experiment alone: {n:,} = datasets x "
                "models x seeds x bit-widths); split it or shrink the grid",
                f"{f}: experiments[{i}]",
            )
    return total


#: parameters of a factory that qbench sets itself, never options
_MODEL_SET = {"num_classes": "the dataset", "in_channels": "the dataset", "image_size": "the dataset"}
_DATASET_SET = {"root": "--data-root"}
_RESERVED = ("name", "where")  # create_model's and load_dataset's own arguments
_PLAIN = {int, float, str, bool, type(None), list, dict, Any}


@dataclass
class _Signature:
    params: dict[str, Any]  # option name -> its annotation (None: none, or not one to check)
    var_kw: bool  # takes **options: names outside ``params`` cannot be told from its signature


def _signature(fn: Callable, set_by_qbench: dict[str, str]) -> _Signature | None:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # an annotation that does not resolve: names only
        hints = {}
    params, var_kw = {}, False
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    for i, p in enumerate(sig.parameters.values()):
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            var_kw = True
        elif p.kind in kinds and p.name not in set_by_qbench and not (i == 0 and p.name == "root"):
            params[p.name] = hints.get(p.name)
    return _Signature(params, var_kw)


def _plain(ann: Any) -> bool:
    """An annotation of YAML's own types only (so a strict check means what it says)."""
    origin = typing.get_origin(ann)
    if origin is Annotated:
        return _plain(typing.get_args(ann)[0])
    if origin in (typing.Union, types.UnionType, list, dict):
        return all(_plain(a) for a in typing.get_args(ann))
    if origin is Literal:
        return True
    return ann in _PLAIN


@functools.lru_cache(maxsize=256)
def _adapter(ann: Any) -> TypeAdapter | None:
    try:
        return TypeAdapter(ann, config=ConfigDict(strict=True)) if _plain(ann) else None
    except Exception:  # not a type pydantic builds a validator for
        return None


def _check_value_type(ann: Any, value: Any, where: str) -> None:
    try:
        adapter = _adapter(ann)
    except TypeError:  # an unhashable annotation
        adapter = None
    if adapter is None:
        return
    try:
        adapter.validate_python(value)
    except ValidationError as e:
        err = e.errors()[0]
        loc = "".join(f"[{p}]" if isinstance(p, int) else "" for p in err["loc"])
        raise QbenchError(f"{_msg(err)} (got {_short(value)})", f"{where}{loc}") from None


def _json_plain(value: Any) -> bool:
    if value is None or isinstance(value, (str, int, float, bool)):
        return True
    if isinstance(value, list):
        return all(_json_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _json_plain(v) for k, v in value.items())
    return False


def _check_storable(prefix: str, opts: dict, where: Callable[[str], str]) -> None:
    """Options become MLflow parameters ``<prefix>.<key>`` (nested mappings flattened):
    their names and values must be ones MLflow stores."""
    from .tracking import flatten

    for key, value in opts.items():
        if not isinstance(key, str) or not key:
            raise QbenchError(f"an option name must be a non-empty string (got {_short(key)})", where(str(key)))
        if not _json_plain(value):
            raise QbenchError(
                "an option value must be a number, string, boolean, null, list or mapping with string keys "
                f"(got {_short(value)})",
                where(key),
            )
        for name, text in flatten({key: value}, f"{prefix}.").items():
            if not MLFLOW_KEY.fullmatch(name) or posixpath.normpath(name) != name:
                raise QbenchError(
                    f"option name {_short(name[len(prefix) + 1 :])} cannot be stored in MLflow: names hold only "
                    "letters, digits, _ - . / and spaces, and no empty, '.' or '..' parts",
                    where(key),
                )
            if len(name) > MLFLOW_MAX_KEY:
                raise QbenchError(
                    f"option name is {len(name)} characters as the MLflow parameter {prefix}.<name>; "
                    f"MLflow stores at most {MLFLOW_MAX_KEY}",
                    where(key),
                )
            if len(text) > MLFLOW_MAX_VALUE:
                raise QbenchError(
                    f"the value is {len(text):,} characters long; MLflow stores parameters of at most "
                    f"{MLFLOW_MAX_VALUE:,}",
                    where(key),
                )


def _check_factory_options(
    kind: str,
    name: str,
    fn: Callable,
    opts: dict,
    where: Callable[[str], str],
    set_by_qbench: dict[str, str],
    known_elsewhere: set[str] | None = None,
) -> None:
    """``opts`` against the factory's signature: unknown names (with a did-you-mean),
    names qbench sets itself, and values of the wrong type (strict: ``true`` is no int,
    ``"16"`` no number). A factory taking ``**options`` takes any name its signature
    lists or, where ``known_elsewhere`` is given, any of those (a name no dataset has is
    still a typo); a model's other names are checked when it is built on the meta device."""
    sig = _signature(fn, set_by_qbench)
    for key, value in opts.items():
        if key in set_by_qbench or key in _RESERVED:
            by = set_by_qbench.get(key)
            raise QbenchError(
                f"{key!r} is not a {kind} option: qbench sets it" + (f" from {by}" if by else ""), where(key)
            )
        if sig is None:
            continue
        if key not in sig.params:
            if sig.var_kw and (known_elsewhere is None or key in known_elsewhere):
                continue
            choices = sorted(set(sig.params) | (known_elsewhere or set() if sig.var_kw else set()))
            close = difflib.get_close_matches(key, choices, n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            own = ", ".join(sig.params) or "none"
            raise QbenchError(f"unknown {kind} option{hint}; {name} options: {own}", where(key))
        if sig.params[key] is not None:
            _check_value_type(sig.params[key], value, where(key))


def _check_detection(
    task: str,
    datasets: list[str],
    models: list[str],
    dopts: dict,
    mopts: dict,
    dwhere: Callable[[str], str],
    mwhere: Callable[[str], str],
    ew: str,
) -> None:
    """A detection experiment's names (detection registries) and options (their factories)."""
    from .data.detection import DETECTION_DATASETS
    from .data.digit_scenes import SceneConfig
    from .models.detection import DETECTORS, detector_options, predicts_masks

    scene_options = set(SceneConfig.__dataclass_fields__)
    for d in datasets:
        fn = DETECTION_DATASETS.get(d, f"{ew}.dataset")
        _check_factory_options("dataset", d, fn, dopts, dwhere, _DATASET_SET, scene_options)
    for m in models:
        fn = DETECTORS.get(m, f"{ew}.model")
        if task == "instance_segmentation" and not predicts_masks(m):
            raise QbenchError(
                f"task instance_segmentation needs a model that predicts masks (maskrcnn_*), not {m!r}", f"{ew}.model"
            )
        _check_factory_options("model", m, fn, mopts, mwhere, {"num_classes": "the dataset"}, detector_options(m))


def _dataset_option_names(datasets) -> set[str]:
    names: set[str] = set()
    for _, fn in datasets.items():
        sig = _signature(fn, _DATASET_SET)
        names |= set(sig.params) if sig else set()
    return names


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return " ".join((text[0] if text else type(e).__name__).split())[:300]


@dataclass
class _Build:
    """One distinct model to build on the meta device, and where to report a failure."""

    model: str
    options: dict
    dataset: str
    shape: Any  # harness.data.DatasetShape
    where_model: str
    where_options: str
    where: Callable[[str], str]


def _build_on_meta(b: _Build) -> None:
    """Build the model for its dataset's shape on the meta device (no memory, no data) and
    run one batch through it: a negative width, a shape that does not fit, a weights file
    that does not fit are errors here, in a fraction of a second."""
    import warnings

    import torch

    from .models import create_model
    from .models.weights import is_path

    opts = dict(b.options)
    w = opts.get("weights")
    if isinstance(w, str) and w and not is_path(w):
        opts.pop("weights")  # torchvision's weights by name: from the hub cache when the cell runs
    nc, ch, size = b.shape
    built_for = (
        f"{b.model} cannot be built for {b.dataset} ({nc} classes, {ch} channel{'s' if ch != 1 else ''}, "
        f"{size}x{size})"
        + (f" with {', '.join(f'{k}={_short(v, 30)}' for k, v in b.options.items())}" if b.options else "")
    )

    def fail(e: BaseException) -> None:
        if isinstance(e, QbenchError):
            key = next((k for k in b.options if e.where and e.where.endswith(f".{k}")), None)
            raise QbenchError(e.message, b.where(key) if key else b.where_options) from None
        why = _first_line(e)
        if "meta" in why.lower():
            return  # the model needs real tensors to be built: it is checked when its cell runs
        unexpected = re.search(r"unexpected keyword argument '(\w+)'", why)
        if isinstance(e, TypeError) and unexpected and unexpected.group(1) in b.options:
            raise QbenchError(
                f"unknown model option; {b.model} does not take it", b.where(unexpected.group(1))
            ) from None
        raise QbenchError(f"{built_for}: {why}", b.where_options if b.options else b.where_model) from None

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with torch.device("meta"):
                net = create_model(b.model, num_classes=nc, in_channels=ch, image_size=size, **opts)
        except Exception as e:
            return fail(e)
        where = b.where_options if b.options else b.where_model
        count = sum(p.numel() for p in net.parameters())
        if count > MAX_PARAMETERS:
            raise QbenchError(
                f"{built_for}: it would have {count:.3g} parameters, more than {MAX_PARAMETERS:.0e}", where
            )
        empty = next(((n, p) for n, p in net.named_parameters() if p.numel() == 0), None)
        if empty is not None:
            raise QbenchError(
                f"{built_for}: its layer {empty[0]} would be empty (shape {tuple(empty[1].shape)})", where
            )
        try:
            net.eval()
            with torch.no_grad():
                net(torch.empty(2, ch, size, size, device="meta"))
        except Exception as e:
            return fail(e)
    return None


def _baseline(spec: SuiteFile, exp: Experiment, options: dict, version: int, seed: int, common: dict) -> Cell:
    """The full-precision baseline cell of one experiment's dataset/model for ``seed``."""
    r = Recipe(**_merge(spec.defaults.recipe, exp.recipe, exp.baseline.recipe)).model_dump()
    return Cell(
        method="fp32",
        w_bits=32,
        a_bits=32,
        seed=seed,
        recipe=r,
        options=options,
        method_version=version,
        comment=exp.baseline.comment or exp.comment,
        **common,
    )


def expand(spec: SuiteFile, path: Path) -> list[Cell]:
    """Validate names, options and recipes against the registries and build the cells,
    parents before children, each cell once."""
    from qbench.methods import get_method

    from .data import DATASETS, dataset_shape
    from .models import MODELS
    from .models.weights import is_path, read_state_dict

    f = str(path)
    base = path.resolve().parent
    _count_cells(spec, f)
    _recipe(spec.defaults.recipe, f"{f}: defaults.recipe")
    cells: dict[str, Cell] = {}
    builds: dict[str, _Build] = {}
    weights_read: set[str] = set()
    dataset_option_names: set[str] | None = None

    def add(cell: Cell) -> Cell:
        parent_group = cells[cell.parent].group if cell.parent else None
        cell = replace(cell, group=cell.group_of(parent_group))
        return cells.setdefault(cell.id, cell)

    fp32 = get_method("fp32")

    for i, exp in enumerate(spec.experiments):
        ew = f"{f}: experiments[{i}]"
        _recipe(exp.recipe, f"{ew}.recipe")
        _recipe(exp.baseline.recipe, f"{ew}.baseline.recipe")
        datasets = _names(exp.dataset, "dataset", f"{ew}.dataset")
        models = _names(exp.model, "model", f"{ew}.model")
        classify = exp.task == "classification"  # detection names live in their own registries
        for d in datasets if classify else ():
            DATASETS.get(d, f"{ew}.dataset")
        for m in models if classify else ():
            MODELS.get(m, f"{ew}.model")

        def origin(kind: str, k: str, exp: Experiment = exp, ew: str = ew) -> str:
            own = getattr(exp, f"{kind}_options")
            return f"{ew}.{kind}_options.{_key(k)}" if k in own else f"{f}: defaults.{kind}_options.{_key(k)}"

        def dwhere(k: str, origin=origin) -> str:
            return origin("dataset", k)

        def mwhere(k: str, origin=origin) -> str:
            return origin("model", k)

        dopts = _merge(spec.defaults.dataset_options, exp.dataset_options)
        mopts = _merge(spec.defaults.model_options, exp.model_options)
        _check_storable("dataset_options", dopts, dwhere)
        _check_storable("model_options", mopts, mwhere)
        dopts = _check_files(dopts, base, f"{ew}.dataset_options")
        mopts = _check_files(mopts, base, f"{ew}.model_options")
        for d in datasets if classify else ():
            fn = DATASETS.get(d)
            if dataset_option_names is None:
                dataset_option_names = _dataset_option_names(DATASETS)
            _check_factory_options("dataset", d, fn, dopts, dwhere, _DATASET_SET, dataset_option_names)
        for m in models if classify else ():
            _check_factory_options("model", m, MODELS.get(m), mopts, mwhere, _MODEL_SET)
        if not classify:
            _check_detection(exp.task, datasets, models, dopts, mopts, dwhere, mwhere, ew)
        weights = mopts.get("weights")
        if isinstance(weights, str) and weights and is_path(weights) and weights not in weights_read:
            read_state_dict(weights, mwhere("weights"))  # a checkpoint safe_load reads, holding a state dict
            weights_read.add(weights)
        for d in datasets:
            shape = dataset_shape(d, dopts) if classify else None
            for m in models:
                key = json.dumps([m, mopts, shape], sort_keys=True, default=str)
                if shape is not None and key not in builds:
                    builds[key] = _Build(m, mopts, d, shape, f"{ew}.model", f"{ew}.model_options", mwhere)
        base_opts = validate_options(fp32, exp.baseline.options, f"{ew}.baseline.options")
        _check_storable("options", base_opts, lambda k, ew=ew: f"{ew}.baseline.options.{_key(k)}")
        entries = []
        for j, entry in enumerate(exp.methods):
            mw = f"{ew}.methods[{j}]"
            cls = get_method(_name(entry.method, "method", f"{mw}.method"), f"{mw}.method")
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
            opts = validate_options(cls, entry.options, f"{mw}.options")
            _check_storable("options", opts, lambda k, mw=mw: f"{mw}.options.{_key(k)}")
            opts = _check_files(opts, base, f"{mw}.options")
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
                    task=exp.task,
                )

                baselines = {s: add(_baseline(spec, exp, base_opts, fp32.version, s, common)) for s in seeds}
                for entry, cls, opts in entries:
                    init = entry.init or ("scratch" if cls.init == "scratch" else "baseline")
                    for s in entry.seeds or seeds:
                        prev: Cell | None = baselines.get(s)
                        if prev is None:  # entry-specific seed: its own baseline
                            prev = baselines[s] = add(_baseline(spec, exp, base_opts, fp32.version, s, common))
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
    for b in builds.values():  # last: every cheap check first
        _build_on_meta(b)
    return list(cells.values())
