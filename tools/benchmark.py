#!/usr/bin/env python
"""Our detectors against the reference implementations, side by side in one process, same weights,
same input: RetinaNet R-50-FPN against torchvision's ``retinanet_resnet50_fpn``, Mask R-CNN
R-50-FPN against torchvision's ``maskrcnn_resnet50_fpn`` and EfficientDet-D<k> against effdet's
``tf_efficientdet_d<k>``.

    python tools/benchmark.py                                  # all three, at 512 px
    python tools/benchmark.py --model maskrcnn retinanet --threads 2 --json out.json
    python tools/benchmark.py --model retinanet --size 256 --iters 5 --threads 2 --json out.json
    python tools/benchmark.py --model efficientdet --variant 1 --size 640

Reports inference ms/img (batch --infer-batch) and training img/s (batch --train-batch) for both
implementations and the ratio (>1 means we are faster), then a summary of the ratios. Outputs are
compared first: a speedup that changes results is a bug. tools/benchmark_effdet.py and
tools/benchmark_maskrcnn.py have the model-only options (--profile, config overrides);
benchmark_maskrcnn.py says how both Mask R-CNNs are made to keep 100 detections per image.
"""
import argparse
import os

import torch

from benchmark_common import (
    add_timing_args,
    freeze_like_released_detection_weights,
    print_rows,
    speed_rows,
    time_pair,
    train_step,
    write_json,
)
from detector.checkpoint.torchvision_retinanet import convert_torchvision_retinanet_state_dict  # noqa
from detector.config import get_cfg
from detector.modeling import build_model
from detector.structures import Boxes, Instances

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TV_CONFIG = os.path.join(ROOT, "configs", "retinanet", "retinanet_R_50_FPN_torchvision.yaml")
MODELS = ("retinanet", "maskrcnn", "efficientdet")


def build_pair(size, num_classes=91, seed=0):
    """torchvision's retinanet_resnet50_fpn with random weights and ours holding the same weights.

    torchvision is set up as it is for its released COCO weights (FrozenBN with eps 0, stem and
    res2 frozen), which is what our torchvision config mirrors; both normalise 0-255 pixels alike.
    """
    from torchvision.models.detection import retinanet_resnet50_fpn

    cfg = get_cfg()
    cfg.merge_from_file(TV_CONFIG)
    cfg.merge_from_list(["MODEL.RETINANET.NUM_CLASSES", str(num_classes)])
    torch.manual_seed(seed)
    tv = retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=num_classes,
                                min_size=size, max_size=size, image_mean=cfg.MODEL.PIXEL_MEAN,
                                image_std=cfg.MODEL.PIXEL_STD)
    freeze_like_released_detection_weights(tv)
    ours = build_model(cfg)
    ours.load_state_dict(convert_torchvision_retinanet_state_dict(tv.state_dict()))
    return tv, ours


def make_inputs(batch, size, seed=1):
    g = torch.Generator().manual_seed(seed)
    images = [torch.randint(0, 256, (3, size, size), generator=g).float() for _ in range(batch)]
    boxes = []
    for _ in range(batch):
        xy = torch.rand(4, 2, generator=g) * size * 0.6
        wh = 16 + torch.rand(4, 2, generator=g) * size * 0.35
        boxes.append(torch.cat([xy, xy + wh], 1))
    labels = [torch.randint(1, 91, (4,), generator=g) for _ in range(batch)]
    tv_targets = [{"boxes": b, "labels": lab} for b, lab in zip(boxes, labels)]
    ours = []
    for img, b, lab in zip(images, boxes, labels):
        inst = Instances((size, size), gt_boxes=Boxes(b.clone()), gt_classes=lab.clone())
        ours.append({"image": img.clone(), "height": size, "width": size, "instances": inst})
    return images, tv_targets, ours


def check_outputs_match(tv, ours, images, our_inputs):
    tv.eval()
    ours.eval()
    with torch.no_grad():
        tv_out = tv(images)
        our_out = ours([{k: v for k, v in d.items() if k != "instances"} for d in our_inputs])
    worst = 0.0
    for t, o in zip(tv_out, our_out):
        inst = o["instances"]
        n = min(len(t["scores"]), len(inst))
        if n:
            worst = max(worst, (t["scores"][:n] - inst.scores[:n]).abs().max().item())
    return worst


def run_retinanet(args) -> dict:
    """Time torchvision's RetinaNet and ours; print the table; return the rows."""
    tv, ours = build_pair(args.size)
    images, tv_targets, our_inputs = make_inputs(max(args.infer_batch, args.train_batch), args.size)
    bi, bt = args.infer_batch, args.train_batch
    max_score_diff = check_outputs_match(tv, ours, images[:bi], our_inputs[:bi])
    print(f"RetinaNet: max |score difference| between implementations: {max_score_diff:.2e}")

    def infer(model, inputs):
        def run():
            with torch.no_grad():
                model(inputs)
        return run

    tv.eval()
    ours.eval()
    our_eval_inputs = [{k: v for k, v in d.items() if k != "instances"} for d in our_inputs[:bi]]
    infer_seconds = time_pair(infer(tv, images[:bi]), infer(ours, our_eval_inputs),
                              args.iters, args.warmup)

    opt_tv = torch.optim.SGD([p for p in tv.parameters() if p.requires_grad], lr=1e-6)
    opt_ours = torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=1e-6)
    tv.train()
    ours.train()
    train_seconds = time_pair(
        train_step(opt_tv, lambda: tv(images[:bt], tv_targets[:bt])),
        train_step(opt_ours, lambda: ours(our_inputs[:bt])), args.iters, args.warmup)

    rows = speed_rows(infer_seconds, bi, train_seconds, bt)
    print_rows(f"RetinaNet R-50-FPN, {args.size}x{args.size}, inference batch {bi}, train batch "
               f"{bt}, threads={torch.get_num_threads()}, median of {args.iters} alternating runs "
               f"after {args.warmup} warm-up", "torchvision", rows)
    return {"rows": rows, "max_score_diff": max_score_diff, "reference": "torchvision"}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", nargs="+", choices=MODELS + ("all",), default=["all"],
                        help="one or more models, or all")
    parser.add_argument("--size", type=int, default=512,
                        help="square input size (multiple of 128 with EfficientDet, else of 32)")
    parser.add_argument("--variant", type=int, default=0, help="EfficientDet-D<variant> (0..7)")
    add_timing_args(parser)
    args = parser.parse_args(argv)
    models = MODELS if "all" in args.model else args.model
    if args.size % 128 and "efficientdet" in models:
        parser.error("--size must be a multiple of 128 (effdet builds its BiFPN for that size)")
    if args.size % 32:
        parser.error("--size must be a multiple of 32")
    if args.threads:
        torch.set_num_threads(args.threads)

    results = {}
    if "retinanet" in models:
        results["RetinaNet R-50-FPN"] = run_retinanet(args)
    if "maskrcnn" in models:
        from benchmark_maskrcnn import run_maskrcnn

        results["Mask R-CNN R-50-FPN"] = run_maskrcnn(args)
    if "efficientdet" in models:
        from benchmark_effdet import run_efficientdet

        results[f"EfficientDet-D{args.variant}"] = run_efficientdet(args)
    print(f"\nsummary: ratio ours/reference speed (>1: ours faster), {args.size}x{args.size}")
    print(f"{'model':<22}{'reference':>13}{'inference':>11}{'train':>9}{'max score diff':>16}"
          f"{'max box diff':>14}{'min mask IoU':>14}")
    for name, res in results.items():
        rows, outputs = res["rows"], res.get("outputs", {})
        box_diff, mask_iou = (f"{outputs[k]:{f}}" if k in outputs else "-"
                              for k, f in (("max_box_diff", ".1e"), ("min_mask_iou", ".4f")))
        print(f"{name:<22}{res['reference']:>13}{rows['inference_ms_per_img'][2]:>11.2f}"
              f"{rows['train_img_per_s'][2]:>9.2f}{res['max_score_diff']:>16.1e}{box_diff:>14}"
              f"{mask_iou:>14}")
    if args.json:
        write_json(args.json, {
            name: {**{k: dict(zip((res["reference"], "detector", "ratio"), v))
                      for k, v in res["rows"].items()}, "max_score_diff": res["max_score_diff"],
               # Mask R-CNN: detection counts, box differences and mask IoU too
               **res.get("outputs", {})}
            for name, res in results.items()})
    return results


if __name__ == "__main__":
    main()
