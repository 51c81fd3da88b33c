"""Full-precision weights for a model: a local file or torchvision's released weights.

The ``weights`` model option is

* a path to a local file (``.pth``, ``.pt``, ``.pth.tar``): a state dict, or a dict
  holding one under ``state_dict`` or ``model`` (``module.`` prefixes from DataParallel are
  dropped); loaded with :func:`safe_load` (``torch.load(weights_only=True)``: tensors and
  containers only, a file that would run code is refused);
* the name of torchvision's weights for that model (``DEFAULT``, ``IMAGENET1K_V1``,
  ``IMAGENET1K_V2``): read from the torch hub cache
  (``$TORCH_HOME/hub/checkpoints``, ``~/.cache/torch/hub/checkpoints``), downloaded there
  when missing and online; offline with no cached file, an error names the file and the
  folder to put it in.

Where the dataset differs from the weights' (another number of classes, a CIFAR stem),
the layers whose shapes differ are left at their initialisation, but only the
classifier and the stem may differ: anything else is an error.
"""

from __future__ import annotations

import pickle
import pickletools
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import QbenchError

_FILE_SUFFIXES = (".pth", ".pt", ".tar", ".bin", ".ckpt")


def is_path(spec: str) -> bool:
    return "/" in spec or spec.lower().endswith(_FILE_SUFFIXES) or Path(spec).expanduser().is_file()


# -- reading a checkpoint without running it ---------------------------------------------------
#: pickle opcodes that name or call a class or function: a plain weights file uses only
#: torch's own rebuild functions (and OrderedDict) through them
_NAMING_OPS = {"GLOBAL", "STACK_GLOBAL", "INST", "OBJ", "EXT1", "EXT2", "EXT4"}
_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING", "STRING"}
#: torch's phrases for a refused global, call or object (torch/_weights_only_unpickler.py)
_TORCH_REFUSED = (
    r"GLOBAL (\S+) was not an allowed global",
    r"unsupported GLOBAL (\S+) whose module",
    r"reduce for unrecognized function (.+?)(?: which belongs|$)",
    r"Can only (?:build|create new object)",
    r"persistent_load",
    r"must be imported to load",
)


def _pickle_streams(p: Path) -> list[bytes]:
    """The pickles torch.load would unpickle: ``data.pkl`` of a zip checkpoint, else the file
    itself (a legacy checkpoint is a few pickles in a row, then raw storage bytes)."""
    if zipfile.is_zipfile(p):
        with zipfile.ZipFile(p) as z:
            names = [n for n in z.namelist() if n == "data.pkl" or n.endswith("/data.pkl")]
            return [z.read(names[0])] if names else []
    return [p.read_bytes()]


def _named_globals(p: Path) -> list[str] | None:
    """Every ``module.name`` the checkpoint's pickles name, or None when they are not
    well-formed pickles (truncated, corrupt: a file to copy again, not a hostile one)."""
    try:
        names: list[str] = []
        for data in _pickle_streams(p):
            pos, count = 0, 0
            # a legacy file holds five pickles (magic, protocol, sys info, object, storage keys)
            while pos < len(data) and count < 5:
                pushed: list[Any] = []  # what each opcode pushed: the string, else None
                memo: dict[int, Any] = {}
                end = -1
                for op, arg, at in pickletools.genops(data[pos:]):
                    name = op.name
                    if name in _STRING_OPS:
                        pushed.append(str(arg))
                    elif name in ("GET", "BINGET", "LONG_BINGET"):
                        pushed.append(memo.get(arg))
                    elif name == "MEMOIZE":
                        memo[len(memo)] = pushed[-1] if pushed else None
                    elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
                        memo[arg] = pushed[-1] if pushed else None
                    elif name == "STACK_GLOBAL":
                        names.append(".".join(str(x) for x in pushed[-2:]))
                        pushed.append(None)
                    elif name in ("GLOBAL", "INST"):
                        names.append(str(arg).replace(" ", "."))
                        pushed.append(None)
                    elif name in _NAMING_OPS:
                        names.append(f"pickle extension code {arg}")
                        pushed.append(None)
                    elif name == "STOP":
                        end = pos + at
                    elif name not in ("FRAME", "PROTO"):
                        pushed.append(None)
                if end < 0:
                    return None  # no STOP: cut short
                pos, count = end + 1, count + 1
        return names
    except Exception:  # not a pickle, truncated zip...
        return None


def _allowed_by_torch() -> set[str]:
    try:
        from torch._weights_only_unpickler import _get_allowed_globals

        return set(_get_allowed_globals())
    except Exception:  # a private helper: without it, name whatever is not torch's
        return set()


def _clean(message: str) -> str:
    """torch's error text without its advice: the part after "WeightsUnpickler error:", on
    one line, never a hint to load with weights_only=False."""
    msg = message.rsplit("WeightsUnpickler error:", 1)[-1]
    msg = msg.split("Check the documentation of torch.load", 1)[0]
    msg = msg.split("Please use `torch.serialization", 1)[0]
    msg = " ".join(msg.replace("\x1b[1m", "").replace("\x1b[0m", "").split())
    if "weights_only" in msg.lower() or "arbitrary code" in msg.lower():
        msg = "the file is not a PyTorch checkpoint torch can read"
    return msg[:300]


def safe_load(path: str | Path, where: str) -> Any:
    """``torch.load(path, map_location='cpu', weights_only=True)``: tensors, numbers, strings
    and containers only. A file that names any other class or function (one that would run
    code when loaded) is refused with a :class:`QbenchError` saying so; a truncated or corrupt
    file "cannot read the checkpoint". Neither message suggests loading it unsafely."""
    p = Path(path).expanduser()
    named = "" if where == str(p) else f" {p}"
    if not p.is_file():
        raise QbenchError(f"checkpoint file{named} not found", where)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        globals_ = _named_globals(p)
        text = str(e)
        if globals_ is not None:  # well-formed pickles, yet refused: it carries more than weights
            hit = next((m for pat in _TORCH_REFUSED if (m := re.search(pat, text))), None)
            name = hit.group(1) if hit is not None and hit.groups() else ""
            if not name:
                allowed = _allowed_by_torch() or {n for n in globals_ if n.startswith(("torch.", "collections."))}
                name = next((n for n in globals_ if n not in allowed), "")
            detail = f"; it names {name}" if name else ""
            raise QbenchError(
                f"checkpoint{named} refused: it is not a plain weights file (tensors and containers only)"
                f"{detail}, and loading it could run code. Nothing in it was run",
                where,
            ) from None
        raise _unreadable(p, named, e, where) from None
    except Exception as e:  # truncated zip, not a checkpoint at all...
        raise _unreadable(p, named, e, where) from None


def _unreadable(p: Path, named: str, e: Exception, where: str) -> QbenchError:
    why = _clean(str(e)) or ("the file ends early" if isinstance(e, EOFError) else "")
    return QbenchError(
        f"cannot read the checkpoint{named} ({type(e).__name__}{': ' + why if why else ''}); "
        "it must be a PyTorch file saved with torch.save (copy it again if it was cut short)",
        where,
    )


def read_state_dict(path: str | Path, where: str) -> dict[str, torch.Tensor]:
    p = Path(path).expanduser()
    if not p.is_file():
        raise QbenchError(f"weights file {p} does not exist", where)
    obj = safe_load(p, where)
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise QbenchError(f"{p} holds no state dict of tensors", where)
    return {k.removeprefix("module."): v for k, v in obj.items()}


def torchvision_state_dict(builder, spec: str, where: str) -> dict[str, torch.Tensor]:
    """torchvision's weights ``spec`` for the model ``builder``, from the hub cache or the net."""
    from torchvision.models import get_model_weights

    enum = get_model_weights(builder)
    try:
        w = enum.DEFAULT if spec.upper() == "DEFAULT" else enum[spec.upper()]
    except KeyError:
        names = ", ".join(["DEFAULT", *(m.name for m in enum)])
        raise QbenchError(f"unknown weights {spec!r}; torchvision has {names}, or give a file path", where) from None
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    cached = folder / Path(w.url).name
    if cached.is_file():
        return read_state_dict(cached, where)
    try:
        return torch.hub.load_state_dict_from_url(w.url, progress=False, check_hash=True, weights_only=True)
    except Exception as e:
        why = " ".join(f"{type(e).__name__}: {e}".split())[:200]
        raise QbenchError(
            f"weights {w} are not in the torch hub cache and could not be downloaded ({why}): "
            f"put {cached.name} (from {w.url}) in {folder}, or give a local file path",
            where,
        ) from None


def load_weights(
    model: nn.Module, state: dict[str, torch.Tensor], where: str, may_differ: tuple[str, ...] = ()
) -> list[str]:
    """Load ``state`` into ``model``; tensors under the ``may_differ`` prefixes (classifier,
    stem) whose shapes differ stay at their initialisation. Returns the names skipped."""
    own = model.state_dict()
    skipped = [
        k for k, v in state.items()
        if k in own and own[k].shape != v.shape and k.startswith(may_differ)
    ]  # fmt: skip
    usable = {k: v for k, v in state.items() if k not in skipped}
    missing = [k for k in own if k not in usable and not k.startswith(may_differ)]
    unexpected = [k for k in usable if k not in own]
    wrong = [k for k in usable if k in own and own[k].shape != usable[k].shape]
    if missing or unexpected or wrong:
        raise QbenchError(
            "weights do not fit the model: "
            + "; ".join(
                f"{label} {names[:4]}{' ...' if len(names) > 4 else ''}"
                for label, names in (
                    ("missing", missing),
                    ("unexpected", unexpected),
                    ("wrong shape", wrong),
                )
                if names
            ),
            where,
        )
    model.load_state_dict(usable, strict=False)
    return skipped


def apply_weights(model: nn.Module, weights: str | None, builder, where: str, may_differ: tuple[str, ...]) -> nn.Module:
    """Load ``weights`` (a path, a torchvision weights name, or None) into ``model``."""
    if not weights:
        return model
    spec = str(weights)
    if is_path(spec):
        state = read_state_dict(spec, where)
    elif builder is None:
        raise QbenchError(f"weights {spec!r}: give a path to a weights file", where)
    else:
        state = torchvision_state_dict(builder, spec, where)
    load_weights(model, state, where, may_differ)
    return model
