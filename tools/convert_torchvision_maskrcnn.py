#!/usr/bin/env python
"""Convert a torchvision ``maskrcnn_resnet50_fpn`` (v1) checkpoint into this project's format.

    python tools/convert_torchvision_maskrcnn.py --input maskrcnn_resnet50_fpn_coco.pth \\
        --output maskrcnn_tv.pth --coco-contiguous
    python tools/test_net.py --config-file configs/mask_rcnn/mask_rcnn_R_50_FPN_torchvision.yaml \\
        MODEL.WEIGHTS maskrcnn_tv.pth

torchvision's background class (index 0) moves last, as our heads have it. Without
``--coco-contiguous`` the model keeps torchvision's 90 category ids 1..90 as classes 0..89
(``MODEL.ROI_HEADS.NUM_CLASSES 90``); with it, the 80 real COCO categories in id order, the
contiguous ids of this project's COCO datasets (``NUM_CLASSES 80``). The converted weights are
checked against the model built from ``--config-file`` and written atomically as
``{"model": state_dict}``.
"""
import logging
import os
import sys

from detector.checkpoint.torchvision_maskrcnn import (
    convert_torchvision_maskrcnn_state_dict,
    select_classes,
)
from detector.checkpoint.torchvision_retinanet import (
    check_against,
    load_torchvision_state_dict,
    run_torchvision_converter,
    torchvision_converter_parser,
)
from detector.config import get_cfg
from detector.data.datasets import TORCHVISION_COCO80_INDICES
from detector.modeling import build_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(ROOT, "configs", "mask_rcnn", "mask_rcnn_R_50_FPN_torchvision.yaml")
logger = logging.getLogger("convert_torchvision_maskrcnn")


def build_parser():
    return torchvision_converter_parser(__doc__, DEFAULT_CONFIG)


def convert(args) -> dict:
    converted = convert_torchvision_maskrcnn_state_dict(load_torchvision_state_dict(args.input))
    if args.coco_contiguous:
        # torchvision's class c is our c - 1 once the background has moved last
        converted = select_classes(converted, [i - 1 for i in TORCHVISION_COCO80_INDICES])
    num_classes = converted["roi_heads.box_predictor.cls_score.bias"].numel() - 1
    cfg = get_cfg()
    cfg.merge_from_file(args.config_file)
    if cfg.MODEL.ROI_HEADS.NUM_CLASSES != num_classes:
        logger.warning("The checkpoint has %d classes, %s says %d: evaluate with "
                       "MODEL.ROI_HEADS.NUM_CLASSES %d", num_classes, args.config_file,
                       cfg.MODEL.ROI_HEADS.NUM_CLASSES, num_classes)
        cfg.MODEL.ROI_HEADS.NUM_CLASSES = num_classes
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.BACKBONE.WEIGHTS = ""
    check_against(converted, build_model(cfg).state_dict())
    return converted


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    return run_torchvision_converter(convert, build_parser().parse_args(argv), logger)


if __name__ == "__main__":
    sys.exit(main())
