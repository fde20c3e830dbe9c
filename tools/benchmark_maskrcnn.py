#!/usr/bin/env python
"""Our Mask R-CNN R-50-FPN against torchvision's ``maskrcnn_resnet50_fpn``, same weights, same
input, one process (``tools/benchmark.py --model maskrcnn`` runs it too).

    python tools/benchmark_maskrcnn.py --size 512 --iters 10 --threads 2
    python tools/benchmark_maskrcnn.py --size 512 --profile        # top ops of both

torchvision runs with ``min_size=max_size=size`` on size x size images, so both see the images at
scale 1, and is set up as for its released COCO weights (FrozenBN with eps 0, stem and res2
frozen); ours is configs/mask_rcnn/mask_rcnn_R_50_FPN_torchvision.yaml holding the converted
weights. The weights are random, with spread-out batch-norm statistics.

Random weights put every class score near 1/91, below the 0.05 score threshold, which would leave
the mask head and the mask pasting untimed. The threshold stays at 0.05; instead the class logits
are biased: the background logit gets -8 and ``BIASED_CLASSES`` object classes +4, so each
proposal has a few classes well above 0.05 and per-class NMS leaves more than 100 candidates:
both models keep exactly 100 detections per image, mask them and paste the masks. The
detections are compared before any timing (count, score, box and pasted-mask IoU).

Training runs on real targets: four boxes per image whose masks are the boxes partly filled, so
the mask-target RoIAlign and the mask loss run; proposal sampling is random on both sides.
"""
import argparse
import os
from typing import Dict, List, Sequence

import torch
from torch import nn

from benchmark_common import (
    add_timing_args,
    detail_rows,
    freeze_like_released_detection_weights,
    inference_macs,
    infer_fn,
    load_weights_for_case,
    pair_peak_memory,
    phase_ms,
    print_rows,
    profile,
    randomize_batchnorms,
    speed_rows,
    time_pair,
    torchvision_style_case,
    train_step,
    without_instances,
    write_json,
)
from detector.checkpoint.torchvision_maskrcnn import convert_torchvision_maskrcnn_state_dict
from detector.config import get_cfg
from detector.modeling import build_model
from detector.structures import BitMasks, Boxes, Instances

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TV_CONFIG = os.path.join(ROOT, "configs", "mask_rcnn", "mask_rcnn_R_50_FPN_torchvision.yaml")
NUM_CLASSES = 91  # torchvision's COCO head: background + ids 1..90
BIASED_CLASSES = 6
DETECTIONS_PER_IMAGE = 100
HOW_DETECTIONS_ARE_KEPT = (f"class logits biased (background -8, {BIASED_CLASSES} classes +4), "
                           "score threshold 0.05 kept")


def randomize_statistics(model: nn.Module, generator: torch.Generator) -> None:
    """Batch-norm statistics and affine parameters away from the identity, small random biases
    on every conv and linear layer, and spread-out class, box and mask predictors, so each
    converted tensor affects the outputs."""
    randomize_batchnorms(model.modules(), generator)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear, nn.ConvTranspose2d)) and m.bias is not None:
                m.bias.add_(torch.randn(m.bias.shape, generator=generator) * 0.05)
        model.rpn.head.cls_logits.weight.normal_(0, 0.002, generator=generator)
        predictor = model.roi_heads.box_predictor
        predictor.cls_score.weight.normal_(0, 0.3, generator=generator)
        predictor.bbox_pred.weight.normal_(0, 0.01, generator=generator)
        # mask logits far from 0, so that thresholding at 0.5 is not decided by rounding
        model.roi_heads.mask_predictor.mask_fcn_logits.weight.normal_(0, 0.5, generator=generator)


def bias_class_logits(model: nn.Module) -> None:
    """Background (torchvision's class 0) far below and ``BIASED_CLASSES`` object classes above
    the rest, so each proposal scores a few classes above the 0.05 threshold."""
    with torch.no_grad():
        bias = model.roi_heads.box_predictor.cls_score.bias
        bias[0] -= 8.0
        bias[1:1 + BIASED_CLASSES] += 4.0


def _our_config(opts: Sequence[str] = ()):
    cfg = get_cfg()
    cfg.merge_from_file(TV_CONFIG)
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", "MODEL.BACKBONE.WEIGHTS", "",
                         "MODEL.ROI_HEADS.NUM_CLASSES", str(NUM_CLASSES - 1),
                         "TEST.DETECTIONS_PER_IMAGE", str(DETECTIONS_PER_IMAGE), *opts])
    return cfg


def _torchvision_model(size: int, cfg):
    from torchvision.models.detection import maskrcnn_resnet50_fpn

    return maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=NUM_CLASSES,
                                 min_size=size, max_size=size,
                                 box_detections_per_img=DETECTIONS_PER_IMAGE,
                                 # our normalisation of 0-255 pixels: both see the same input
                                 image_mean=list(cfg.MODEL.PIXEL_MEAN),
                                 image_std=list(cfg.MODEL.PIXEL_STD))


def build_pair(size: int, *, seed: int = 0, opts: Sequence[str] = ()):
    """torchvision's maskrcnn_resnet50_fpn (91 classes, random weights, biased class logits, see
    the module docstring) and ours holding the same weights."""
    cfg = _our_config(opts)
    torch.manual_seed(seed)
    tv = _torchvision_model(size, cfg)
    randomize_statistics(tv, torch.Generator().manual_seed(seed + 1))
    bias_class_logits(tv)
    freeze_like_released_detection_weights(tv)
    ours = build_model(cfg)
    ours.load_state_dict(convert_torchvision_maskrcnn_state_dict(tv.state_dict(),
                                                                 ours.state_dict()))
    return tv, ours


def make_inputs(batch: int, size: int, seed: int = 1):
    """(images, torchvision targets, our inputs with instances): 0-255 float images, four boxes
    per image whose masks fill 70% of the box at random."""
    g = torch.Generator().manual_seed(seed)
    images = [torch.randint(0, 256, (3, size, size), generator=g).float() for _ in range(batch)]
    tv_targets, ours = [], []
    for i, image in enumerate(images):
        xy = torch.rand(4, 2, generator=g) * size * 0.6
        wh = 16 + torch.rand(4, 2, generator=g) * size * 0.35
        boxes = torch.cat([xy, xy + wh], 1).clamp(max=size - 1).floor()
        masks = torch.zeros(4, size, size, dtype=torch.uint8)
        for k, (x1, y1, x2, y2) in enumerate(boxes.int().tolist()):
            masks[k, y1:y2, x1:x2] = torch.rand(y2 - y1, x2 - x1, generator=g) > 0.3
        labels = torch.randint(1, NUM_CLASSES, (4,), generator=g)
        tv_targets.append({"boxes": boxes, "labels": labels, "masks": masks})
        inst = Instances((size, size), gt_boxes=Boxes(boxes.clone()), gt_classes=labels - 1,
                         gt_masks=BitMasks(masks.bool()))
        ours.append({"image": image.clone(), "height": size, "width": size, "image_id": i,
                     "instances": inst})
    return images, tv_targets, ours


def memory_case(side: str, mode: str, size: int, batch: int, weights: str, opts=()):
    """One side alone ("reference" or "detector") holding the weights saved at ``weights``
    (the compared ones: biased logits included) and the function running its ``mode``
    ("inference" or "train"), for ``benchmark_common.peak_memory_mb``."""
    cfg = _our_config(opts)
    if side == "reference":
        model = _torchvision_model(size, cfg)
        freeze_like_released_detection_weights(model)
    else:
        model = build_model(cfg)
    load_weights_for_case(model, weights)
    return torchvision_style_case(model, side, mode, *make_inputs(batch, size))


def _order(boxes, scores, labels) -> List[int]:
    # by score, ties broken by class and box: the order both sides agree on
    return sorted(range(len(scores)), key=lambda i: (-round(float(scores[i]), 4), int(labels[i]),
                                                     *[round(float(v), 2) for v in boxes[i]]))


def compare_outputs(tv_outputs: List[Dict], our_outputs: List[Dict]) -> dict:
    """Detection counts of both, largest |score| and |box| differences and the smallest IoU of
    the pasted masks (torchvision's probabilities thresholded at 0.5), detections matched by
    their order."""
    counts, score_diff, box_diff, min_iou, labels_equal = [], 0.0, 0.0, 1.0, True
    for exp, out in zip(tv_outputs, our_outputs):
        inst = out["instances"]
        counts.append((len(exp["scores"]), len(inst)))
        if len(inst) != len(exp["scores"]) or len(inst) == 0:
            labels_equal = labels_equal and len(inst) == len(exp["scores"])
            continue
        e = _order(exp["boxes"], exp["scores"], exp["labels"])
        o = _order(inst.pred_boxes.tensor, inst.scores, inst.pred_classes + 1)
        labels_equal = labels_equal and torch.equal(inst.pred_classes[o] + 1, exp["labels"][e])
        score_diff = max(score_diff, float((inst.scores[o] - exp["scores"][e]).abs().max()))
        box_diff = max(box_diff, float((inst.pred_boxes.tensor[o] - exp["boxes"][e]).abs().max()))
        e_masks, o_masks = exp["masks"][e, 0] > 0.5, inst.pred_masks[o]
        inter = (e_masks & o_masks).flatten(1).sum(1).float()
        union = (e_masks | o_masks).flatten(1).sum(1).float()
        iou = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
        min_iou = min(min_iou, float(iou.min()))
    return {"detections": counts, "labels_equal": labels_equal, "max_score_diff": score_diff,
            "max_box_diff": box_diff, "min_mask_iou": min_iou}


def outputs_match(check: dict) -> bool:
    """The same detections on both sides: equal counts and classes, scores within 1e-4, boxes
    within 1e-2 px, every pasted mask at IoU >= 0.99."""
    return (check["labels_equal"] and all(a == b for a, b in check["detections"])
            and check["max_score_diff"] <= 1e-4 and check["max_box_diff"] <= 1e-2
            and check["min_mask_iou"] >= 0.99)


def run_maskrcnn(args, *, profile_ops: bool = False, opts: Sequence[str] = ()) -> dict:
    """Compare, then time torchvision's Mask R-CNN and ours (sizes, batches, iterations from
    ``args``); print the table; return the rows and the output comparison."""
    if getattr(args, "device", "cpu") != "cpu":
        raise SystemExit(f"benchmark: error: the Mask R-CNN comparison runs on the CPU only, not "
                         f"--device {args.device}")
    tv, ours = build_pair(args.size, opts=opts)
    bi, bt = args.infer_batch, args.train_batch
    images, tv_targets, our_inputs = make_inputs(max(bi, bt), args.size)
    our_eval_inputs = without_instances(our_inputs[:bi])
    tv.eval()
    ours.eval()
    with torch.no_grad():
        check = compare_outputs(tv(images[:bi]), ours(our_eval_inputs))
    print(f"Mask R-CNN: {HOW_DETECTIONS_ARE_KEPT}; detections per image (torchvision, ours) "
          f"{check['detections']}, classes equal {check['labels_equal']}, max |score diff| "
          f"{check['max_score_diff']:.2e}, max |box diff| {check['max_box_diff']:.2e} px, min "
          f"mask IoU {check['min_mask_iou']:.4f}")
    if not outputs_match(check):
        raise RuntimeError(f"Mask R-CNN outputs differ from torchvision's ({check}): a speed "
                           "comparison would be meaningless")

    infer_tv, infer_ours = infer_fn(tv, images[:bi]), infer_fn(ours, our_eval_inputs)
    if profile_ops:
        profile("torchvision inference", infer_tv)
        profile("detector inference", infer_ours)
    infer_seconds = time_pair(infer_tv, infer_ours, args.iters, args.warmup)

    opt_tv = torch.optim.SGD([p for p in tv.parameters() if p.requires_grad], lr=1e-6)
    opt_ours = torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=1e-6)
    tv.train()
    ours.train()
    step_tv = train_step(opt_tv, lambda: tv(images[:bt], tv_targets[:bt]))
    step_ours = train_step(opt_ours, lambda: ours(our_inputs[:bt]))
    if profile_ops:
        profile("torchvision training step", step_tv)
        profile("detector training step", step_ours)
    train_seconds = time_pair(step_tv, step_ours, args.iters, args.warmup)

    rows = speed_rows(infer_seconds, bi, train_seconds, bt)
    memory = None if getattr(args, "no_memory", False) else pair_peak_memory(
        "benchmark_maskrcnn", tv, ours, size=args.size, infer_batch=bi, train_batch=bt,
        threads=torch.get_num_threads(), opts=list(opts))
    rows.update(detail_rows((phase_ms(step_tv, args.iters), phase_ms(step_ours, args.iters)),
                            inference_macs(ours, args.size, args.size),
                            (rows["inference_ms_per_img"][0], rows["inference_ms_per_img"][1]),
                            memory))
    print_rows(f"Mask R-CNN R-50-FPN, {args.size}x{args.size}, {DETECTIONS_PER_IMAGE} detections "
               f"per image, inference batch {bi}, train batch {bt}, "
               f"threads={torch.get_num_threads()}, median of {args.iters} alternating runs after "
               f"{args.warmup} warm-up", "torchvision", rows)
    return {"rows": rows, "max_score_diff": check["max_score_diff"], "reference": "torchvision",
            "outputs": check}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512, help="square input size")
    add_timing_args(parser)
    parser.add_argument("--profile", action="store_true", help="print the top ops of each step")
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[],
                        help="config overrides for our model, KEY VALUE pairs")
    args = parser.parse_args(argv)
    if args.size % 32 or args.size < 128:
        parser.error("--size must be a multiple of 32, at least 128")
    if args.threads:
        torch.set_num_threads(args.threads)
    results = run_maskrcnn(args, profile_ops=args.profile, opts=args.opts)
    if args.json:
        write_json(args.json, {**{k: dict(zip(("torchvision", "detector", "ratio"), v))
                                  for k, v in results["rows"].items()},
                               **results["outputs"]})
    return results


if __name__ == "__main__":
    main()
