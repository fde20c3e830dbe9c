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

Also reported, for both sides: the training step's forward and backward ms (the step is forward
+ backward + optimizer step), the inference FLOP rate (2 x fvcore multiply-adds per image /
inference seconds per image, GFLOP/s) and the peak memory of inference and of training, each
case measured in one fresh process (CPU: peak resident set size, VmHWM, which includes the
Python and torch runtime; CUDA: max_memory_allocated); --no-memory skips those processes.

Any config alone (no reference; e.g. the CPU inference-time column of the pyramid table):

    python tools/benchmark.py --config-file configs/pyramid/retinanet_P2-P6.yaml --size 512 \
        --threads 2 [KEY VALUE ...]
"""
import argparse
import os

import torch

from benchmark_common import (
    add_timing_args,
    amp_fn,
    amp_rows,
    conv_peak_gflops,
    detail_rows,
    freeze_like_released_detection_weights,
    inference_macs,
    infer_fn,
    load_weights_for_case,
    pair_peak_memory,
    peak_memory_mb,
    phase_ms,
    print_breakdown,
    print_rows,
    speed_rows,
    stage_breakdown,
    time_one,
    time_pair,
    torchvision_style_case,
    train_step,
    without_instances,
    write_json,
)
from detector.checkpoint.torchvision_retinanet import convert_torchvision_retinanet_state_dict  # noqa
from detector.config import get_cfg
from detector.modeling import build_model
from detector.structures import BitMasks, Boxes, Instances

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TV_CONFIG = os.path.join(ROOT, "configs", "retinanet", "retinanet_R_50_FPN_torchvision.yaml")
MODELS = ("retinanet", "maskrcnn", "efficientdet")


def _tv_config(num_classes):
    cfg = get_cfg()
    cfg.merge_from_file(TV_CONFIG)
    cfg.merge_from_list(["MODEL.RETINANET.NUM_CLASSES", str(num_classes)])
    return cfg


def build_reference(size, num_classes=91, seed=0, width=None):
    """torchvision's retinanet_resnet50_fpn with random weights, set up as it is for its released
    COCO weights (FrozenBN with eps 0, stem and res2 frozen), which is what our torchvision config
    mirrors; both normalise 0-255 pixels alike. Its transform keeps ``size`` x ``width`` images
    at their size (it still resamples them, as it does every input)."""
    from torchvision.models.detection import retinanet_resnet50_fpn

    cfg = _tv_config(num_classes)
    torch.manual_seed(seed)
    width = width or size
    tv = retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=num_classes,
                                min_size=min(size, width), max_size=max(size, width),
                                image_mean=cfg.MODEL.PIXEL_MEAN, image_std=cfg.MODEL.PIXEL_STD)
    freeze_like_released_detection_weights(tv)
    return tv


def build_pair(size, num_classes=91, seed=0, width=None):
    """torchvision's retinanet_resnet50_fpn with random weights and ours holding the same."""
    tv = build_reference(size, num_classes, seed, width)
    ours = build_model(_tv_config(num_classes))
    ours.load_state_dict(convert_torchvision_retinanet_state_dict(tv.state_dict()))
    return tv, ours


def memory_case(side, mode, size, batch, weights, width=None):
    """One side alone ("reference" or "detector") holding the weights saved at ``weights``,
    and the function running its ``mode`` ("inference" or "train") on the benchmark's input:
    what ``benchmark_common.peak_memory_mb`` measures in a fresh process."""
    model = (build_reference(size, width=width) if side == "reference"
             else build_model(_tv_config(91)))
    load_weights_for_case(model, weights)
    return torchvision_style_case(model, side, mode, *make_inputs(batch, size, width=width))


def make_inputs(batch, size, seed=1, width=None, device="cpu"):
    """(torchvision images and targets on ``device``, our inputs) of ``batch`` random
    ``size`` x ``width`` images with four boxes each; our images stay on the CPU, where a data
    loader hands them over (moving them is part of our model's time, as in training)."""
    height, width = size, width or size
    g = torch.Generator().manual_seed(seed)
    images = [torch.randint(0, 256, (3, height, width), generator=g).float()
              for _ in range(batch)]
    boxes = []
    for _ in range(batch):
        xy = torch.rand(4, 2, generator=g) * min(height, width) * 0.6
        wh = 16 + torch.rand(4, 2, generator=g) * min(height, width) * 0.35
        boxes.append(torch.cat([xy, xy + wh], 1))
    labels = [torch.randint(1, 91, (4,), generator=g) for _ in range(batch)]
    tv_targets = [{"boxes": b.to(device), "labels": lab.to(device)}
                  for b, lab in zip(boxes, labels)]
    ours = []
    for img, b, lab in zip(images, boxes, labels):
        inst = Instances((height, width), gt_boxes=Boxes(b.clone()), gt_classes=lab.clone())
        ours.append({"image": img.clone(), "height": height, "width": width, "instances": inst})
    return [img.to(device) for img in images], tv_targets, ours


def check_outputs_match(tv, ours, images, our_inputs):
    tv.eval()
    ours.eval()
    with torch.no_grad():
        tv_out = tv(images)
        our_out = ours([{k: v for k, v in d.items() if k != "instances"} for d in our_inputs])
    worst = 0.0
    for t, o in zip(tv_out, our_out):
        inst = o["instances"].to(torch.device("cpu"))
        n = min(len(t["scores"]), len(inst))
        if n:
            worst = max(worst, (t["scores"][:n].cpu() - inst.scores[:n]).abs().max().item())
    return worst


def inference_extras(args, tv_infer, our_infer, tv_batch_infer, our_batch_infer, macs,
                     fp32_ms) -> dict:
    """The rows --throughput-batch and --amp add: img/s at the throughput batch, and with --amp
    both sides under the same autocast (bf16 on CPU, fp16 on CUDA) and ours under autocast
    against the reference in fp32. ``fp32_ms``: (reference, ours) fp32 ms per image."""
    rows = {}
    if args.throughput_batch:
        b = args.throughput_batch
        seconds = time_pair(tv_batch_infer, our_batch_infer, args.iters, args.warmup)
        rows[f"inference_img_per_s_batch{b}"] = (b / seconds[0], b / seconds[1],
                                                 seconds[0] / seconds[1])
    if args.amp:
        rows.update(amp_rows(tv_infer, our_infer, device=args.device, batch=args.infer_batch,
                             ref_fp32_ms=fp32_ms[0], iters=args.iters, warmup=args.warmup,
                             macs=macs))
    return rows


def print_peak(args, rows, macs, network_ms=None) -> dict:
    """--peak: this machine's conv peak (fp32; bf16/fp16 with --amp) measured now, and the
    inference FLOP rates as fractions of it."""
    dtypes = [torch.float32] + ([torch.bfloat16 if args.device == "cpu" else torch.float16]
                                if args.amp else [])
    peaks = {str(d).replace("torch.", ""): conv_peak_gflops(args.device, d) for d in dtypes}
    print("conv peak (256-ch 3x3 conv, 64x64, batch 2, channels-last): "
          + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in peaks.items()))
    fp32 = peaks["float32"]
    ref_rate, our_rate, _ = rows["inference_GFLOP_per_s"]
    print(f"inference (postprocessing included): ours {our_rate:.0f} GFLOP/s = "
          f"{100 * our_rate / fp32:.0f}% of the fp32 peak, reference {100 * ref_rate / fp32:.0f}%")
    if network_ms:
        net_rate = 2.0 * macs / (network_ms / 1000) / 1e9
        print(f"network alone (backbone + neck + head, {network_ms:.1f} ms): {net_rate:.0f} "
              f"GFLOP/s = {100 * net_rate / fp32:.0f}% of the fp32 peak")
        peaks["network_fraction_of_fp32_peak"] = net_rate / fp32
    print("  (rates count a direct convolution's flops; our Winograd 3x3 convs, "
          "MODEL.WINOGRAD_CONV, do fewer, so ours can pass the direct conv's peak)")
    if "inference_GFLOP_per_s_amp" in rows and len(peaks) > 1:
        low = list(peaks.values())[1]
        ref_amp, our_amp, _ = rows["inference_GFLOP_per_s_amp"]
        print(f"inference under autocast: ours {100 * our_amp / low:.0f}% of the "
              f"{dtypes[1]} peak, reference {100 * ref_amp / low:.0f}%")
    peaks["inference_fraction_of_fp32_peak"] = our_rate / fp32
    return peaks


def print_peak_alone(args, rows, macs, breakdown) -> None:
    """--peak with --config-file: the machine's fp32 conv peak and our rates against it."""
    peak = conv_peak_gflops(args.device)
    print(f"conv peak (256-ch 3x3 conv, 64x64, batch 2, channels-last): fp32 {peak:.0f} "
          f"GFLOP/s; inference {100 * rows['inference_GFLOP_per_s'] / peak:.0f}% of it")
    if breakdown is not None:
        rate = 2.0 * macs / (breakdown["inference"]["network"] / 1000) / 1e9
        print(f"network alone: {rate:.0f} GFLOP/s = {100 * rate / peak:.0f}% of the peak")


def run_retinanet(args) -> dict:
    """Time torchvision's RetinaNet and ours; print the table; return the rows."""
    height, width = args.size, args.width or args.size
    tv, ours = build_pair(height, width=width)
    tv.to(args.device)
    ours.to(args.device)
    bi, bt = args.infer_batch, args.train_batch
    count = max(bi, bt, args.throughput_batch)
    images, tv_targets, our_inputs = make_inputs(count, height, width=width, device=args.device)
    max_score_diff = check_outputs_match(tv, ours, images[:bi], our_inputs[:bi])
    print(f"RetinaNet: max |score difference| between implementations: {max_score_diff:.2e}")

    tv.eval()
    ours.eval()
    our_eval_inputs = without_instances(our_inputs)
    tv_infer, our_infer = infer_fn(tv, images[:bi]), infer_fn(ours, our_eval_inputs[:bi])
    infer_seconds = time_pair(tv_infer, our_infer, args.iters, args.warmup)
    macs = inference_macs(ours, height, width)
    b = args.throughput_batch
    extras = inference_extras(args, tv_infer, our_infer, infer_fn(tv, images[:b]),
                              infer_fn(ours, our_eval_inputs[:b]), macs,
                              [s * 1000 / bi for s in infer_seconds])
    breakdown = {"inference": stage_breakdown(our_infer)} if args.breakdown else None

    opt_tv = torch.optim.SGD([p for p in tv.parameters() if p.requires_grad], lr=1e-6)
    opt_ours = torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=1e-6)
    tv.train()
    ours.train()
    step_tv = train_step(opt_tv, lambda: tv(images[:bt], tv_targets[:bt]))
    step_ours = train_step(opt_ours, lambda: ours(our_inputs[:bt]))
    train_seconds = time_pair(step_tv, step_ours, args.iters, args.warmup)
    if breakdown is not None:
        breakdown["train step"] = stage_breakdown(step_ours)

    rows = speed_rows(infer_seconds, bi, train_seconds, bt)
    memory = None if args.no_memory or args.device != "cpu" else pair_peak_memory(
        "benchmark", tv, ours, size=height, width=width, infer_batch=bi, train_batch=bt,
        threads=torch.get_num_threads())
    rows.update(detail_rows((phase_ms(step_tv, args.iters), phase_ms(step_ours, args.iters)),
                            macs, (rows["inference_ms_per_img"][0],
                                   rows["inference_ms_per_img"][1]), memory))
    rows.update(extras)
    print_rows(f"RetinaNet R-50-FPN, {height}x{width}, {args.device}, inference batch {bi}, train "
               f"batch {bt}, threads={torch.get_num_threads()}, median of {args.iters} "
               f"alternating runs after {args.warmup} warm-up", "torchvision", rows)
    result = {"rows": rows, "max_score_diff": max_score_diff, "reference": "torchvision"}
    if breakdown is not None:
        print_breakdown("Where our time goes (torch.profiler, median of 3 profiled runs)",
                        breakdown)
        result["breakdown"] = breakdown
    if args.peak:
        result["peak"] = print_peak(args, rows, macs,
                                    breakdown["inference"]["network"] if breakdown else None)
    return result


def config_model(config_file, opts=(), seed=0):
    """(cfg, model with seeded random weights) of any config."""
    cfg = get_cfg()
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts))
    cfg.freeze()
    torch.manual_seed(seed)
    return cfg, build_model(cfg)


def config_inputs(model, batch, size, mask_on=False, seed=1, width=None):
    """Training inputs for any detector: uint8 ``size`` x ``width`` images, four boxes per image
    with classes in range and, for a mask head, masks filling the boxes."""
    height, width = size, width or size
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(batch):
        image = torch.randint(0, 256, (3, height, width), generator=g, dtype=torch.uint8)
        xy = torch.rand(4, 2, generator=g) * min(height, width) * 0.6
        wh = 8 + torch.rand(4, 2, generator=g) * min(height, width) * 0.35
        boxes = torch.cat([xy, xy + wh], 1).clamp(max=min(height, width) - 1).floor()
        classes = torch.randint(0, int(model.num_classes), (4,), generator=g)
        inst = Instances((height, width), gt_boxes=Boxes(boxes), gt_classes=classes)
        if mask_on:
            masks = torch.zeros(4, height, width, dtype=torch.bool)
            for k, (x1, y1, x2, y2) in enumerate(boxes.int().tolist()):
                masks[k, y1:y2, x1:x2] = True
            inst.gt_masks = BitMasks(masks)
        out.append({"image": image, "height": height, "width": width, "image_id": i,
                    "instances": inst})
    return out


def config_memory_case(config_file, opts, mode, size, batch, width=None):
    """The function running ``mode`` of the config's model (seeded random weights), for
    ``benchmark_common.peak_memory_mb``."""
    cfg, model = config_model(config_file, opts)
    inputs = config_inputs(model, batch, size, cfg.MODEL.MASK_ON, width=width)
    if mode == "inference":
        return infer_fn(model.eval(), without_instances(inputs))
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    return train_step(optimizer, lambda: model(inputs))


def run_config(args) -> dict:
    """Time the model of --config-file alone at --size: inference ms/img, training img/s with
    forward and backward ms, inference GFLOP/s and peak memory; print them; return the rows
    {metric: value}."""
    cfg, model = config_model(args.config_file, args.opts)
    model.to(args.device)
    height, width = args.size, args.width or args.size
    bi, bt = args.infer_batch, args.train_batch
    inputs = config_inputs(model, max(bi, bt), height, cfg.MODEL.MASK_ON, width=width)
    infer = infer_fn(model.eval(), without_instances(inputs[:bi]))
    infer_seconds = time_one(infer, args.iters, args.warmup)
    macs = inference_macs(model, height, width)
    infer_ms = infer_seconds * 1000 / bi
    rows = {"inference_ms_per_img": infer_ms,
            "inference_GFLOP_per_s": 2.0 * macs / (infer_ms / 1000) / 1e9}
    if args.amp:
        amp_ms = time_one(amp_fn(infer, torch.device(args.device)), args.iters,
                          args.warmup) * 1000 / bi
        rows.update({"inference_ms_per_img_amp": amp_ms,
                     "inference_GFLOP_per_s_amp": 2.0 * macs / (amp_ms / 1000) / 1e9})
    breakdown = {"inference": stage_breakdown(infer)} if args.breakdown else None
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    step = train_step(optimizer, lambda: model(inputs[:bt]))
    train_seconds = time_one(step, args.iters, args.warmup)
    forward_ms, backward_ms = phase_ms(step, args.iters)
    rows.update({"train_img_per_s": bt / train_seconds, "train_forward_ms": forward_ms,
                 "train_backward_ms": backward_ms})
    if breakdown is not None:
        breakdown["train step"] = stage_breakdown(step)
    if not args.no_memory and args.device == "cpu":
        for mode, batch in (("inference", bi), ("train", bt)):
            rows[f"peak_MB_{mode}"] = peak_memory_mb(
                "benchmark", "config_memory_case",
                dict(config_file=args.config_file, opts=list(args.opts), mode=mode,
                     size=height, width=width, batch=batch), threads=torch.get_num_threads())
    print(f"{cfg.MODEL.META_ARCHITECTURE} ({args.config_file}), {height}x{width}, {args.device}, "
          f"inference batch {bi}, train batch {bt}, threads={torch.get_num_threads()}, median of "
          f"{args.iters} runs after {args.warmup} warm-up")
    print(f"{'metric':<26}{'detector':>14}")
    for name, value in rows.items():
        print(f"{name:<26}{value:>14.2f}")
    if breakdown is not None:
        print_breakdown("Where the time goes (torch.profiler, median of 3 profiled runs)",
                        breakdown)
    if args.peak:
        print_peak_alone(args, rows, macs, breakdown)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", nargs="+", choices=MODELS + ("all",), default=["all"],
                        help="one or more models, or all")
    parser.add_argument("--size", type=int, default=512,
                        help="input height (multiple of 128 with EfficientDet, else of 32)")
    parser.add_argument("--width", type=int, default=0,
                        help="input width of RetinaNet and --config-file (default: --size)")
    parser.add_argument("--throughput-batch", type=int, default=8,
                        help="RetinaNet: also time inference at this batch (img/s); 0 = skip")
    parser.add_argument("--amp", action="store_true",
                        help="RetinaNet, EfficientDet: also time inference under autocast (bf16 "
                             "on CPU, fp16 on CUDA) for both sides, as TEST.AMP.ENABLED")
    parser.add_argument("--peak", action="store_true",
                        help="measure this machine's conv peak now and report the inference "
                             "rate as a fraction of it")
    parser.add_argument("--breakdown", action="store_true",
                        help="RetinaNet, EfficientDet, --config-file: our time per step "
                             "(preprocess, network, anchors, matching, loss, postprocess)")
    parser.add_argument("--variant", type=int, default=0, help="EfficientDet-D<variant> (0..7)")
    parser.add_argument("--config-file", default="", metavar="FILE",
                        help="time this config's model alone (no reference, --model ignored)")
    add_timing_args(parser)
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[],
                        help="config overrides for --config-file, KEY VALUE pairs")
    args = parser.parse_args(argv)
    if args.opts and not args.config_file:
        parser.error(f"config overrides {args.opts[:2]} need --config-file")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device (torch.cuda.is_available() is False)")
    if args.config_file:
        if args.size % 32 or (args.width or args.size) % 32:
            parser.error("--size and --width must be multiples of 32")
        rows = run_config(args)
        if args.json:
            write_json(args.json, {args.config_file: rows})
        return {args.config_file: rows}
    models = MODELS if "all" in args.model else args.model
    if args.size % 128 and "efficientdet" in models:
        parser.error("--size must be a multiple of 128 (effdet builds its BiFPN for that size)")
    if args.size % 32 or (args.width or args.size) % 32:
        parser.error("--size and --width must be multiples of 32")
    if args.width and args.width != args.size and set(models) != {"retinanet"}:
        parser.error("--width is for RetinaNet (and --config-file) only")

    results = {}
    if "retinanet" in models:
        results["RetinaNet R-50-FPN"] = run_retinanet(args)
    if "maskrcnn" in models:
        from benchmark_maskrcnn import run_maskrcnn

        results["Mask R-CNN R-50-FPN"] = run_maskrcnn(args)
    if "efficientdet" in models:
        from benchmark_effdet import run_efficientdet

        results[f"EfficientDet-D{args.variant}"] = run_efficientdet(args)
    print(f"\nsummary: ratio ours/reference speed (>1: ours faster), {args.size}x{args.width or args.size}")
    print(f"{'model':<22}{'reference':>13}{'inference':>11}{'train':>9}{'max score diff':>16}"
          f"{'max box diff':>14}{'min mask IoU':>14}{'forward':>9}{'backward':>10}"
          f"{'peak mem train':>16}")
    for name, res in results.items():
        rows, outputs = res["rows"], res.get("outputs", {})
        box_diff, mask_iou = (f"{outputs[k]:{f}}" if k in outputs else "-"
                              for k, f in (("max_box_diff", ".1e"), ("min_mask_iou", ".4f")))
        memory = f"{rows['peak_MB_train'][2]:.2f}" if "peak_MB_train" in rows else "-"
        print(f"{name:<22}{res['reference']:>13}{rows['inference_ms_per_img'][2]:>11.2f}"
              f"{rows['train_img_per_s'][2]:>9.2f}{res['max_score_diff']:>16.1e}{box_diff:>14}"
              f"{mask_iou:>14}{rows['train_forward_ms'][2]:>9.2f}"
              f"{rows['train_backward_ms'][2]:>10.2f}{memory:>16}")
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
