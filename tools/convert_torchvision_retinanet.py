#!/usr/bin/env python
"""Convert a torchvision ``retinanet_resnet50_fpn`` (v1) checkpoint into this project's format.

    python tools/convert_torchvision_retinanet.py --input retinanet_resnet50_fpn_coco.pth \\
        --output retinanet_tv.pth
    python tools/test_net.py --config-file configs/retinanet/retinanet_R_50_FPN_torchvision.yaml \\
        MODEL.WEIGHTS retinanet_tv.pth

With ``--coco-contiguous`` the 91-way torchvision head (indexed by COCO category id) is cut to the
80 real COCO categories in id order, the contiguous ids of this project's COCO datasets; evaluate it
with ``MODEL.RETINANET.NUM_CLASSES 80``. The converted weights are checked against the model built
from ``--config-file`` and written atomically as ``{"model": state_dict}``.
"""
import logging
import os
import sys

from detector.checkpoint.torchvision_retinanet import (
    check_against,
    convert_torchvision_retinanet_state_dict,
    load_torchvision_state_dict,
    run_torchvision_converter,
    torchvision_converter_parser,
    select_classes,
)
from detector.config import get_cfg
from detector.data.datasets import TORCHVISION_COCO80_INDICES
from detector.modeling import build_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(ROOT, "configs", "retinanet", "retinanet_R_50_FPN_torchvision.yaml")
logger = logging.getLogger("convert_torchvision_retinanet")


def build_parser():
    return torchvision_converter_parser(__doc__, DEFAULT_CONFIG)


def convert(args) -> dict:
    converted = convert_torchvision_retinanet_state_dict(load_torchvision_state_dict(args.input))
    if args.coco_contiguous:
        converted = select_classes(converted, TORCHVISION_COCO80_INDICES)
    num_anchors = converted["head.bbox_pred.bias"].numel() // 4
    num_classes = converted["head.cls_score.bias"].numel() // num_anchors

    cfg = get_cfg()
    cfg.merge_from_file(args.config_file)
    if cfg.MODEL.RETINANET.NUM_CLASSES != num_classes:
        logger.warning("The checkpoint has %d classes, %s says %d: evaluate with "
                       "MODEL.RETINANET.NUM_CLASSES %d", num_classes, args.config_file,
                       cfg.MODEL.RETINANET.NUM_CLASSES, num_classes)
        cfg.MODEL.RETINANET.NUM_CLASSES = num_classes
    cfg.MODEL.DEVICE = "cpu"
    check_against(converted, build_model(cfg).state_dict())
    return converted


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    return run_torchvision_converter(convert, build_parser().parse_args(argv), logger)


if __name__ == "__main__":
    sys.exit(main())
