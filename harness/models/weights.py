"""Full-precision weights for a model: a local file or torchvision's released weights.

The ``weights`` model option is

* a path to a local file (``.pth``, ``.pt``, ``.pth.tar``): a state dict, or a dict
  holding one under ``state_dict`` or ``model`` (``module.`` prefixes from DataParallel are
  dropped); loaded with ``torch.load(weights_only=True)``;
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

from pathlib import Path

import torch
from torch import nn

from ..errors import QbenchError

_FILE_SUFFIXES = (".pth", ".pt", ".tar", ".bin", ".ckpt")


def is_path(spec: str) -> bool:
    return "/" in spec or spec.lower().endswith(_FILE_SUFFIXES) or Path(spec).expanduser().is_file()


def read_state_dict(path: str | Path, where: str) -> dict[str, torch.Tensor]:
    p = Path(path).expanduser()
    if not p.is_file():
        raise QbenchError(f"weights file {p} does not exist", where)
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise QbenchError(f"cannot load weights file {p} ({type(e).__name__}: {e})", where) from None
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
