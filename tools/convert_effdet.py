#!/usr/bin/env python
"""Convert an effdet (rwightman/efficientdet-pytorch) EfficientDet checkpoint into this project's
format.

    python tools/convert_effdet.py --input tf_efficientdet_d0_34-f153e0cf.pth \\
        --output effdet_d0.pth --config-file configs/efficientdet/EfficientDet-D0.yaml --coco80
    python tools/test_net.py --config-file configs/efficientdet/EfficientDet-D0.yaml \\
        MODEL.WEIGHTS effdet_d0.pth

The input is a state dict, or an effdet training checkpoint's "state_dict" ("state_dict_ema" with
``--ema``). ``--config-file`` must describe the same variant (tf_efficientdet_d<k> ->
EfficientDet-D<k>.yaml, "same" padding); a checkpoint of another variant is rejected with a
one-line error naming the mismatched keys. effdet's COCO head has 90 outputs indexed by category
id - 1; ``--coco80`` keeps the 80 real categories in id order, the contiguous ids of this project's
COCO datasets (MODEL.EFFICIENTDET.NUM_CLASSES 80, the configs' default). Without it, evaluate with
MODEL.EFFICIENTDET.NUM_CLASSES 90. Written atomically as ``{"model": state_dict}``.
"""
import argparse
import logging
import sys

import torch

from detector.checkpoint import (
    CheckpointError,
    atomic_torch_save,
    load_checkpoint_file,
)
from detector.checkpoint.effdet_convert import (
    EffdetConversionError,
    convert_effdet_state_dict,
)
from detector.config import get_cfg
from detector.config.config import ConfigError
from detector.data.datasets import EFFDET_COCO80_INDICES
from detector.modeling import build_model

logger = logging.getLogger("convert_effdet")


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="effdet checkpoint (.pth)")
    parser.add_argument("--output", required=True, help="converted checkpoint to write (.pth)")
    parser.add_argument("--config-file", required=True,
                        help="config whose model the weights must fit, e.g. "
                             "configs/efficientdet/EfficientDet-D0.yaml")
    parser.add_argument("--coco80", action="store_true",
                        help="keep the 80 COCO categories of effdet's 90-way head, in id order")
    parser.add_argument("--ema", action="store_true",
                        help="take 'state_dict_ema' from an effdet training checkpoint")
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[],
                        help="config overrides as KEY VALUE pairs")
    return parser


def load_effdet_state_dict(path: str, ema: bool = False) -> dict:
    """A plain state dict, or the "state_dict" / "state_dict_ema" / "model" entry of a
    checkpoint."""
    obj = load_checkpoint_file(path)  # weights_only; one-line CheckpointError otherwise
    if isinstance(obj, dict):
        keys = ("state_dict_ema",) if ema else ("state_dict", "model")
        for key in keys:
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
        else:
            if ema:
                raise EffdetConversionError("--ema given but the checkpoint has no "
                                            "'state_dict_ema'")
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor)
                                                       for v in obj.values()):
        raise EffdetConversionError("expected a state dict of tensors")
    return obj


def convert(args) -> dict:
    cfg = get_cfg()
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(list(args.opts))
    cfg.MODEL.DEVICE = "cpu"
    state = load_effdet_state_dict(args.input, args.ema)
    class_indices = EFFDET_COCO80_INDICES if args.coco80 else None
    levels = {"min_level": cfg.MODEL.NECK.MIN_LEVEL, "max_level": cfg.MODEL.NECK.MAX_LEVEL}
    converted = convert_effdet_state_dict(state, class_indices=class_indices, **levels)
    num_anchors = converted["head.bbox_pred.conv_pw.bias"].numel() // 4
    num_classes = converted["head.cls_score.conv_pw.bias"].numel() // num_anchors
    if cfg.MODEL.EFFICIENTDET.NUM_CLASSES != num_classes:
        logger.warning("The checkpoint has %d classes, %s says %d: evaluate with "
                       "MODEL.EFFICIENTDET.NUM_CLASSES %d", num_classes, args.config_file,
                       cfg.MODEL.EFFICIENTDET.NUM_CLASSES, num_classes)
        cfg.MODEL.EFFICIENTDET.NUM_CLASSES = num_classes
    if cfg.MODEL.EFFICIENTDET.PADDING != "same":
        logger.warning("%s uses MODEL.EFFICIENTDET.PADDING '%s'; effdet's tf_ weights expect "
                       "'same'", args.config_file, cfg.MODEL.EFFICIENTDET.PADDING)
    # again against the model: folds redundant biases it lacks, checks every key and shape
    return convert_effdet_state_dict(state, build_model(cfg).state_dict(),
                                     class_indices=class_indices, **levels)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    args = build_parser().parse_args(argv)
    try:
        converted = convert(args)
    except (EffdetConversionError, CheckpointError, ConfigError, OSError) as e:
        message = str(e) if isinstance(e, CheckpointError) else f"{args.input}: {e}"  # names it
        print(f"error: {message}", file=sys.stderr)
        return 1
    atomic_torch_save({"model": converted}, args.output)
    logger.info("Wrote %d tensors to %s", len(converted), args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
