#!/usr/bin/env python
"""Export a RetinaNet, EfficientDet or Mask R-CNN to ONNX or torch.export, then check the exported
model against PyTorch on a real image.

    python tools/export_model.py --config-file CFG --format onnx --mode network --output DIR \
        [--image PATH] [--size H W] MODEL.WEIGHTS model_final.pth [KEY VALUE ...]

Modes (input: the normalised, padded (1, 3, H, W) image of a fixed size):
- ``network``: the networks alone, a flat tuple of raw outputs (dense detectors: per-level class
  logits, then per-level box deltas; Mask R-CNN: the pyramid features, then the RPN's per-level
  objectness logits and deltas). Postprocessing stays in Python: the model's own eval forward.
- ``full``: postprocessing inside; a second input ``image_size`` (int64 [h, w], the unpadded
  part) and outputs boxes (D, 4), scores (D,), classes (D,) [, mask probabilities (D, 1, M, M)],
  at network-input scale. Pasting masks into the original image stays in Python.

The check runs the same preprocessed image through PyTorch and through onnxruntime (or the
loaded .pt2 program): max abs / rel difference per output against rtol 1e-3 / atol 1e-4 (boxes:
see :func:`box_tolerance`; network mode: an output beyond it passes if no farther from PyTorch in
float64 than twice PyTorch float32's own error), the detections of both after our postprocessing
(count, classes, boxes, scores, pasted mask probabilities) and the median time of both (one
image, same thread count). A failed check exits with status 1 and one line. Without MODEL.WEIGHTS the model keeps seeded random weights; its BatchNorm statistics are
then measured on the check image (see :func:`calibrate_norm_statistics`).
"""
import argparse
import copy
import glob
import os
import statistics
import sys
import time
import traceback
from contextlib import contextmanager
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch import nn

from detector.checkpoint import CheckpointError
from detector.data import DatasetMapper, generate_shapes_dataset
from detector.data.datasets.synthetic import SHAPES_SPLITS
from detector.engine import DefaultTrainer
from detector.engine.cli import CommandLineParser, setup_cfg
from detector.modeling import build_model
from detector.modeling.meta_arch import GeneralizedRCNN
from detector.modeling.postprocessing import detections_to_outputs
from detector.structures import Boxes, ImageList, Instances

# a sibling module: tools/ is on sys.path when this file runs as a script
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from export_wrappers import export_wrapper, output_names  # noqa: E402

PROG = "export_model.py"
RTOL, ATOL = 1e-3, 1e-4
# detections match as in the torchvision equivalence tests (scores within 1e-4, boxes within
# 1e-3 px), the boxes plus what rtol / atol on the deltas moves them (see box_tolerance)
SCORE_ATOL, BOX_ATOL_PX = 1e-4, 1e-3


class CheckFailed(RuntimeError):
    pass


def build_parser() -> argparse.ArgumentParser:
    parser = CommandLineParser(description="export a detector and check it against PyTorch")
    parser.add_argument("--config-file", default="", metavar="FILE", help="path to config file")
    parser.add_argument("--format", default="onnx", choices=["onnx", "torch_export"])
    parser.add_argument("--mode", default="network", choices=["network", "full"])
    parser.add_argument("--output", default="", help="folder for model.onnx / model.pt2 "
                        "(required)")
    parser.add_argument("--image", default="", help="check image (default: a coco128 image "
                        "under $DETECTOR_DATASETS, else a generated shapes image)")
    parser.add_argument("--size", type=int, nargs=2, metavar=("H", "W"),
                        help="fixed input size (default: the check image's padded size)")
    parser.add_argument("--runs", type=int, default=5, help="timed runs of each runtime")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch's)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the random weights used without MODEL.WEIGHTS")
    parser.add_argument("opts", default=None, nargs=argparse.REMAINDER,
                        help="config overrides as KEY VALUE pairs, e.g. MODEL.WEIGHTS w.pth")
    return parser


# ------------------------------------------------------------------------------------------
# Model, image, weights
# ------------------------------------------------------------------------------------------
def _is_batch_norm(module: nn.Module) -> bool:
    return (isinstance(getattr(module, "running_mean", None), torch.Tensor)
            and isinstance(getattr(module, "running_var", None), torch.Tensor))


def calibrate_norm_statistics(model: nn.Module, forward: Callable[[], object],
                              generator: torch.Generator) -> None:
    """Random affine parameters for every BatchNorm-like layer (BN, FrozenBN) and running
    statistics measured during ``forward()``, layer after layer, as a trained network has them:
    non-trivial per-channel values, and activations of the usual magnitude instead of the
    growth of a random deep ResNet, whose float32 rounding would swamp any tolerance."""
    norms = [m for m in model.modules() if _is_batch_norm(m)]

    def measure(module, inputs):
        x = inputs[0].detach().float()
        module.running_mean.copy_(x.mean(dim=(0, 2, 3)))
        # dead (all-zero) channels get a unit variance
        var = x.var(dim=(0, 2, 3), unbiased=False)
        module.running_var.copy_(torch.where(var > 1e-6, var, torch.ones_like(var)))

    with torch.no_grad():
        for m in norms:
            m.weight.copy_(torch.rand(m.weight.shape, generator=generator) * 0.5 + 0.75)
            m.bias.copy_(torch.randn(m.bias.shape, generator=generator) * 0.1)
        hooks = [m.register_forward_pre_hook(measure) for m in norms]
        try:
            forward()
        finally:
            for h in hooks:
                h.remove()


def load_model(cfg) -> nn.Module:
    """The eval-mode CPU model with MODEL.WEIGHTS loaded as for evaluation (the EMA weights with
    SOLVER.EMA.ENABLED), if given."""
    model = build_model(cfg)
    if cfg.MODEL.WEIGHTS:
        DefaultTrainer.load_for_evaluation(cfg, model)
    return model.eval()


def default_image_path(output_dir: str) -> str:
    """The first coco128 image under $DETECTOR_DATASETS, else the first image of the built-in
    shapes_val split, drawn alone into ``output_dir``."""
    root = os.environ.get("DETECTOR_DATASETS", "")
    images = sorted(glob.glob(os.path.join(root, "coco128", "train2017", "*.jpg"))) if root else []
    if images:
        return images[0]
    folder = os.path.join(output_dir, "shapes_image")
    generate_shapes_dataset(folder, num_images=1, seed=SHAPES_SPLITS["val"][1])
    return os.path.join(folder, "images", "000001.png")


def prepare_input(cfg, model: nn.Module, image_path: str, size) -> Tuple[dict, ImageList]:
    """The model input dict of the image (the test-time resize of the config) and its
    normalised ImageList padded to ``size`` (default: the model's size divisibility)."""
    if not os.path.isfile(image_path):
        raise CheckFailed(f"--image {image_path}: no such file")
    with Image.open(image_path) as im:
        width, height = im.size
    mapper = DatasetMapper(**DatasetMapper.from_config(cfg, is_train=False))
    inputs = mapper({"file_name": image_path, "image_id": 0, "height": height, "width": width})
    images = model.preprocess_image([inputs])
    if size is not None:
        (h, w), (pad_h, pad_w) = images.image_sizes[0], size
        divisor = model.size_divisibility
        if pad_h < h or pad_w < w or pad_h % divisor or pad_w % divisor:
            raise CheckFailed(f"--size {pad_h} {pad_w} must hold the resized {h}x{w} image and be "
                              f"a multiple of the size divisibility {divisor}")
        padded = images.tensor.new_zeros((1, images.tensor.shape[1], pad_h, pad_w))
        padded[..., :h, :w] = images.tensor[..., :h, :w]
        images = ImageList(padded, images.image_sizes)
    return inputs, images


# ------------------------------------------------------------------------------------------
# Export and runtimes
# ------------------------------------------------------------------------------------------
def export(wrapper: nn.Module, args: Tuple[torch.Tensor, ...], names: List[str], fmt: str,
           output_dir: str) -> str:
    """Write model.onnx (torch.onnx's torch.export-based exporter) or model.pt2; returns the
    path. Written to a temporary name first, so a failed export leaves no partial file."""
    os.makedirs(output_dir, exist_ok=True)
    input_names = ["image", "image_size"][:len(args)]
    path = os.path.join(output_dir, "model.onnx" if fmt == "onnx" else "model.pt2")
    tmp = path + ".tmp"
    try:
        with torch.no_grad():
            if fmt == "onnx":
                torch.onnx.export(wrapper, args, tmp, dynamo=True, input_names=input_names,
                                  output_names=names, external_data=False, verbose=False)
            else:
                torch.export.save(torch.export.export(wrapper, args), tmp)
    except Exception as err:  # the exporters raise many types; the details go to stderr
        traceback.print_exc()
        first_line = next((line for line in str(err).splitlines() if line.strip()), "")
        raise CheckFailed(f"{fmt} export of {type(wrapper).__name__} failed: "
                          f"{type(err).__name__}: {first_line}") from None
    os.replace(tmp, path)
    return path


def load_runtime(path: str, fmt: str, threads: int) -> Callable[..., List[np.ndarray]]:
    """A function of the input arrays returning the output arrays: an onnxruntime CPU session,
    or the loaded torch.export program."""
    if fmt == "onnx":
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]
        return lambda *arrays: session.run(None, dict(zip(names, arrays)))
    program = torch.export.load(path).module()

    def run(*arrays):
        with torch.no_grad():
            return [t.numpy() for t in program(*[torch.from_numpy(a) for a in arrays])]
    return run


def median_seconds(fn_a: Callable, fn_b: Callable, runs: int) -> Tuple[float, float]:
    """Median seconds of two functions run alternately after one warm-up call each."""
    fn_a(), fn_b()
    samples_a, samples_b = [], []
    for _ in range(runs):
        for fn, samples in ((fn_a, samples_a), (fn_b, samples_b)):
            start = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - start)
    return statistics.median(samples_a), statistics.median(samples_b)


# ------------------------------------------------------------------------------------------
# The check
# ------------------------------------------------------------------------------------------
def box_tolerance(boxes: np.ndarray, image_extent: float) -> np.ndarray:
    """Per-coordinate tolerance of (N, 4) XYXY boxes decoded from deltas within rtol / atol:
    BOX_ATOL_PX, plus ATOL times ``image_extent`` (the longer image side; a centre delta moves
    the box by the anchor's size times its error, and anchors reach the image's size), plus RTOL
    times the box's width (x) or height (y) (a size delta scales the box)."""
    boxes = np.asarray(boxes, dtype=np.float64)
    sizes = np.abs(boxes[:, 2:] - boxes[:, :2])
    return BOX_ATOL_PX + ATOL * image_extent + RTOL * np.concatenate([sizes, sizes], axis=1)


def compare_outputs(names, reference: Sequence[np.ndarray], got: Sequence[np.ndarray],
                    tolerances: Optional[Dict[str, np.ndarray]] = None) -> List[str]:
    """Print max abs / rel difference per output; returns the names of those not within rtol /
    atol (or the output's entry of ``tolerances``, e.g. :func:`box_tolerance` for boxes)."""
    tolerances = tolerances or {}
    not_close = []
    for name, ref, out in zip(names, reference, got):
        if ref.shape != out.shape:
            print(f"  {name:<16} shape {tuple(out.shape)} != PyTorch's {tuple(ref.shape)}")
            not_close.append(name)
            continue
        if ref.size == 0:
            print(f"  {name:<16} {tuple(ref.shape)} empty")
            continue
        ref64, out64 = ref.astype(np.float64), out.astype(np.float64)
        diff = np.abs(ref64 - out64)
        rel = diff / np.maximum(np.abs(ref64), 1e-12)
        if name in tolerances:
            close = bool(np.all(diff <= tolerances[name]))
            criterion = "the box tolerance"
        else:
            close = bool(np.all(diff <= ATOL + RTOL * np.abs(ref64)))
            criterion = "rtol 1e-3 / atol 1e-4"
        if not close:
            not_close.append(name)
        print(f"  {name:<16} {str(tuple(ref.shape)):<20} max abs {diff.max():.2e}  max rel "
              f"{rel.max():.2e}  {'ok' if close else 'NOT within ' + criterion}")
    return not_close


def within_float32_noise(wrapper: nn.Module, example: Sequence[torch.Tensor], names,
                         reference: Sequence[np.ndarray], got: Sequence[np.ndarray],
                         failed: Sequence[str]) -> bool:
    """For outputs that missed rtol / atol: whether the runtime is as close to the exact result
    (PyTorch in float64) as PyTorch's own float32 result is, up to a factor 2 (both are float32
    computations with their own kernels and summation orders). Deep networks with large
    activations (e.g. EfficientDet's logits of magnitude ~10) carry float32 errors above atol
    1e-4 in PyTorch itself."""
    exact_model = copy.deepcopy(wrapper).double()
    with torch.no_grad():
        exact = [t.numpy() for t in exact_model(*[x.double() if x.is_floating_point() else x
                                                  for x in example])]
    print("  against PyTorch in float64, for the outputs beyond tolerance:")
    ok = True
    for name, ref, out, ex in zip(names, reference, got, exact):
        if name not in failed:
            continue
        torch_error = float(np.abs(ref.astype(np.float64) - ex).max())
        runtime_error = float(np.abs(out.astype(np.float64) - ex).max())
        close = runtime_error <= 2 * torch_error
        ok &= close
        print(f"  {name:<16} max |error|: PyTorch float32 {torch_error:.2e}, exported "
              f"{runtime_error:.2e}  {'ok' if close else 'NOT'} within 2x PyTorch's")
    return ok


class _Returns(nn.Module):
    """Stands in for a network part: returns recorded outputs whatever its input."""

    def __init__(self, value):
        super().__init__()
        self.value = value

    def forward(self, *args, **kwargs):
        return self.value


@contextmanager
def _substituted(model: nn.Module, images: ImageList, parts: Dict[str, object]):
    """The model with ``preprocess_image`` returning ``images`` and the dotted submodules of
    ``parts`` replaced, restored afterwards."""
    saved = []
    model.preprocess_image = lambda batched_inputs: images
    try:
        for dotted, value in parts.items():
            owner_name, _, name = dotted.rpartition(".")
            owner = model.get_submodule(owner_name) if owner_name else model
            saved.append((owner, name, getattr(owner, name)))
            setattr(owner, name, _Returns(value))
        yield model
    finally:
        for owner, name, module in reversed(saved):
            setattr(owner, name, module)
        del model.preprocess_image


def model_outputs(model: nn.Module, inputs: dict, images: ImageList, raw=None) -> Instances:
    """The model's eval output for ``images``: its own forward, or with ``raw`` (the network
    mode's outputs, e.g. from onnxruntime) in place of its networks' outputs."""
    parts = {}
    if raw is not None:
        raw = [torch.from_numpy(np.ascontiguousarray(x)) for x in raw]
        if isinstance(model, GeneralizedRCNN):
            names = list(model.neck.output_shape())
            levels = len(model.proposal_generator.in_features)
            features = dict(zip(names, raw[:len(names)]))
            rpn = raw[len(names):]
            parts = {"backbone": None, "neck": features,
                     "proposal_generator.head": (rpn[:levels], rpn[levels:])}
        else:
            levels = len(model.in_features)
            # the anchors need only the feature maps' sizes
            features = {f: x.new_zeros((1, 0) + tuple(x.shape[-2:]))
                        for f, x in zip(model.in_features, raw[:levels])}
            parts = {"backbone": {}, "neck": features, "head": (raw[:levels], raw[levels:])}
    # masks pasted as probabilities, compared before the threshold
    mask_threshold = getattr(model, "mask_threshold", None)
    try:
        model.mask_threshold = None
        with torch.no_grad(), _substituted(model, images, parts):
            return model([inputs])[0]["instances"]
    finally:
        model.mask_threshold = mask_threshold


def full_outputs_to_instances(model: nn.Module, inputs: dict, images: ImageList,
                              outputs: Sequence[np.ndarray]) -> Instances:
    """The full mode's outputs rescaled to the original image (masks pasted) as the model's
    eval forward does."""
    boxes, scores, classes = (torch.from_numpy(np.ascontiguousarray(x)) for x in outputs[:3])
    det = Instances(tuple(images.image_sizes[0]), pred_boxes=Boxes(boxes), scores=scores,
                    pred_classes=classes)
    if len(outputs) > 3:
        det.pred_masks = torch.from_numpy(np.ascontiguousarray(outputs[3]))
    return detections_to_outputs([det], [inputs], mask_threshold=None)[0]["instances"]


def pair_detections(ref_boxes: torch.Tensor, ref_scores: torch.Tensor,
                    ref_classes: torch.Tensor, got_boxes: torch.Tensor,
                    got_classes: torch.Tensor) -> Optional[torch.Tensor]:
    """``order`` such that detection ``order[i]`` of ``got`` is the partner of reference
    detection i: by decreasing reference score, the unpaired one of the same class with the
    closest box (equal scores may come in either order). None if the counts differ or a
    reference detection has no partner of its class."""
    if len(ref_boxes) != len(got_boxes):
        return None
    free = torch.ones(len(got_boxes), dtype=torch.bool)
    order = torch.zeros(len(ref_boxes), dtype=torch.int64)
    for i in torch.argsort(ref_scores, descending=True, stable=True).tolist():
        candidates = torch.nonzero(free & (got_classes == ref_classes[i])).squeeze(1)
        if candidates.numel() == 0:
            return None
        distance = (got_boxes[candidates] - ref_boxes[i]).abs().amax(dim=1)
        order[i] = candidates[torch.argmin(distance)]
        free[order[i]] = False
    return order


def compare_detections(reference: Instances, got: Instances, threshold: float = 0.5) -> bool:
    """Pair the detections (:func:`pair_detections`); print count, classes, max box / score
    difference and, for pasted mask probabilities, the max difference (within rtol / atol)
    and the pixels that end up on the other side of the mask ``threshold``."""
    ref_boxes, got_boxes = reference.pred_boxes.tensor, got.pred_boxes.tensor
    print(f"  detections: PyTorch {len(reference)}, exported {len(got)}")
    if len(reference) != len(got):
        return False
    order = pair_detections(ref_boxes, reference.scores, reference.pred_classes, got_boxes,
                            got.pred_classes)
    if order is None:
        print("  classes differ: a PyTorch detection has no counterpart of its class")
        return False
    pairs = list(enumerate(order.tolist()))
    if not pairs:
        print("  no detections on either side")
        return True
    ri, gi = (torch.tensor(x) for x in zip(*pairs))
    box_diff = (ref_boxes[ri] - got_boxes[gi]).abs().double()
    extent = max(reference.image_size)
    boxes_close = bool((box_diff.numpy() <= box_tolerance(ref_boxes[ri].numpy(), extent)).all())
    score_diff = float((reference.scores[ri] - got.scores[gi]).abs().max())
    ok = boxes_close and score_diff <= SCORE_ATOL
    line = (f"  classes equal; max |box diff| {float(box_diff.max()):.1e} px "
            f"({'within' if boxes_close else 'NOT within'} {BOX_ATOL_PX:g} px + {ATOL:g} x "
            f"{extent} px + {RTOL:g} x box size), max |score diff| {score_diff:.1e} "
            f"(<= {SCORE_ATOL:g})")
    if reference.has("pred_masks"):
        ref_masks, got_masks = reference.pred_masks[ri], got.pred_masks[gi]
        diff = (ref_masks - got_masks).abs()
        ok &= bool((diff <= ATOL + RTOL * ref_masks.abs()).all())
        flipped = int(((ref_masks > threshold) != (got_masks > threshold)).sum())
        line += (f"; pasted mask probabilities: max |diff| {float(diff.max()):.1e}, "
                 f"{flipped} of {ref_masks.numel()} pixels across the {threshold:g} threshold")
    print(line)
    return ok


def run(args) -> Dict[str, float]:
    """Export, then check; returns the figures. Raises CheckFailed on a failed check."""
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    cfg = setup_cfg(argparse.Namespace(config_file=args.config_file,
                                       opts=list(args.opts or []) + ["MODEL.DEVICE", "cpu"]))
    torch.manual_seed(args.seed)
    model = load_model(cfg)
    image_path = args.image or default_image_path(args.output)
    inputs, images = prepare_input(cfg, model, image_path, args.size)
    if not cfg.MODEL.WEIGHTS:
        print(f"No MODEL.WEIGHTS: random weights (seed {args.seed}), norm statistics measured on "
              "the check image")
        calibrate_norm_statistics(model, lambda: model_outputs(model, inputs, images),
                                  torch.Generator().manual_seed(args.seed))
    padded_size = tuple(images.tensor.shape[-2:])
    wrapper = export_wrapper(model, args.mode, padded_size)
    example = (images.tensor,)
    if args.mode == "full":
        example += (torch.tensor(images.image_sizes[0], dtype=torch.int64),)
    with torch.no_grad():
        reference = [t.numpy() for t in wrapper(*example)]
    names = output_names(wrapper, reference)
    path = export(wrapper, example, names, args.format, args.output)
    runtime_name = "onnxruntime" if args.format == "onnx" else "torch.export"
    print(f"Exported {type(model).__name__} ({args.mode}) to {path}, input {padded_size[0]}x"
          f"{padded_size[1]} from {image_path}")

    arrays = [t.numpy() for t in example]
    runtime = load_runtime(path, args.format, threads)
    got = runtime(*arrays)
    heading = f"{runtime_name} against PyTorch (rtol {RTOL:g}, atol {ATOL:g})"
    tolerances = {}
    if args.mode == "full":
        tolerances["boxes"] = box_tolerance(reference[0], max(padded_size))
        # detections of equal score may come in another order
        order = pair_detections(*(torch.from_numpy(x) for x in (reference[0], reference[1],
                                                                 reference[2], got[0], got[2])))
        if order is not None:
            got = [x[order.numpy()] for x in got]
            heading += ", detections paired by class and box"
    print(heading + ":")
    failed = compare_outputs(names, reference, got, tolerances)
    # the full mode's selections differ in shape when a value crosses a threshold
    outputs_close = not failed or (args.mode == "network" and within_float32_noise(
        wrapper, example, names, reference, got, failed))
    expected = model_outputs(model, inputs, images)
    if args.mode == "network":
        print(f"Detections after our postprocessing of {runtime_name}'s outputs:")
        exported = model_outputs(model, inputs, images, raw=got)
    else:
        print(f"Detections of {runtime_name} against the PyTorch model's:")
        exported = full_outputs_to_instances(model, inputs, images, got)
    detections_match = compare_detections(expected, exported,
                                          getattr(model, "mask_threshold", 0.5))

    def torch_run():
        with torch.no_grad():
            wrapper(*example)
    runtime_seconds, torch_seconds = median_seconds(lambda: runtime(*arrays), torch_run,
                                                    args.runs)
    print(f"Median of {args.runs} runs, 1 image, {threads} threads: {runtime_name} "
          f"{runtime_seconds * 1000:.1f} ms, PyTorch {torch_seconds * 1000:.1f} ms, ratio "
          f"{torch_seconds / runtime_seconds:.2f} (> 1: {runtime_name} faster)")
    figures = {"runtime_ms": runtime_seconds * 1000, "torch_ms": torch_seconds * 1000,
               "num_detections": len(expected)}
    if args.mode == "full":
        # the exported module pools every RoI on every level; the model's own path does not
        _, model_seconds = median_seconds(lambda: None,
                                          lambda: model_outputs(model, inputs, images), args.runs)
        figures["torch_model_ms"] = model_seconds * 1000
        print(f"  the PyTorch model's own eval forward (rescaling and mask pasting included): "
              f"{model_seconds * 1000:.1f} ms, ratio {model_seconds / runtime_seconds:.2f}")
    if not outputs_close:
        raise CheckFailed(f"{runtime_name} outputs differ from PyTorch's beyond rtol {RTOL:g} / "
                          f"atol {ATOL:g} and beyond float32 rounding ({path})")
    if not detections_match:
        raise CheckFailed(f"detections from {runtime_name} differ from PyTorch's ({path})")
    print("Check passed")
    return figures


def main(argv=None) -> Dict[str, float]:
    args = build_parser().parse_args(argv)
    if args.format == "onnx":
        try:
            import onnxruntime  # noqa: F401
            import onnxscript  # noqa: F401
        except ImportError as err:
            raise SystemExit(f"{PROG}: error: --format onnx needs onnxscript and onnxruntime "
                             f"(pip install -e '.[export]'): {err}") from None
    if not args.output:
        raise SystemExit(f"{PROG}: error: --output DIR is required")
    try:
        return run(args)
    except (CheckFailed, CheckpointError, ValueError, FileNotFoundError) as err:
        message = " ".join(str(err).split())
        raise SystemExit(f"{PROG}: error: {message}") from None


if __name__ == "__main__":
    main()
    sys.exit(0)
