"""Detection and instance segmentation: the COCO loader, the digit-scenes workload, COCO
metrics through pycocotools' COCOeval, and torchvision's detectors quantized through the
method contract."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from qbench.harness.data.coco import CocoDetection, collate, load_coco
from qbench.harness.data.detection import load_detection_dataset
from qbench.harness.detection_metrics import coco_metrics
from qbench.harness.errors import QbenchError
from qbench.harness.models.detection import create_detector
from qbench.methods import MethodContext, get_method
from qbench.methods.modules import Quantizer, quant_layers
from qbench.methods.recipe import Recipe
from torchvision.io import encode_png, write_file

pytest.importorskip("pycocotools")
from pycocotools import mask as mask_utils  # noqa: E402

MNIST = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "mnist"
SMALL = {"train_images": 12, "val_images": 8}


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _scenes(tmp_path: Path, **options):
    return load_detection_dataset("digit_scenes", cache_dir=str(tmp_path / "cache"), **{**SMALL, **options})


# -- the COCO loader ----------------------------------------------------------------


def _rect_polygon(x, y, w, h):
    return [[x, y, x + w, y, x + w, y + h, x, y + h]]


def _write_coco(root: Path) -> dict:
    """Two PNG images of different sizes and an instances JSON in the official layout, with a
    polygon, an RLE and an uncompressed-RLE mask, a crowd region and a zero-width box."""
    (root / "annotations").mkdir(parents=True)
    (root / "val2017").mkdir()
    sizes = {11: (40, 60), 22: (50, 30)}  # image id -> (height, width)
    for image_id, (h, w) in sizes.items():
        img = torch.arange(h * w, dtype=torch.int64).remainder(251).to(torch.uint8).reshape(1, h, w)
        write_file(str(root / "val2017" / f"{image_id}.png"), encode_png(img))
    rle_mask = np.zeros((50, 30), dtype=np.uint8)
    rle_mask[5:15, 3:13] = 1
    rle = mask_utils.encode(np.asfortranarray(rle_mask))
    uncompressed = {"size": [40, 60], "counts": [40 * 20, 40 * 5, 40 * 35]}  # columns 20..24 set
    data = {
        "images": [{"id": i, "file_name": f"{i}.png", "height": h, "width": w} for i, (h, w) in sizes.items()],
        "categories": [{"id": 7, "name": "seven"}, {"id": 3, "name": "three"}],
        "annotations": [
            {"id": 1, "image_id": 11, "category_id": 7, "bbox": [2, 4, 10, 6], "area": 60, "iscrowd": 0,
             "segmentation": _rect_polygon(2, 4, 10, 6)},
            {"id": 2, "image_id": 11, "category_id": 3, "bbox": [20, 0, 5, 40], "area": 200, "iscrowd": 1,
             "segmentation": uncompressed},
            {"id": 3, "image_id": 11, "category_id": 3, "bbox": [30, 30, 0, 5], "area": 0, "iscrowd": 0,
             "segmentation": _rect_polygon(30, 30, 0, 5)},
            {"id": 4, "image_id": 22, "category_id": 3, "bbox": [3, 5, 10, 10], "area": 100, "iscrowd": 0,
             "segmentation": {"size": [50, 30], "counts": rle["counts"].decode("ascii")}},
        ],
    }  # fmt: skip
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(data))
    return data


def test_loader_round_trips_a_coco_json(tmp_path):
    data = _write_coco(tmp_path)
    ds = load_coco(tmp_path, "val", masks=True)
    assert len(ds) == 2 and ds.num_classes == 3
    # labels are contiguous in the order of the sorted category ids; 0 is the background
    assert ds.label_to_cat == {1: 3, 2: 7} and ds.class_names == ["three", "seven"]
    img, t = ds[0]
    assert img.shape == (3, 40, 60) and img.dtype == torch.float32 and 0 <= img.min() and img.max() <= 1
    assert t["image_id"] == 11
    # the zero-width box is dropped; xywh [2, 4, 10, 6] -> xyxy [2, 4, 12, 10]
    assert t["boxes"].tolist() == [[2, 4, 12, 10], [20, 0, 25, 40]]
    assert t["labels"].tolist() == [2, 1] and t["iscrowd"].tolist() == [0, 1]
    assert t["masks"].shape == (2, 40, 60) and t["masks"].dtype == torch.uint8
    assert t["masks"][1].sum() == 40 * 5 and t["masks"][1][:, 20:25].all()  # the uncompressed RLE
    # the polygon covers the box (pycocotools rasterises the rectangle's pixels)
    ys, xs = torch.nonzero(t["masks"][0], as_tuple=True)
    assert (xs.min(), xs.max() + 1, ys.min(), ys.max() + 1) == (2, 12, 4, 10)
    img2, t2 = ds[1]
    assert img2.shape == (3, 50, 30) and t2["boxes"].tolist() == [[3, 5, 13, 15]]
    assert torch.equal(t2["masks"][0], torch.from_numpy(np.zeros((50, 30), np.uint8)).index_put_(
        (torch.arange(5, 15).repeat_interleave(10), torch.arange(3, 13).repeat(10)), torch.tensor(1, dtype=torch.uint8)
    ))  # fmt: skip
    # the pixels come back as written (grey PNG replicated to RGB)
    expected = torch.arange(40 * 60).remainder(251).reshape(40, 60).float() / 255
    assert torch.equal(img[0], expected) and torch.equal(img[0], img[2])
    images, targets = collate([ds[0], ds[1]])
    assert [im.shape[-2:] for im in images] == [(40, 60), (50, 30)] and [x["image_id"] for x in targets] == [11, 22]
    assert len(data["annotations"]) == 4


def test_missing_coco_files_give_one_line_naming_them(tmp_path):
    with pytest.raises(QbenchError) as e:
        load_coco(tmp_path / "coco", "train")
    msg = str(e.value)
    assert "\n" not in msg
    assert str(tmp_path / "coco" / "annotations" / "instances_train2017.json") in msg
    assert str(tmp_path / "coco" / "train2017") in msg
    (tmp_path / "bad.json").write_text(json.dumps({"images": []}))
    with pytest.raises(QbenchError, match="not a COCO instances file: no list annotations, categories"):
        CocoDetection(tmp_path / "bad.json", tmp_path)
    with pytest.raises(QbenchError, match="unknown detection dataset 'digit_scene'.*did you mean 'digit_scenes'"):
        load_detection_dataset("digit_scene")


# -- the digit-scenes workload --------------------------------------------------------


def _folder_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_digit_scenes_are_deterministic_and_exact(tmp_path):
    a = _scenes(tmp_path / "a", source="sklearn", seed=3)
    b = _scenes(tmp_path / "b", source="sklearn", seed=3)
    c = _scenes(tmp_path / "c", source="sklearn", seed=4)
    root_a, root_b = (x.test.dataset.images_dir.parent for x in (a, b))
    assert _folder_bytes(root_a) == _folder_bytes(root_b), "one seed: the same files, byte for byte"
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()
    assert a.name == "digit_scenes[sklearn]" and a.variant == "sklearn" and a.num_classes == 11
    assert (len(a.train), len(a.test)) == (12, 8)
    ann = json.loads((root_a / "annotations" / "instances_train2017.json").read_text())
    assert [c["name"] for c in ann["categories"]] == [str(d) for d in range(10)]
    for i in range(len(a.train)):
        img, t = a.train.dataset[i]
        n = len(t["labels"])
        assert 1 <= n <= 4 and img.shape == (3, 128, 128)
        for k in range(n):
            m = t["masks"][k].bool()
            ys, xs = torch.nonzero(m, as_tuple=True)
            # the box is the exact extent of the stroke, and the stroke is the bright pixels
            assert t["boxes"][k].tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
            assert (img[0][m] >= 128 / 255).all() and t["area"][k] == m.sum()
        boxes = t["boxes"]
        for p in range(n):  # digits do not overlap
            for q in range(p + 1, n):
                lo = torch.maximum(boxes[p, :2], boxes[q, :2])
                hi = torch.minimum(boxes[p, 2:], boxes[q, 2:])
                assert ((hi - lo).clamp(min=0).prod() == 0).item()
        outside = img[0].clone()
        for x1, y1, x2, y2 in boxes.int().tolist():
            outside[y1:y2, x1:x2] = 0
        assert outside.max() < 128 / 255, "nothing bright outside the boxes"


def test_digit_scenes_from_mnist_say_so(tmp_path):
    if not (MNIST / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"the shared MNIST test split is absent ({MNIST})")
    d = _scenes(tmp_path, mnist_path=str(MNIST))
    s = _scenes(tmp_path, source="sklearn")
    assert d.name == "digit_scenes[mnist]" and d.variant == "mnist" and "MNIST" in d.description
    assert d.fingerprint() != s.fingerprint()
    with pytest.raises(QbenchError, match="MNIST test split not found"):
        _scenes(tmp_path, source="mnist", mnist_path=str(tmp_path / "nowhere"))
    with pytest.raises(QbenchError, match="unknown option.*maxdigits"):
        _scenes(tmp_path, maxdigits=3)


# -- COCO metrics -----------------------------------------------------------------------


def test_ground_truth_fed_back_scores_ap_100(tmp_path):
    data = _scenes(tmp_path, source="sklearn")
    ds = data.test.dataset
    outputs = []
    for i in range(len(ds)):
        _, t = ds[i]
        n = len(t["labels"])
        outputs.append(
            (t["image_id"], {"boxes": t["boxes"], "labels": t["labels"], "scores": torch.ones(n),
                             "masks": t["masks"][:, None].float()})
        )  # fmt: skip
    m = coco_metrics(ds.coco, outputs, data.label_to_cat, masks=True)
    for k in ("box_ap", "box_ap50", "box_ap75", "box_aps", "mask_ap", "mask_ap50", "mask_ap75", "mask_aps"):
        assert m[k] == pytest.approx(100.0), k
    # every digit is under 32^2 pixels: no medium or large ground truth, so those APs are undefined
    assert math.isnan(m["box_apm"]) and math.isnan(m["box_apl"]) and math.isnan(m["mask_apl"])


def _hand_made():
    """One 100x100 image with two ground-truth boxes of one category, 40x40 each (area 1600:
    "medium")."""
    from qbench.harness.data.coco import coco_from_dict

    boxes = {1: [10, 10, 40, 40], 2: [55, 55, 40, 40]}
    return coco_from_dict(
        {
            "images": [{"id": 1, "height": 100, "width": 100, "file_name": "x.png"}],
            "categories": [{"id": 5, "name": "thing"}],
            "annotations": [
                {"id": k, "image_id": 1, "category_id": 5, "bbox": b, "area": 1600, "iscrowd": 0,
                 "segmentation": _rect_polygon(*b)}
                for k, b in boxes.items()
            ],
        }
    )  # fmt: skip


def _rect_mask(x1, y1, x2, y2):
    m = torch.zeros(1, 100, 100)
    m[0, y1:y2, x1:x2] = 1
    return m


@pytest.mark.parametrize("wrong_first, expected", [(False, 100 * 51 / 101), (True, 100 * 0.5 * 51 / 101)])
def test_one_wrong_box_scores_the_hand_worked_ap(wrong_first, expected):
    # Two ground-truth boxes; two detections: one exactly on the first box, one on empty
    # background (IoU 0 with both). Ranked by score, the detections give
    #   correct first: precision 1/1, 1/2 at recall 1/2, 1/2;
    #   wrong first:   precision 0/1, 1/2 at recall 0, 1/2.
    # COCO's AP averages the interpolated precision (the best precision at any recall >= r)
    # at the 101 recall thresholds r = 0, 0.01, ..., 1. Recall never passes 1/2, so
    # thresholds 0.51..1 (50 of them) score 0 and thresholds 0..0.50 (51 of them) score the
    # best precision reached at recall 1/2: 1 when the correct box comes first, 1/2 when
    # the wrong one does. AP = 51/101 = 50.50 % or 0.5 * 51/101 = 25.25 %, at every IoU
    # threshold (the correct box is exact, the wrong one misses entirely), so AP = AP50 =
    # AP75, and AP_S/AP_L are undefined (no ground truth of that size). The masks are
    # the boxes' rectangles: mask AP is the same.
    # AP_M differs: the wrong box is 30x30 (area 900, "small"), and COCOeval ignores an
    # unmatched detection outside the area range scored, so for AP_M only the correct box
    # counts (precision 1 at recall 1/2): 51/101 whichever comes first.
    coco = _hand_made()
    right, wrong = [10, 10, 50, 50], [0, 60, 30, 90]
    scores = [0.8, 0.9] if wrong_first else [0.9, 0.8]
    out = {
        "boxes": torch.tensor([right, wrong], dtype=torch.float32),
        "scores": torch.tensor(scores),
        "labels": torch.tensor([1, 1]),
        "masks": torch.stack([_rect_mask(*right), _rect_mask(*wrong)]),
    }
    m = coco_metrics(coco, [(1, out)], {1: 5}, masks=True)
    for k in ("ap", "ap50", "ap75"):
        assert m[f"box_{k}"] == pytest.approx(expected, abs=1e-9), k
        assert m[f"mask_{k}"] == pytest.approx(expected, abs=1e-9), k
    assert m["box_apm"] == m["mask_apm"] == pytest.approx(100 * 51 / 101, abs=1e-9)
    assert math.isnan(m["box_aps"]) and math.isnan(m["box_apl"])


def test_no_detections_score_zero():
    empty = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)}
    m = coco_metrics(_hand_made(), [(1, empty)], {1: 5})
    assert m["box_ap"] == m["box_ap50"] == m["box_apm"] == 0.0 and math.isnan(m["box_aps"])


# -- detectors, full precision and quantized --------------------------------------------

DETECTORS = ["retinanet_r18_fpn", "fcos_r18_fpn", "maskrcnn_r18_fpn"]
# fewer proposals and sampled RoIs than on COCO: a few digits per image need no more
SMALL_RCNN = {
    "rpn_pre_nms_top_n_train": 200, "rpn_post_nms_top_n_train": 100, "rpn_pre_nms_top_n_test": 100,
    "rpn_post_nms_top_n_test": 50, "box_batch_size_per_image": 64, "box_detections_per_img": 10,
}  # fmt: skip


def _tiny_batch(tmp_path):
    """Two 64x64 crops of real digit scenes with their boxes and masks."""
    data = _scenes(tmp_path, source="sklearn", canvas=64, max_side=28, max_digits=2, min_side=16)
    images, targets = collate([data.train.dataset[i] for i in range(2)])
    return data, images, targets


def _build(name: str, num_classes: int):
    torch.manual_seed(0)
    return create_detector(
        name, num_classes=num_classes, min_size=64, max_size=64, fpn_channels=64,
        anchor_size=16 if "fcos" not in name else 8, **(SMALL_RCNN if name.startswith("maskrcnn") else {})
    )  # fmt: skip


@pytest.mark.parametrize("name", DETECTORS)
@pytest.mark.parametrize("method", ["fp32", "lsq", "dorefa"])
def test_detector_trains_and_evaluates_quantized(tmp_path, name, method):
    data, images, targets = _tiny_batch(tmp_path)
    model = _build(name, data.num_classes)
    ctx = MethodContext(device=torch.device("cpu"), recipe=Recipe())
    model = get_method(method)(4, 4).prepare(model, ctx)
    layers = dict(quant_layers(model))
    if method == "fp32":
        assert not layers
    else:
        body = [n for n in layers if n.startswith("backbone.body.")]
        # every ResNet-18 conv (16 in the blocks, 3 downsampling) but the stem, which the
        # first-layer policy keeps at 8 bits (LSQ) or in full precision (DoReFa)
        assert len(body) >= 19 and "backbone.body.layer4.1.conv2" in layers
        assert any(n.startswith("backbone.fpn.") for n in layers)
        assert layers["backbone.body.layer2.0.conv1"].w_bits == 4
    model.train()
    losses = model(images, targets)
    assert losses and all(torch.isfinite(v) for v in losses.values())
    if name.startswith("maskrcnn"):
        assert "loss_mask" in losses
    sum(losses.values()).backward()
    conv = model.get_submodule("backbone.body.layer3.0.conv1")
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0
    if method == "lsq":
        steps = [q.step for q in model.modules() if isinstance(q, Quantizer) and hasattr(q, "step")]
        assert steps and any(s.grad is not None and s.grad.abs() > 0 for s in steps)
    model.eval()
    with torch.no_grad():
        out = model(images)
    assert len(out) == 2 and {"boxes", "scores", "labels"} <= set(out[0])
    if method == "lsq":  # the metrics read model outputs as they come
        ids = [t["image_id"] for t in targets]
        m = coco_metrics(data.train.coco, zip(ids, out, strict=True), data.label_to_cat, masks="masks" in out[0])
        assert 0.0 <= m["box_ap"] <= 100.0 and ("mask_ap" in m) == name.startswith("maskrcnn")


@pytest.mark.parametrize("method", ["lsq", "dorefa"])
def test_quantize_backbone_or_all_and_the_bit_audit_says_which(method):
    """``quantize: backbone`` (the dashboard's Quantize-Backbone) quantizes the ResNet body
    only, the FPN and heads stay in full precision; ``all`` quantizes them too. The bit audit
    (the footprint's per-layer widths and its distinct-values check) confirms which."""
    from qbench.methods.footprint import footprint

    ctx = MethodContext(device=torch.device("cpu"), recipe=Recipe())
    audits = {}
    for part in ("backbone", "all"):
        torch.manual_seed(0)
        model = create_detector("fcos_r18_fpn", num_classes=4, min_size=64, max_size=64, fpn_channels=64, quantize=part)
        model = get_method(method)(2, 2).prepare(model, ctx)
        names = {n for n, _ in quant_layers(model)}
        fp = footprint(model)
        assert fp.audit_ok
        low = {la.name for la in fp.layers if la.w_bits == 2}
        audits[part] = low
        assert low <= names and "backbone.body.layer4.1.conv2" in low
        if part == "backbone":
            assert all(n.startswith("backbone.body.") for n in names)
            assert {la.w_bits for la in fp.layers if not la.name.startswith("backbone.body.")} == {32}
        else:
            assert any(n.startswith("backbone.fpn.") for n in low) and any(n.startswith("head.") for n in low)
    assert audits["backbone"] < audits["all"]
    with pytest.raises(QbenchError, match="quantize must be one of all, backbone"):
        create_detector("fcos_r18_fpn", num_classes=4, quantize="head")


def test_detector_options_are_checked():
    with pytest.raises(QbenchError, match="did you mean 'fcos_r18_fpn'"):
        create_detector("fcos_r81_fpn", num_classes=3)
    with pytest.raises(QbenchError, match="head_norm must be one of gn, bn, none"):
        create_detector("fcos_r18_fpn", num_classes=3, head_norm="ln")
    with pytest.raises(QbenchError, match="unknown option.*head_nrom for detector 'retinanet_r18_fpn'.*head_norm"):
        create_detector("retinanet_r18_fpn", num_classes=3, head_nrom="bn")
    bn = create_detector("fcos_r18_fpn", num_classes=3, head_norm="bn", fpn_channels=64)
    norms = {type(m) for m in bn.head.modules() if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.GroupNorm))}
    assert norms == {torch.nn.BatchNorm2d}
    gn = create_detector("retinanet_r34_fpn", num_classes=3, fpn_channels=64)
    assert {type(m) for m in gn.head.modules() if isinstance(m, torch.nn.GroupNorm)} == {torch.nn.GroupNorm}
    r50 = create_detector("maskrcnn_r50_fpn", num_classes=3, fpn_channels=64, head_norm="gn")
    assert r50.backbone.fpn.inner_blocks[-1][0].in_channels == 2048
    assert any(isinstance(m, torch.nn.GroupNorm) for m in r50.roi_heads.mask_head.modules())


def test_lsq_mask_rcnn_calibrates_and_evaluates_with_no_detections(tmp_path):
    # no box passes the score threshold: the mask head sees an empty batch, in calibration
    # (LSQ initialises its step sizes there) and in evaluation
    data, images, targets = _tiny_batch(tmp_path)
    torch.manual_seed(0)
    model = create_detector(
        "maskrcnn_r18_fpn", num_classes=data.num_classes, min_size=64, max_size=64, fpn_channels=64,
        anchor_size=16, box_score_thresh=1.01, **{k: v for k, v in SMALL_RCNN.items() if k != "box_score_thresh"},
    )  # fmt: skip
    ctx = MethodContext(
        device=torch.device("cpu"), recipe=Recipe(calib_batches=1), calib_batches=lambda: iter([(images, targets)])
    )
    method = get_method("lsq")(4, 4)
    model = method.prepare(model, ctx)
    method.calibrate(model, ctx)
    # nothing reached the mask head: its step size stays at its start value, not NaN
    assert model.get_submodule("roi_heads.mask_head.0.0").act_quantizer.step.item() == 1.0
    steps = [m.step for m in model.modules() if isinstance(m, Quantizer) and hasattr(m, "step")]
    assert all(torch.isfinite(s) for s in steps)
    model.eval()
    with torch.no_grad():
        out = model(images)
    assert [len(o["boxes"]) for o in out] == [0, 0] and out[0]["masks"].shape[0] == 0
    m = coco_metrics(data.train.coco, zip([t["image_id"] for t in targets], out, strict=True), data.label_to_cat, True)
    assert m["box_ap"] == m["mask_ap"] == 0.0


# -- suites -------------------------------------------------------------------------------

SUITE = Path(__file__).parent / "suites" / "detection_tiny.yaml"


def test_detection_suite_expands_into_detection_cells():
    from qbench.harness.suite import load_suite

    cells = load_suite(SUITE).cells
    assert [(c.model, c.method, c.task) for c in cells] == [
        ("fcos_r18_fpn", "fp32", "detection"),
        ("fcos_r18_fpn", "lsq", "detection"),
        ("maskrcnn_r18_fpn", "fp32", "instance_segmentation"),
        ("maskrcnn_r18_fpn", "lsq", "instance_segmentation"),
    ]
    assert cells[1].parent == cells[0].id and cells[0].identity()["task"] == "detection"


def test_a_classification_cell_keeps_its_id():
    from dataclasses import replace

    from qbench.harness.suite import Cell

    cell = Cell(suite="s", dataset="digits", model="small_cnn", method="fp32", w_bits=32, a_bits=32, seed=0, recipe={})
    assert "task" not in cell.identity(), "ids of classification cells are what they were before tasks"
    assert replace(cell, task="detection").id != cell.id


@pytest.mark.parametrize(
    "edit, replacement, expected",
    [
        ("model_options: {min_size: 64,", "model_options: {min_sise: 64,",
         r"experiments\[0\]\.model_options\.min_sise: unknown model option \(did you mean 'min_size'\?\)"),
        ("task: instance_segmentation", "task: segmentation", r"experiments\[1\].*task"),
        ("model: maskrcnn_r18_fpn", "model: fcos_r18_fpn",
         r"experiments\[1\]\.model: task instance_segmentation needs a model that predicts masks"),
        ("dataset: digit_scenes", "dataset: digits",
         r"experiments\[0\]\.dataset: unknown detection dataset 'digits'.*did you mean 'digit_scenes'"),
        ("max_digits: 2", "max_digit: 2",
         r"defaults\.dataset_options\.max_digit: unknown dataset option \(did you mean 'max_digits'\?\)"),
    ],
)  # fmt: skip
def test_bad_detection_suites_say_where(tmp_path, edit, replacement, expected):
    from qbench.harness.suite import load_suite

    text = SUITE.read_text()
    assert edit in text
    bad = tmp_path / "bad.yaml"
    bad.write_text(text.replace(edit, replacement, 1))
    with pytest.raises(QbenchError, match=expected):
        load_suite(bad)


def test_a_killed_detection_cell_resumes_from_its_last_epoch(tmp_path):
    """Training checkpoints after every epoch; killed in epoch 2 of 2 (before its checkpoint)
    and started again with a fresh model, it runs epoch 2 only, from epoch 1's checkpoint,
    and ends with the weights of an uninterrupted run."""
    from qbench.harness.detect import train_detector
    from qbench.harness.fit import CellState

    torch.set_num_threads(1)
    data = _scenes(tmp_path, source="sklearn", canvas=64, max_side=28, max_digits=2, min_side=16)
    r = Recipe(epochs=2, batch_size=4, lr=0.01, grad_clip=10.0)
    fp32 = get_method("fp32")(32, 32)

    class Killed(Exception):
        pass

    def run(state=None, kill_after=None):
        torch.manual_seed(0)
        model = _build("fcos_r18_fpn", data.num_classes)
        epochs: list[int] = []

        def log(metrics, step=None):
            epochs.append(step)
            if step == kill_after:
                raise Killed

        gen = torch.Generator().manual_seed(0)
        try:
            history = train_detector(model, fp32, data, r, torch.device("cpu"), gen, log, state)
        except Killed:
            history = None
        return model, history, epochs

    whole, whole_history, _ = run()
    state = CellState(tmp_path / "cell")
    _, none, first = run(state, kill_after=2)
    assert none is None and first == [1, 2] and state.path("stage_train").is_file()
    resumed, history, second = run(state)
    assert second == [2] and history == pytest.approx(whole_history)
    for (k, a), b in zip(whole.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
