"""Timing, reporting, command-line options and reference-model set-up shared by tools/benchmark.py,
tools/benchmark_effdet.py and tools/benchmark_maskrcnn.py (and the tests that build model pairs)."""
import argparse
import json
import statistics
import time
from typing import Callable, Dict, Tuple

import torch
from torch import nn

from detector.layers import convert_frozen_batchnorm

__all__ = ["time_pair", "train_step", "profile", "speed_rows", "print_rows", "write_json",
           "add_timing_args", "randomize_batchnorms", "freeze_like_released_detection_weights"]

Rows = Dict[str, Tuple[float, float, float]]


def time_pair(fn_a: Callable, fn_b: Callable, iters: int, warmup: int) -> Tuple[float, float]:
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


def train_step(optimizer: torch.optim.Optimizer, forward: Callable[[], Dict]) -> Callable:
    """A function doing one optimizer step on the summed losses of ``forward()`` (or its
    "loss" entry, as effdet's bench returns)."""
    def run():
        losses = forward()
        total = losses["loss"] if "loss" in losses else sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
    return run


def profile(name: str, fn: Callable, rows: int = 25) -> None:
    """Print the ops of one call of ``fn`` that take the most CPU time."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    fn()
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    print(f"=== {name}")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def speed_rows(infer_seconds: Tuple[float, float], infer_batch: int,
               train_seconds: Tuple[float, float], train_batch: int) -> Rows:
    """{"inference_ms_per_img", "train_img_per_s"} -> (reference, ours, ratio ours-faster > 1)
    from the (reference, ours) seconds per batch."""
    (ref_inf, our_inf), (ref_train, our_train) = infer_seconds, train_seconds
    return {
        "inference_ms_per_img": (ref_inf * 1000 / infer_batch, our_inf * 1000 / infer_batch,
                                 ref_inf / our_inf),
        "train_img_per_s": (train_batch / ref_train, train_batch / our_train,
                            ref_train / our_train),
    }


def print_rows(title: str, reference: str, rows: Rows) -> None:
    print(title)
    print(f"{'metric':<24}{reference:>14}{'detector':>14}{'ratio (ours faster >1)':>26}")
    for name, (a, b, r) in rows.items():
        print(f"{name:<24}{a:>14.2f}{b:>14.2f}{r:>26.3f}")


def write_json(path: str, results: Dict) -> None:
    with open(path, "w") as f:
        json.dump(results, f, indent=1)


def add_timing_args(parser: argparse.ArgumentParser) -> None:
    """The timing options every benchmark tool takes."""
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--infer-batch", type=int, default=1)
    parser.add_argument("--train-batch", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    parser.add_argument("--json", default="", help="write the figures to this file")


def randomize_batchnorms(modules, generator: torch.Generator) -> None:
    """Gives every nn.BatchNorm2d among ``modules`` a weight in [0.75, 1.25), a bias and running
    mean of scale 0.1, and a running variance in [0.75, 1.25), drawn from ``generator``, so a
    converter that drops or swaps a norm tensor changes the outputs."""
    with torch.no_grad():
        for m in modules:
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=generator) * 0.5 + 0.75)
                m.bias.copy_(torch.randn(m.bias.shape, generator=generator) * 0.1)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=generator) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=generator) * 0.5
                                    + 0.75)


def freeze_like_released_detection_weights(tv_model: nn.Module) -> None:
    """A torchvision ResNet-FPN detector set up as for its released COCO weights, which our
    torchvision configs mirror: FrozenBatchNorm with eps 0 in the backbone body, stem and res2
    frozen (``trainable_backbone_layers=3``)."""
    from torchvision.models.detection._utils import overwrite_eps

    tv_model.backbone.body = convert_frozen_batchnorm(tv_model.backbone.body)
    overwrite_eps(tv_model, 0.0)
    for name, param in tv_model.backbone.body.named_parameters():
        if name.startswith(("conv1.", "layer1.")):
            param.requires_grad_(False)
