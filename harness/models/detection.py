"""Detectors: RetinaNet, FCOS and Mask R-CNN from torchvision on ResNet-18/34/50 FPN backbones.

The detection counterparts of the EasyQuantization dashboard's detection/segmentation rows
(RetinaNet and FCOS for boxes, Mask R-CNN for instance masks). A registry of their own,
:data:`DETECTORS`, with one door, :func:`create_detector`: a detector is called with
images and targets and returns a loss dict (training) or detections (evaluation), so it
never goes through the classification models' :func:`~qbench.harness.models.create_model`
(whose every model classifies a batch tensor).

Names: ``{retinanet,fcos,maskrcnn}_r{18,34,50}_fpn``. Options:

* ``num_classes``: categories plus one for the background (torchvision's convention);
* ``min_size``/``max_size``: the resize of torchvision's transform (800/1333 as on COCO;
  set both to the canvas, e.g. 128, for the small digit scenes: no resizing);
* ``fpn_channels`` (256): the width of the FPN and the heads;
* ``head_norm``: ``gn`` (GroupNorm, 32 groups), ``bn`` (BatchNorm) or ``none`` in the
  convolutional heads. Defaults: ``gn`` for RetinaNet and FCOS (FCOS's paper, torchvision's
  RetinaNet v2), ``none`` for Mask R-CNN (the original two-layer box head and four-conv
  mask head). With ``bn``/``gn`` Mask R-CNN gets torchvision's v2 heads (conv box head with
  norm, mask head with norm). Quantization work on FCOS/RetinaNet often prefers BN in the
  head, which folds into the convolutions;
* ``backbone_norm``: ``bn`` (trainable BatchNorm, the default: weights start from scratch)
  or ``frozen_bn`` (torchvision's choice for a pretrained backbone);
* ``backbone_weights``: a path to a ResNet state dict or a torchvision weights name
  (``IMAGENET1K_V1``); none by default;
* ``anchor_size`` (32): the anchors of the first FPN level (doubling per level), as
  torchvision; 16 suits digits of 20-48 pixels;
* ``trainable_layers`` (5): ResNet stages that train (all, from scratch);
* ``quantize``: ``all`` (the default: backbone, FPN and heads, the dashboard's
  "Quantize-All") or ``backbone`` (the ResNet body only, "Quantize-Backbone": the FPN and the
  heads stay in full precision), set as ``qbench_quantize_only`` on the model, which every
  method built on :func:`~qbench.methods.modules.quantize_model` honours.

Each model names its first and last weight layers for the methods' first/last-layer
policy (``qbench_first_last``): the stem convolution and the classification logits layer.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from functools import partial

import torchvision
from qbench.methods.registry import Registry
from torch import nn
from torchvision.models.detection import FCOS, MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7
from torchvision.ops.misc import FrozenBatchNorm2d

from ..errors import QbenchError

DETECTORS: Registry[Callable[..., nn.Module]] = Registry("detector")

ARCHS = {"r18": "resnet18", "r34": "resnet34", "r50": "resnet50"}
HEAD_NORMS = ("gn", "bn", "none")
BACKBONE_NORMS = {"bn": nn.BatchNorm2d, "frozen_bn": FrozenBatchNorm2d}


def norm_layer(kind: str, where: str) -> Callable[[int], nn.Module] | None:
    """The head's normalisation for ``kind`` (``gn``: 32 groups, ``bn``, ``none``)."""
    if kind == "gn":
        return partial(nn.GroupNorm, 32)
    if kind == "bn":
        return nn.BatchNorm2d
    if kind == "none":
        return None
    raise QbenchError(f"head_norm must be one of {', '.join(HEAD_NORMS)}, got {kind!r}", where)


def resnet_fpn(
    arch: str,
    *,
    fpn_channels: int = 256,
    backbone_norm: str = "bn",
    backbone_weights: str | None = None,
    trainable_layers: int = 5,
    p6p7: bool = False,
    where: str = "model",
) -> BackboneWithFPN:
    """A ResNet with an FPN: levels C2-C5 with a max-pooled P6 (Mask R-CNN), or C3-C5 with
    P6/P7 computed from P5 (RetinaNet, FCOS), as torchvision builds them."""
    from .weights import apply_weights

    if backbone_norm not in BACKBONE_NORMS:
        raise QbenchError(f"backbone_norm must be one of {', '.join(BACKBONE_NORMS)}, got {backbone_norm!r}", where)
    if not 0 <= trainable_layers <= 5:
        raise QbenchError(f"trainable_layers must be in 0..5, got {trainable_layers}", where)
    if fpn_channels < 1 or fpn_channels % 32:
        raise QbenchError(f"fpn_channels must be a positive multiple of 32 (GroupNorm), got {fpn_channels}", where)
    builder = getattr(torchvision.models, ARCHS[arch])
    body = builder(weights=None, norm_layer=BACKBONE_NORMS[backbone_norm])
    apply_weights(body, backbone_weights, builder, where, may_differ=("fc.",))
    trainable = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_layers]
    if trainable_layers == 5:
        trainable.append("bn1")
    for name, p in body.named_parameters():
        if all(not name.startswith(t) for t in trainable):
            p.requires_grad_(False)
    stage2 = body.inplanes // 8  # 64 (basic blocks) or 256 (bottlenecks)
    levels = [2, 3, 4] if p6p7 else [1, 2, 3, 4]
    extra = LastLevelP6P7(fpn_channels, fpn_channels) if p6p7 else LastLevelMaxPool()
    return BackboneWithFPN(
        body,
        return_layers={f"layer{k}": str(i) for i, k in enumerate(levels)},
        in_channels_list=[stage2 * 2 ** (k - 1) for k in levels],
        out_channels=fpn_channels,
        extra_blocks=extra,
    )


def _anchors(size: int, levels: int, scales: tuple[float, ...], ratios=(0.5, 1.0, 2.0)) -> AnchorGenerator:
    sizes = tuple(tuple(size * 2**i * s for s in scales) for i in range(levels))
    return AnchorGenerator(sizes, (ratios,) * levels)


def _common(min_size: int, max_size: int) -> dict:
    if not 0 < min_size <= max_size:
        raise QbenchError(f"need 0 < min_size <= max_size, got {min_size}, {max_size}", "model")
    return {"min_size": min_size, "max_size": max_size}


def retinanet(
    arch: str,
    *,
    num_classes: int,
    min_size: int = 800,
    max_size: int = 1333,
    fpn_channels: int = 256,
    head_norm: str = "gn",
    backbone_norm: str = "bn",
    backbone_weights: str | None = None,
    anchor_size: int = 32,
    trainable_layers: int = 5,
    **kwargs,
) -> nn.Module:
    """RetinaNet (Lin et al. 2017): focal loss, 9 anchors per location on P3-P7."""
    from torchvision.models.detection.retinanet import RetinaNetHead

    where = f"retinanet_{arch}_fpn"
    backbone = resnet_fpn(
        arch,
        fpn_channels=fpn_channels,
        backbone_norm=backbone_norm,
        backbone_weights=backbone_weights,
        trainable_layers=trainable_layers,
        p6p7=True,
        where=where,
    )
    anchors = _anchors(anchor_size, 5, (1.0, 2 ** (1 / 3), 2 ** (2 / 3)))
    head = RetinaNetHead(fpn_channels, anchors.num_anchors_per_location()[0], num_classes, norm_layer(head_norm, where))
    model = RetinaNet(
        backbone, num_classes, anchor_generator=anchors, head=head, **_common(min_size, max_size), **kwargs
    )
    model.qbench_first_last = ("backbone.body.conv1", "head.classification_head.cls_logits")
    return model


def fcos(
    arch: str,
    *,
    num_classes: int,
    min_size: int = 800,
    max_size: int = 1333,
    fpn_channels: int = 256,
    head_norm: str = "gn",
    backbone_norm: str = "bn",
    backbone_weights: str | None = None,
    anchor_size: int = 8,
    trainable_layers: int = 5,
    **kwargs,
) -> nn.Module:
    """FCOS (Tian et al. 2019): anchor-free, one point per location on P3-P7, centerness.

    ``anchor_size`` is the size of the single "anchor" per location on P3 (torchvision:
    8, doubling per level); FCOS uses it only to assign targets to levels."""
    from torchvision.models.detection.fcos import FCOSClassificationHead, FCOSHead, FCOSRegressionHead

    where = f"fcos_{arch}_fpn"
    backbone = resnet_fpn(
        arch,
        fpn_channels=fpn_channels,
        backbone_norm=backbone_norm,
        backbone_weights=backbone_weights,
        trainable_layers=trainable_layers,
        p6p7=True,
        where=where,
    )
    anchors = _anchors(anchor_size, 5, (1.0,), ratios=(1.0,))
    norm = norm_layer(head_norm, where)
    head = FCOSHead(fpn_channels, 1, num_classes)
    # FCOSHead fixes GroupNorm; its two sub-heads take a norm_layer (torchvision >= 0.13)
    head.classification_head = FCOSClassificationHead(fpn_channels, 1, num_classes, norm_layer=norm)
    head.regression_head = FCOSRegressionHead(fpn_channels, 1, norm_layer=norm)
    model = FCOS(backbone, num_classes, anchor_generator=anchors, head=head, **_common(min_size, max_size), **kwargs)
    model.qbench_first_last = ("backbone.body.conv1", "head.classification_head.cls_logits")
    return model


def maskrcnn(
    arch: str,
    *,
    num_classes: int,
    min_size: int = 800,
    max_size: int = 1333,
    fpn_channels: int = 256,
    head_norm: str = "none",
    backbone_norm: str = "bn",
    backbone_weights: str | None = None,
    anchor_size: int = 32,
    trainable_layers: int = 5,
    **kwargs,
) -> nn.Module:
    """Mask R-CNN (He et al. 2017): RPN, RoIAlign box and mask heads on P2-P6."""
    from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads
    from torchvision.models.detection.rpn import RPNHead

    where = f"maskrcnn_{arch}_fpn"
    backbone = resnet_fpn(
        arch,
        fpn_channels=fpn_channels,
        backbone_norm=backbone_norm,
        backbone_weights=backbone_weights,
        trainable_layers=trainable_layers,
        p6p7=False,
        where=where,
    )
    anchors = _anchors(anchor_size, 5, (1.0,))
    norm = norm_layer(head_norm, where)
    extra = {}
    if norm is not None:  # torchvision's v2 heads, with normalisation
        extra["rpn_head"] = RPNHead(fpn_channels, anchors.num_anchors_per_location()[0], conv_depth=2)
        extra["box_head"] = FastRCNNConvFCHead((fpn_channels, 7, 7), [fpn_channels] * 4, [1024], norm_layer=norm)
        extra["mask_head"] = MaskRCNNHeads(fpn_channels, [fpn_channels] * 4, 1, norm_layer=norm)
    else:
        extra["rpn_head"] = RPNHead(fpn_channels, anchors.num_anchors_per_location()[0])
    model = MaskRCNN(
        backbone,
        num_classes,
        rpn_anchor_generator=anchors,
        **extra,
        **_common(min_size, max_size),
        **kwargs,
    )
    model.qbench_first_last = ("backbone.body.conv1", "roi_heads.box_predictor.cls_score")
    return model


FAMILIES = {"retinanet": retinanet, "fcos": fcos, "maskrcnn": maskrcnn}
#: which detectors predict instance masks
MASK_MODELS = {"maskrcnn"}

for _family, _fn in FAMILIES.items():
    for _short in ARCHS:
        DETECTORS.add(f"{_family}_{_short}_fpn", partial(_fn, _short))


MODEL_CLASSES = {"retinanet": RetinaNet, "fcos": FCOS, "maskrcnn": MaskRCNN}


#: the ``quantize`` option: the part of a detector a method quantizes (dotted-name prefixes;
#: empty = all of it)
QUANTIZE_PARTS: dict[str, tuple[str, ...]] = {"all": (), "backbone": ("backbone.body",)}


def detector_options(name: str) -> set[str]:
    """The options detector ``name`` takes: its family's own plus those of torchvision's
    model class (``score_thresh``, ``detections_per_img``, ``rpn_post_nms_top_n_train``...)."""
    family = name.split("_", 1)[0]
    own = set(inspect.signature(FAMILIES[family]).parameters)
    tv = set(inspect.signature(MODEL_CLASSES[family].__init__).parameters)
    return ((own | tv) - {"self", "arch", "backbone", "num_classes", "kwargs"}) | {"quantize"}


def create_detector(name: str, *, num_classes: int, where: str | None = None, **options) -> nn.Module:
    """Build the full-precision detector ``name`` for ``num_classes`` (background included)."""
    fn = DETECTORS.get(name, where)
    # torchvision swallows unknown keyword arguments: a misspelt option must not pass silently
    unknown = sorted(set(options) - detector_options(name))
    if unknown:
        known = ", ".join(sorted(detector_options(name)))
        raise QbenchError(f"unknown option(s) {', '.join(unknown)} for detector {name!r}; it takes {known}", where)
    quantize = options.pop("quantize", "all")
    if quantize not in QUANTIZE_PARTS:
        raise QbenchError(f"quantize must be one of {', '.join(QUANTIZE_PARTS)}, got {quantize!r}", where)
    model = fn(num_classes=num_classes, **options)
    if QUANTIZE_PARTS[quantize]:
        model.qbench_quantize_only = QUANTIZE_PARTS[quantize]
    return model


def predicts_masks(name: str) -> bool:
    """Whether detector ``name`` predicts instance masks (Mask R-CNN)."""
    return name.split("_", 1)[0] in MASK_MODELS


__all__ = ["DETECTORS", "create_detector", "predicts_masks", "resnet_fpn"]
