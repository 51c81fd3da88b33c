"""COCO detection and instance-segmentation metrics, computed by pycocotools' COCOeval.

:func:`coco_metrics` takes the ground truth (a ``pycocotools.coco.COCO`` index) and a
model's outputs in torchvision's form (per image: ``boxes`` xyxy, ``scores``, ``labels``
and, for Mask R-CNN, ``masks`` as probabilities ``[N, 1, H, W]``) and returns, in percent:

* ``box_ap`` (AP at IoU 0.50:0.95), ``box_ap50``, ``box_ap75``, ``box_aps``, ``box_apm``,
  ``box_apl`` (small < 32^2 <= medium < 96^2 <= large, by the annotations' ``area``);
* the same six with the ``mask_`` prefix when masks are scored.

COCOeval's -1 (no ground truth in an area range) becomes NaN: undefined, not zero.
Boxes are converted to COCO's ``[x, y, w, h]``; masks are thresholded at 0.5 and
RLE-encoded, as torchvision's reference evaluation does.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Iterable, Mapping

import numpy as np
import torch

#: the first six numbers of COCOeval.stats, by name
STAT_NAMES = ("ap", "ap50", "ap75", "aps", "apm", "apl")
IOU_TYPES = {"bbox": "box", "segm": "mask"}


def to_coco_results(
    outputs: Iterable[tuple[int, Mapping[str, torch.Tensor]]],
    label_to_cat: Mapping[int, int] | None = None,
    masks: bool = False,
    mask_threshold: float = 0.5,
) -> list[dict]:
    """COCO result dicts from ``(image_id, output)`` pairs; ``label_to_cat`` maps a model's
    labels to category ids (identity when None)."""
    from pycocotools import mask as mask_utils

    results = []
    for image_id, out in outputs:
        boxes = out["boxes"].detach().float().cpu()
        if boxes.numel() == 0:
            continue
        xywh = boxes.clone()
        xywh[:, 2:] -= xywh[:, :2]
        scores = out["scores"].detach().float().cpu().tolist()
        labels = out["labels"].detach().cpu().tolist()
        rles = None
        if masks:
            m = out["masks"].detach().cpu()
            m = (m[:, 0] if m.dim() == 4 else m) >= mask_threshold if m.is_floating_point() else m.bool()
            m = m.reshape(len(labels), *m.shape[-2:])
            rles = mask_utils.encode(np.asfortranarray(m.permute(1, 2, 0).numpy().astype(np.uint8)))
        for i, (box, score, label) in enumerate(zip(xywh.tolist(), scores, labels, strict=True)):
            cat = label_to_cat[int(label)] if label_to_cat is not None else int(label)
            r = {"image_id": int(image_id), "category_id": int(cat), "bbox": box, "score": float(score)}
            if rles is not None:
                rle = rles[i]
                r["segmentation"] = {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}
            results.append(r)
    return results


def _percent(stats: np.ndarray) -> list[float]:
    return [float("nan") if v < 0 else 100.0 * float(v) for v in stats[: len(STAT_NAMES)]]


def evaluate_results(coco_gt, results: list[dict], iou_types: Iterable[str] = ("bbox",), image_ids=None) -> dict:
    """Run COCOeval for each of ``iou_types`` (``bbox``, ``segm``) on COCO result dicts;
    only the images ``image_ids`` (default: every image of ``coco_gt``) count."""
    from pycocotools.cocoeval import COCOeval

    ids = sorted(coco_gt.getImgIds()) if image_ids is None else sorted(int(i) for i in image_ids)
    metrics: dict[str, float] = {}
    for iou_type in iou_types:
        prefix = IOU_TYPES[iou_type]
        has_gt = any(coco_gt.imgToAnns.get(i) for i in ids)
        if not results:
            # nothing detected: AP is 0 wherever there is something to find (loadRes refuses [])
            values = [0.0 if has_gt else float("nan")] + _no_detections(coco_gt, ids)
        else:
            with contextlib.redirect_stdout(io.StringIO()):
                coco_dt = coco_gt.loadRes(_copy(results))
                ev = COCOeval(coco_gt, coco_dt, iou_type)
                ev.params.imgIds = ids
                ev.evaluate()
                ev.accumulate()
                ev.summarize()
            values = _percent(ev.stats)
        metrics.update({f"{prefix}_{name}": v for name, v in zip(STAT_NAMES, values, strict=True)})
    return metrics


def _copy(results: list[dict]) -> list[dict]:
    # loadRes writes into the dicts it is given (area, id, bbox from masks): keep the caller's intact
    return [dict(r) for r in results]


def _no_detections(coco_gt, ids) -> list[float]:
    """AP50..AP_L with no detections: 0 where the ground truth has something, else NaN."""
    anns = [a for i in ids for a in coco_gt.imgToAnns.get(i, []) if not a.get("iscrowd", 0)]
    areas = [a.get("area", 0.0) for a in anns]
    ranges = [(0, 1e10), (0, 1e10), (0, 32**2), (32**2, 96**2), (96**2, 1e10)]
    return [0.0 if any(lo <= s < hi for s in areas) else float("nan") for lo, hi in ranges]


def coco_metrics(
    coco_gt,
    outputs: Iterable[tuple[int, Mapping[str, torch.Tensor]]],
    label_to_cat: Mapping[int, int] | None = None,
    masks: bool = False,
    image_ids=None,
) -> dict[str, float]:
    """Box AP (and mask AP when ``masks``) in percent of a model's ``(image_id, output)``
    pairs against ``coco_gt`` (see the module docstring for the keys)."""
    pairs = list(outputs)
    if image_ids is None:
        image_ids = [i for i, _ in pairs]
    results = to_coco_results(pairs, label_to_cat, masks)
    return evaluate_results(coco_gt, results, ("bbox", "segm") if masks else ("bbox",), image_ids)


def finite(metrics: Mapping[str, float]) -> dict[str, float]:
    """The metrics that are numbers (NaN: no ground truth in that area range)."""
    return {k: v for k, v in metrics.items() if isinstance(v, float) and math.isfinite(v)}


__all__ = ["STAT_NAMES", "coco_metrics", "evaluate_results", "finite", "to_coco_results"]
