#!/usr/bin/env python
"""Side-by-side speed of our EfficientDet and effdet's, same weights, same input, one process.

    python tools/benchmark_effdet.py --variant 0 --size 512 --iters 10
    python tools/benchmark_effdet.py --variant 0 --size 512 --profile   # top ops of both

effdet runs as its benches: ``DetBenchPredict`` on the already normalised batch (inference) and
``DetBenchTrain`` with its anchor labeler (training; both models label anchors inside the step).
effdet's own training script labels anchors in data-loader workers instead;
``--effdet-loader-labels`` times that setting (labels computed once, outside the timed step),
which flatters effdet. Ours takes the uint8 images and does normalisation, padding, labeling,
losses and postprocessing itself. Timings alternate between the
two models iteration by iteration and report medians, so load from other processes affects both
alike. Detections are compared first: a speedup that changes results is a bug.
"""
import argparse
import os

import torch

from benchmark_common import (
    add_timing_args,
    amp_rows,
    detail_rows,
    inference_macs,
    infer_fn,
    load_weights_for_case,
    pair_peak_memory,
    phase_ms,
    print_rows,
    profile,
    speed_rows,
    time_pair,
    train_step,
    without_instances,
    write_json,
)
from detector.checkpoint.effdet_convert import convert_effdet_state_dict
from detector.config import get_cfg
from detector.modeling import build_model
from detector.structures import Boxes, Instances

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_CLASSES = 90


def _effdet_model(variant: int, size: int):
    import effdet

    return effdet.create_model(f"tf_efficientdet_d{variant}", pretrained=False,
                               pretrained_backbone=False, image_size=(size, size))


def _our_config(variant: int, opts=()):
    cfg = get_cfg()
    cfg.merge_from_file(os.path.join(ROOT, "configs", "efficientdet",
                                     f"EfficientDet-D{variant}.yaml"))
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", "MODEL.EFFICIENTDET.NUM_CLASSES",
                         str(NUM_CLASSES), *opts])
    return cfg


def _our_model(variant: int, opts=()):
    return build_model(_our_config(variant, opts))


def build_pair(variant: int, size: int, seed: int = 0, opts=()):
    """effdet's tf_efficientdet_d<variant> with random weights and ours holding the same."""
    torch.manual_seed(seed)
    theirs = _effdet_model(variant, size)
    ours = _our_model(variant, opts)
    ours.load_state_dict(convert_effdet_state_dict(theirs.state_dict(), ours.state_dict()))
    return theirs, ours


def make_inputs(batch: int, size: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    images = [torch.randint(0, 256, (3, size, size), generator=g, dtype=torch.uint8)
              for _ in range(batch)]
    boxes, labels = [], []
    for _ in range(batch):
        xy = torch.rand(4, 2, generator=g) * size * 0.6
        wh = 16 + torch.rand(4, 2, generator=g) * size * 0.35
        boxes.append(torch.cat([xy, xy + wh], 1).clamp(max=size))
        labels.append(torch.randint(0, NUM_CLASSES, (4,), generator=g))
    ours = [{"image": im, "height": size, "width": size, "image_id": i,
             "instances": Instances((size, size), gt_boxes=Boxes(b), gt_classes=c)}
            for i, (im, b, c) in enumerate(zip(images, boxes, labels))]
    # effdet: normalised batch, (y1, x1, y2, x2) boxes, 1-based classes
    target = {"bbox": torch.stack([b[:, [1, 0, 3, 2]] for b in boxes]),
              "cls": torch.stack(labels) + 1,
              "img_scale": torch.ones(batch), "img_size": torch.tensor([[size, size]] * batch)}
    return images, ours, target


def memory_case(side: str, mode: str, size: int, batch: int, weights: str, variant: int = 0,
                opts=()):
    """One side alone ("reference": effdet's model in its benches, or "detector") holding the
    weights saved at ``weights``, and the function running its ``mode`` ("inference" or
    "train") as the timing does, for ``benchmark_common.peak_memory_mb``."""
    from effdet.bench import DetBenchPredict, DetBenchTrain

    model = _effdet_model(variant, size) if side == "reference" else _our_model(variant, opts)
    load_weights_for_case(model, weights)
    images, our_inputs, target = make_inputs(batch, size)
    if side == "detector":
        if mode == "inference":
            return infer_fn(model.eval(), without_instances(our_inputs))
        optimizer = torch.optim.SGD(model.train().parameters(), lr=1e-6, momentum=0.9)
        return train_step(optimizer, lambda: model(our_inputs))
    # effdet takes the batch normalised as ours normalises it (``normalized``)
    cfg = _our_config(variant, opts)
    pixel_mean = torch.tensor(cfg.MODEL.PIXEL_MEAN).view(3, 1, 1)
    pixel_std = torch.tensor(cfg.MODEL.PIXEL_STD).view(3, 1, 1)
    x = torch.stack([(im.float() - pixel_mean) / pixel_std for im in images])
    if mode == "inference":
        predict = DetBenchPredict(model).eval()
        info = {k: v for k, v in target.items() if k in ("img_scale", "img_size")}

        def run():
            with torch.no_grad():
                predict(x, img_info=info)
        return run
    trainer = DetBenchTrain(model).train()
    optimizer = torch.optim.SGD(trainer.parameters(), lr=1e-6, momentum=0.9)
    return train_step(optimizer, lambda: trainer(x, target))


def normalized(model, images):
    return torch.stack([(im.float() - model.pixel_mean) / model.pixel_std for im in images])


def check_outputs_match(bench, ours, images, our_inputs, target) -> float:
    """Largest |score difference| of matching detections (sorted by score)."""
    ours.eval()
    bench.eval()
    with torch.no_grad():
        theirs = bench(normalized(ours, images), img_info=target)
        got = ours([{k: v for k, v in d.items() if k != "instances"} for d in our_inputs])
    worst = 0.0
    for t, o in zip(theirs, got):
        t = t[t[:, 4] > 0]
        n = min(len(t), len(o["instances"]))
        worst = max(worst, float((t[:n, 4].cpu() - o["instances"].scores[:n].cpu()).abs().max()))
    return worst


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", type=int, default=0, help="D<variant> (0..7)")
    parser.add_argument("--size", type=int, default=512, help="square input size (multiple of 128)")
    add_timing_args(parser)
    parser.add_argument("--profile", action="store_true", help="print the top ops of each step")
    parser.add_argument("--effdet-loader-labels", action="store_true",
                        help="give effdet's train step precomputed anchor labels (as its loader)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[],
                        help="config overrides for our model, KEY VALUE pairs")
    args = parser.parse_args(argv)
    if args.size % 128:
        parser.error("--size must be a multiple of 128 (effdet builds its BiFPN for that size)")
    if args.threads:
        torch.set_num_threads(args.threads)
    results = run_efficientdet(args, profile_ops=args.profile,
                               effdet_loader_labels=args.effdet_loader_labels, opts=args.opts)
    if args.json:
        write_json(args.json, {**{k: dict(zip(("effdet", "detector", "ratio"), v))
                                  for k, v in results["rows"].items()},
                               "max_score_diff": results["max_score_diff"]})
    return results


def run_efficientdet(args, *, profile_ops: bool = False, effdet_loader_labels: bool = False,
                     opts=()) -> dict:
    """Time effdet's EfficientDet-D<args.variant> and ours (sizes, batches, iterations from
    ``args``); print the table; return the rows."""
    from effdet.bench import DetBenchPredict, DetBenchTrain

    theirs, ours = build_pair(args.variant, args.size, opts=opts)
    device = torch.device(getattr(args, "device", "cpu"))
    ours.to(device)
    predict = DetBenchPredict(theirs).to(device)
    trainer = DetBenchTrain(theirs, create_labeler=not effdet_loader_labels).to(device)
    batch = max(args.infer_batch, args.train_batch)
    images, our_inputs, target = make_inputs(batch, args.size)
    # effdet gets its batch on the device; our inputs stay on the CPU, as a data loader gives them
    images = [im.to(device) for im in images]
    target = {k: v.to(device) for k, v in target.items()}
    bi, bt = args.infer_batch, args.train_batch
    info = {k: v[:bi] for k, v in target.items() if k in ("img_scale", "img_size")}
    max_score_diff = check_outputs_match(predict, ours, images[:bi], our_inputs[:bi], info)
    print(f"EfficientDet: max |score difference| between implementations: {max_score_diff:.2e}")

    their_x = normalized(ours, images[:bi])
    our_eval_inputs = [{k: v for k, v in d.items() if k != "instances"} for d in our_inputs[:bi]]

    def infer_theirs():
        with torch.no_grad():
            predict(their_x, img_info=info)

    def infer_ours():
        with torch.no_grad():
            ours(our_eval_inputs)

    predict.eval()
    ours.eval()
    if profile_ops:
        profile("effdet inference", infer_theirs)
        profile("detector inference", infer_ours)
    infer_seconds = time_pair(infer_theirs, infer_ours, args.iters, args.warmup)
    amp = {} if not getattr(args, "amp", False) else amp_rows(
        infer_theirs, infer_ours, device=device, batch=bi,
        ref_fp32_ms=infer_seconds[0] * 1000 / bi, iters=args.iters, warmup=args.warmup)

    their_train_x = normalized(ours, images[:bt])
    train_target = {k: v[:bt] for k, v in target.items()}
    if effdet_loader_labels:
        from effdet.anchors import AnchorLabeler

        labeler = AnchorLabeler(trainer.anchors, NUM_CLASSES, match_threshold=0.5)
        cls_targets, box_targets, num_positives = labeler.batch_label_anchors(
            train_target["bbox"], train_target["cls"])
        for level, (c, b) in enumerate(zip(cls_targets, box_targets)):
            train_target[f"label_cls_{level}"] = c
            train_target[f"label_bbox_{level}"] = b
        train_target["label_num_positives"] = num_positives
    opt_theirs = torch.optim.SGD(trainer.parameters(), lr=1e-6, momentum=0.9)
    opt_ours = torch.optim.SGD(ours.parameters(), lr=1e-6, momentum=0.9)
    step_theirs = train_step(opt_theirs, lambda: trainer(their_train_x, train_target))
    step_ours = train_step(opt_ours, lambda: ours(our_inputs[:bt]))
    trainer.train()
    ours.train()
    if profile_ops:
        profile("effdet training step", step_theirs)
        profile("detector training step", step_ours)
    train_seconds = time_pair(step_theirs, step_ours, args.iters, args.warmup)

    rows = speed_rows(infer_seconds, bi, train_seconds, bt)
    memory = None if getattr(args, "no_memory", False) or device.type != "cpu" else pair_peak_memory(
        "benchmark_effdet", theirs, ours, size=args.size, infer_batch=bi, train_batch=bt,
        threads=torch.get_num_threads(), variant=args.variant, opts=list(opts))
    rows.update(detail_rows((phase_ms(step_theirs, args.iters), phase_ms(step_ours, args.iters)),
                            inference_macs(ours, args.size, args.size),
                            (rows["inference_ms_per_img"][0], rows["inference_ms_per_img"][1]),
                            memory))
    rows.update(amp)
    labels = "effdet labels precomputed" if effdet_loader_labels else "both label in-step"
    print_rows(f"EfficientDet-D{args.variant}, {args.size}x{args.size}, inference batch {bi}, "
               f"train batch {bt} ({labels}), threads={torch.get_num_threads()}, median of "
               f"{args.iters} alternating runs after {args.warmup} warm-up", "effdet", rows)
    return {"rows": rows, "max_score_diff": max_score_diff, "reference": "effdet"}


if __name__ == "__main__":
    main()
