"""A random torchvision ``retinanet_resnet50_fpn`` and our RetinaNet loaded with its converted
weights, shared by the equivalence tests (tests/modeling) and the converter tests
(tests/checkpoint)."""
import pathlib

import torch
from torch import nn
from torchvision.models.detection import retinanet_resnet50_fpn
from torchvision.models.detection._utils import overwrite_eps

from detector.checkpoint.torchvision_retinanet import convert_torchvision_retinanet_state_dict
from detector.config import get_cfg
from detector.layers import convert_frozen_batchnorm
from detector.modeling import build_model

from random_statistics import randomize_batchnorms

ROOT = pathlib.Path(__file__).resolve().parents[1]
TV_CONFIG = ROOT / "configs" / "retinanet" / "retinanet_R_50_FPN_torchvision.yaml"
IMAGE_SIZES = [(256, 384), (256, 256)]  # padded to 256x384, a multiple of P7's stride 128
# batches padded to multiples of 32 that are not multiples of P6/P7's strides, as most COCO
# batches: torchvision's anchor strides there are padded size // feature size (P7 at 480x544:
# 120 x 108); keyed by the padded size, one image at 480x544 to keep the default test run short
UNEVEN_IMAGE_SIZES = {
    "480x544": [(480, 520)],
    "800x1088": [(800, 1088), (800, 1000)],
}


def torchvision_cfg(*opts):
    """The torchvision-compatible RetinaNet config on CPU, with KEY, VALUE overrides."""
    cfg = get_cfg()
    cfg.merge_from_file(str(TV_CONFIG))
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", *opts])
    return cfg


def _randomize(tv, generator):
    """Non-trivial BN statistics and biases, and a head whose scores spread over (0, 1), so every
    converted tensor matters and there are many detections above the default threshold."""
    randomize_batchnorms(tv.backbone.body.modules(), generator)
    with torch.no_grad():
        for m in list(tv.backbone.fpn.modules()) + list(tv.head.modules()):
            if isinstance(m, nn.Conv2d) and m.bias is not None:
                m.bias.add_(torch.randn(m.bias.shape, generator=generator) * 0.01)
        tv.head.classification_head.cls_logits.weight.normal_(0, 0.02, generator=generator)
        tv.head.regression_head.bbox_reg.weight.normal_(0, 0.005, generator=generator)


def make_images(sizes, seed=2):
    """Float 0-255 random images of ``sizes`` [(h, w), ...]."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (3, h, w), generator=g).float() for h, w in sizes]


def set_torchvision_input_sizes(tv, sizes):
    """Makes ``tv``'s transform keep images of ``sizes`` at scale 1 (no resizing), so both models
    see the same pixels; every image needs its shorter side equal to the batch's shortest."""
    min_size = min(min(h, w) for h, w in sizes)
    max_size = max(max(h, w) for h, w in sizes)
    for h, w in sizes:
        scale = min(min_size / min(h, w), max_size / max(h, w))
        assert scale == 1.0, f"torchvision would resize the {h}x{w} image by {scale}"
    tv.transform.min_size = (min_size,)
    tv.transform.max_size = max_size


def build_torchvision_pair():
    """Returns ``(tv, ours, converted, images)``: a seeded torchvision RetinaNet (91 classes) with
    randomised statistics, our model loaded strictly with ``converted`` (its converted state dict),
    and float 0-255 images of IMAGE_SIZES."""
    cfg = torchvision_cfg()
    torch.manual_seed(0)
    tv = retinanet_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=91,
        # no resizing (scale 1) and our normalisation, so both see the same pixels
        min_size=256, max_size=384, image_mean=cfg.MODEL.PIXEL_MEAN, image_std=cfg.MODEL.PIXEL_STD)
    _randomize(tv, torch.Generator().manual_seed(1))
    # what torchvision builds for its released COCO weights: FrozenBatchNorm with eps 0
    tv.backbone.body = convert_frozen_batchnorm(tv.backbone.body)
    overwrite_eps(tv, 0.0)
    ours = build_model(cfg)
    converted = convert_torchvision_retinanet_state_dict(tv.state_dict(), ours.state_dict())
    ours.load_state_dict(converted, strict=True)
    return tv, ours, converted, make_images(IMAGE_SIZES)
