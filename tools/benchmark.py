#!/usr/bin/env python
"""Side-by-side speed of our RetinaNet and torchvision's, same weights, same input, one process.

    python tools/benchmark.py --size 512 --iters 10
    python tools/benchmark.py --size 256 --iters 5 --threads 2 --json out.json

Reports inference ms/img (batch --infer-batch) and training img/s (batch --train-batch) for both, and
the ratio (>1 means we are faster). Outputs are compared first: a speedup that changes results is a bug.
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from detector.checkpoint.torchvision_retinanet import convert_torchvision_retinanet_state_dict  # noqa
from detector.config import get_cfg  # noqa: E402
from detector.layers import convert_frozen_batchnorm  # noqa: E402
from detector.modeling import build_model  # noqa: E402
from detector.structures import Boxes, Instances  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TV_CONFIG = os.path.join(ROOT, "configs", "retinanet", "retinanet_R_50_FPN_torchvision.yaml")


def build_pair(size, num_classes=91, seed=0):
    """torchvision's retinanet_resnet50_fpn with random weights and ours holding the same weights.

    torchvision is set up as it is for its released COCO weights (FrozenBN with eps 0, stem and
    res2 frozen), which is what our torchvision config mirrors; both normalise 0-255 pixels alike.
    """
    from torchvision.models.detection import retinanet_resnet50_fpn
    from torchvision.models.detection._utils import overwrite_eps

    cfg = get_cfg()
    cfg.merge_from_file(TV_CONFIG)
    cfg.merge_from_list(["MODEL.RETINANET.NUM_CLASSES", str(num_classes)])
    torch.manual_seed(seed)
    tv = retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=num_classes,
                                min_size=size, max_size=size, image_mean=cfg.MODEL.PIXEL_MEAN,
                                image_std=cfg.MODEL.PIXEL_STD)
    tv.backbone.body = convert_frozen_batchnorm(tv.backbone.body)
    overwrite_eps(tv, 0.0)
    for name, param in tv.backbone.body.named_parameters():
        if name.startswith(("conv1.", "layer1.")):
            param.requires_grad_(False)
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


def time_pair(fn_a, fn_b, iters, warmup):
    """Median seconds of two functions, run alternately so machine noise hits both alike."""
    for _ in range(warmup):
        fn_a()
        fn_b()
    samples_a, samples_b = [], []
    for _ in range(iters):
        for fn, samples in ((fn_a, samples_a), (fn_b, samples_b)):
            start = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - start)
    return statistics.median(samples_a), statistics.median(samples_b)


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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512, help="square input size (multiple of 128)")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--infer-batch", type=int, default=1)
    parser.add_argument("--train-batch", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    parser.add_argument("--json", default="", help="write the figures to this file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    tv, ours = build_pair(args.size)
    images, tv_targets, our_inputs = make_inputs(max(args.infer_batch, args.train_batch), args.size)
    max_score_diff = check_outputs_match(tv, ours, images[: args.infer_batch],
                                         our_inputs[: args.infer_batch])
    print(f"max |score difference| between implementations: {max_score_diff:.2e}")

    def infer(model, inputs):
        def run():
            with torch.no_grad():
                model(inputs)
        return run

    tv.eval()
    ours.eval()
    bi = args.infer_batch
    our_eval_inputs = [{k: v for k, v in d.items() if k != "instances"} for d in our_inputs[:bi]]
    t_tv_inf, t_our_inf = time_pair(infer(tv, images[:bi]), infer(ours, our_eval_inputs),
                                    args.iters, args.warmup)
    t_tv_inf, t_our_inf = t_tv_inf / bi, t_our_inf / bi

    bt = args.train_batch
    opt_tv = torch.optim.SGD([p for p in tv.parameters() if p.requires_grad], lr=1e-6)
    opt_ours = torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=1e-6)

    def train(model, opt, fn):
        def run():
            losses = fn()
            total = sum(losses.values())
            opt.zero_grad(set_to_none=True)
            total.backward()
            opt.step()
        return run

    tv.train()
    ours.train()
    t_tv_train, t_our_train = time_pair(
        train(tv, opt_tv, lambda: tv(images[:bt], tv_targets[:bt])),
        train(ours, opt_ours, lambda: ours(our_inputs[:bt])), args.iters, args.warmup)

    rows = {
        "inference_ms_per_img": (t_tv_inf * 1000, t_our_inf * 1000, t_tv_inf / t_our_inf),
        "train_img_per_s": (bt / t_tv_train, bt / t_our_train, t_tv_train / t_our_train),
    }
    print(f"RetinaNet R-50-FPN, {args.size}x{args.size}, threads={torch.get_num_threads()}, "
          f"median of {args.iters} after {args.warmup} warm-up")
    print(f"{'metric':<24}{'torchvision':>14}{'detector':>14}{'ratio (ours faster >1)':>26}")
    for name, (a, b, r) in rows.items():
        print(f"{name:<24}{a:>14.2f}{b:>14.2f}{r:>26.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({k: dict(zip(("torchvision", "detector", "ratio"), v)) for k, v in rows.items()}
                      | {"max_score_diff": max_score_diff}, f, indent=1)


if __name__ == "__main__":
    main()
