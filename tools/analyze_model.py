#!/usr/bin/env python
"""FLOPs, parameters, activations and module structure of the model of any config, at a given
input size, with fvcore.

    python tools/analyze_model.py --config-file configs/retinanet/retinanet_R_50_FPN_1x.yaml \
        --tasks flop parameter --size 512 512
    python tools/analyze_model.py --config-file configs/demo/retinanet_tiny_shapes.yaml \
        --tasks flop parameter activation structure --size 128 128 MODEL.DEVICE cpu

The model runs in eval mode (inference, postprocessing included) on one random image of exactly
--size H W: the config's test-time resize is not applied, the model only pads to its size
divisibility. FLOPs are fvcore's: one fused multiply-add counts as ONE flop (so the numbers are
multiply-adds; twice as many floating-point operations). Element-wise and indexing ops are not
counted; other ops fvcore has no formula for are listed once, with how often they ran.
Parameters use fvcore's parameter_count_table; activations fvcore's ActivationCountAnalysis
(output elements of convolutions and matmuls). Weights are random (parameter counts and FLOPs
do not depend on them; the postprocessing's share may).
"""
import argparse
import logging
import sys
import warnings
from collections import Counter
from typing import Dict, Sequence, Tuple

import torch
from torch import nn

with warnings.catch_warnings():
    # fvcore.nn scripts its focal loss on import, which current torch flags as deprecated
    warnings.filterwarnings("ignore", category=FutureWarning)
    from fvcore.nn import (
        ActivationCountAnalysis,
        FlopCountAnalysis,
        parameter_count,
        parameter_count_table,
    )

from detector.config import get_cfg
from detector.engine.cli import CommandLineParser
from detector.modeling import build_model

TASKS = ("flop", "parameter", "activation", "structure")
# fvcore counts convolutions, matmuls, norms and upsampling; these ops are free by its convention
# (element-wise, comparisons, indexing, reductions) and would otherwise be reported as unsupported
IGNORED_OPS = (
    "aten::add", "aten::add_", "aten::sub", "aten::sub_", "aten::mul", "aten::mul_", "aten::div",
    "aten::div_", "aten::rsub", "aten::neg", "aten::exp", "aten::log", "aten::sqrt",
    "aten::rsqrt", "aten::pow", "aten::abs", "aten::clamp", "aten::clamp_", "aten::clamp_min",
    "aten::clamp_max", "aten::sigmoid", "aten::sigmoid_", "aten::relu", "aten::relu_",
    "aten::silu", "aten::silu_", "aten::gelu", "aten::softmax", "aten::log_softmax",
    "aten::max", "aten::min", "aten::maximum", "aten::minimum", "aten::max_pool2d",
    "aten::sum", "aten::mean", "aten::argmax", "aten::topk", "aten::sort", "aten::argsort",
    "aten::gt", "aten::ge", "aten::lt", "aten::le", "aten::eq", "aten::ne", "aten::where",
    "aten::nonzero", "aten::index", "aten::index_put_", "aten::gather", "aten::scatter",
    "aten::constant_pad_nd", "aten::pad", "aten::floor_divide", "aten::remainder",
    "aten::repeat", "aten::repeat_interleave", "aten::round", "aten::floor", "aten::ceil",
    "aten::__and__", "aten::__or__", "aten::bitwise_not", "aten::logical_and", "aten::all",
    "aten::any", "aten::cumsum", "aten::masked_fill", "aten::masked_fill_", "aten::fill_",
    "aten::zero_", "aten::copy_", "aten::sign", "aten::hardtanh", "aten::hardswish",
    "aten::leaky_relu", "aten::tanh", "aten::reciprocal", "aten::square",
    "torchvision::nms", "aten::batched_nms",
)


class TensorOutputs(nn.Module):
    """The detector as a function of one image tensor returning only tensors (boxes, scores,
    classes and masks if any), which fvcore's tracer needs; the image's original size is its
    own, so no rescaling runs."""

    def __init__(self, model: nn.Module, height: int, width: int):
        super().__init__()
        self.model = model
        self.height, self.width = int(height), int(width)

    def forward(self, image: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        outputs = self.model([{"image": image, "height": self.height, "width": self.width}])
        instances = outputs[0]["instances"]
        tensors = [instances.pred_boxes.tensor, instances.scores, instances.pred_classes]
        if instances.has("pred_masks"):
            tensors.append(instances.pred_masks)
        return tuple(tensors)


def setup_cfg(config_file: str, opts: Sequence[str]):
    cfg = get_cfg()
    if config_file:
        cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts))
    cfg.freeze()
    return cfg


def build_eval_model(cfg) -> nn.Module:
    """The config's model with its random initialization, in eval mode."""
    model = build_model(cfg)
    model.eval()
    return model


def example_image(model: nn.Module, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """A random uint8 (3, H, W) image on the model's device."""
    g = torch.Generator().manual_seed(seed)
    image = torch.randint(0, 256, (3, int(height), int(width)), generator=g, dtype=torch.uint8)
    return image.to(model.device)


def _by_part(analysis, model: nn.Module) -> Dict[str, int]:
    """Totals of the model's top-level children (backbone, neck, head, proposal_generator,
    roi_heads ...), plus what runs in the model itself ("other": postprocessing, anchors)."""
    counts = analysis.by_module()
    parts = {name: int(counts.get(f"model.{name}", 0)) for name, _ in model.named_children()}
    parts["other"] = int(analysis.total()) - sum(parts.values())
    return parts


def _prepared(analysis):
    for op in IGNORED_OPS:
        analysis.set_op_handle(op, None)
    # summarised once by the caller instead of fvcore's per-run warnings
    return analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)


def _traced_total(analysis) -> int:
    """Trace once (the other queries reuse the trace) and return the total."""
    with torch.no_grad(), warnings.catch_warnings():
        # torchvision's batched_nms scripts itself when traced, which torch flags as deprecated
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*torch.jit.script")
        return int(analysis.total())


def flop_count(model: nn.Module, height: int, width: int) -> dict:
    """fvcore FLOPs (one fused multiply-add = one flop) of one eval forward on an H x W image:
    ``{"total": int, "by_part": {child: int, "other": int}, "by_operator": Counter,
    "unsupported": Counter of op name -> times run}``."""
    wrapper = TensorOutputs(model, height, width).eval()
    analysis = _prepared(FlopCountAnalysis(wrapper, (example_image(model, height, width),)))
    total = _traced_total(analysis)
    return {"total": total, "by_part": _by_part(analysis, model),
            "by_operator": Counter(analysis.by_operator()),
            "unsupported": Counter(analysis.unsupported_ops())}


def activation_count(model: nn.Module, height: int, width: int) -> dict:
    """fvcore activation counts (output elements of convolutions and matmuls) of one eval
    forward: ``{"total": int, "by_part": {...}}``."""
    wrapper = TensorOutputs(model, height, width).eval()
    analysis = _prepared(ActivationCountAnalysis(wrapper, (example_image(model, height, width),)))
    total = _traced_total(analysis)
    return {"total": total, "by_part": _by_part(analysis, model)}


def parameter_counts(model: nn.Module) -> dict:
    """``{"total": int, "trainable": int, "by_part": {child: int}}`` (fvcore parameter_count:
    every parameter, frozen ones included)."""
    counts = parameter_count(model)
    parts = {name: int(counts.get(name, 0)) for name, _ in model.named_children()}
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"total": int(counts[""]), "trainable": int(trainable), "by_part": parts}


def _human(n: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3f}{unit}"
    return str(int(n))


def _print_parts(title: str, total: int, parts: Dict[str, int]) -> None:
    print(title)
    print(f"  {'part':<22}{'count':>14}{'share':>9}")
    for name, value in parts.items():
        share = f"{100.0 * value / total:.1f}%" if total else "-"
        print(f"  {name:<22}{_human(value):>14}{share:>9}")
    print(f"  {'total':<22}{_human(total):>14}")


def build_parser() -> argparse.ArgumentParser:
    parser = CommandLineParser(prog="analyze_model.py", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", default="", metavar="FILE", help="path to config file")
    # no argparse choices: the KEY VALUE overrides may directly follow the task names
    parser.add_argument("--tasks", nargs="+", default=["flop", "parameter"], metavar="TASK",
                        help=f"what to report, some of {', '.join(TASKS)}")
    parser.add_argument("--size", nargs=2, type=int, default=(512, 512), metavar=("H", "W"),
                        help="input image height and width (default 512 512)")
    parser.add_argument("opts", default=None, nargs=argparse.REMAINDER,
                        help="config overrides as KEY VALUE pairs")
    return parser


def _split_tasks(parser, tokens, opts):
    """(tasks, overrides): the leading task names of --tasks, and what follows them (config
    overrides that argparse gave to --tasks) put before the other overrides."""
    tasks = []
    for i, token in enumerate(tokens):
        if token in TASKS:
            tasks.append(token)
            continue
        if not tasks or token == token.lower():
            parser.error(f"argument --tasks: invalid task {token!r} (choose from "
                         f"{', '.join(TASKS)})")
        return tasks, list(tokens[i:]) + list(opts)
    return tasks, list(opts)


def main(argv=None) -> dict:
    """Print the requested analyses; return them as a dict keyed by task."""
    parser = build_parser()
    args = parser.parse_args(argv)
    tasks, args.opts = _split_tasks(parser, args.tasks, args.opts or [])
    height, width = args.size
    if height <= 0 or width <= 0:
        parser.error(f"--size must be positive, got {height} {width}")
    try:
        cfg = setup_cfg(args.config_file, args.opts or [])
    except (ValueError, KeyError, OSError) as err:
        parser.exit(1, f"analyze_model.py: error: {' '.join(str(err).split())}\n")
    # fvcore's tracer logs each skipped op; the summary below replaces those lines
    logging.getLogger("fvcore").setLevel(logging.ERROR)
    model = build_eval_model(cfg)
    name = f"{cfg.MODEL.META_ARCHITECTURE} ({args.config_file or 'defaults'})"
    results = {}
    for task in dict.fromkeys(tasks):  # each once, in the order given
        if task == "flop":
            res = results["flop"] = flop_count(model, height, width)
            _print_parts(f"FLOPs of {name} at {height}x{width}, eval mode; one fused multiply-add "
                         f"counts as one flop: {res['total']:,} ({_human(res['total'])})",
                         res["total"], res["by_part"])
            top = ", ".join(f"{op.split('::')[-1]} {_human(n)}"
                            for op, n in res["by_operator"].most_common(6))
            print(f"  by operator: {top}")
            if res["unsupported"]:
                ops = ", ".join(f"{op} x{n}" for op, n in sorted(res["unsupported"].items()))
                print(f"  not counted ({len(res['unsupported'])} op type(s) without a flop "
                      f"formula): {ops}")
        elif task == "parameter":
            res = results["parameter"] = parameter_counts(model)
            _print_parts(f"Parameters of {name}: {res['total']:,} ({_human(res['total'])}), "
                         f"{res['trainable']:,} trainable", res["total"], res["by_part"])
            print(parameter_count_table(model, max_depth=2))
        elif task == "activation":
            res = results["activation"] = activation_count(model, height, width)
            _print_parts(f"Activations of {name} at {height}x{width}, eval mode: "
                         f"{res['total']:,} ({_human(res['total'])})",
                         res["total"], res["by_part"])
        else:
            results["structure"] = str(model)
            print(f"Structure of {name}:")
            print(results["structure"])
        sys.stdout.flush()
    return results


if __name__ == "__main__":
    main()
