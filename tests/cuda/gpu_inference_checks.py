"""The bodies of the GPU checks of inference (RoIAlign, NMS, the detectors' eval forward against
the CPU), each taking the device it checks.

The tests in tests/cuda (marked ``cuda``) call them with "cuda"; tests/tools/test_gpu_check.py
calls them with "cpu", so the same code is known to run (where the comparison is trivially
exact). Imported by name: tests/cuda is on sys.path for its tests.
"""
import contextlib
import copy
import math
import os
import sys

import torch
from torchvision.ops import batched_nms, nms, roi_align

from detector.config import get_cfg
from detector.modeling import build_model
from detector.modeling.postprocessing.masks import expand_boxes
from detector.modeling.roi_heads.poolers import ROIPooler, assign_boxes_to_levels

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOT = os.path.dirname(TESTS)
if TESTS not in sys.path:  # the shared helpers of tests/ (random_statistics, tool_loader)
    sys.path.insert(0, TESTS)
from random_statistics import randomize_batchnorms  # noqa: E402
from tool_loader import load_tool  # noqa: E402


@contextlib.contextmanager
def ieee_float32():
    """cuDNN convolutions and matmuls in true float32 (no TF32 on Ampere and newer), so CUDA and
    CPU results differ only by float32 rounding."""
    cudnn, matmul = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = cudnn, matmul


# ------------------------------------------------------------------------------------------
# RoIAlign, NMS and batched NMS against the CPU
# ------------------------------------------------------------------------------------------
def random_rois(num, image_size, generator, num_images=2):
    """(num, 5) RoIs (image index, x1, y1, x2, y2): sizes from sub-pixel to the whole image,
    some reaching past the border."""
    h, w = image_size
    centers = torch.rand(num, 2, generator=generator) * torch.tensor([w, h])
    sizes = torch.exp(torch.rand(num, 2, generator=generator) * math.log(1.5 * max(h, w) / 0.5)
                      ) * 0.5
    boxes = torch.cat([centers - sizes / 2, centers + sizes / 2], dim=1)
    images = torch.randint(0, num_images, (num, 1), generator=generator).float()
    return torch.cat([images, boxes], dim=1)


def check_roi_align(device, *, aligned, sampling_ratio):
    """torchvision's roi_align forward and backward on ``device`` against the CPU."""
    g = torch.Generator().manual_seed(11)
    features = torch.randn(2, 8, 20, 24, generator=g)
    rois = random_rois(300, (160, 192), g)
    upstream = torch.randn(300, 8, 7, 7, generator=g)
    results = {}
    for where in ("cpu", device):
        x = features.to(where).requires_grad_()
        out = roi_align(x, rois.to(where), (7, 7), spatial_scale=1 / 8,
                        sampling_ratio=sampling_ratio, aligned=aligned)
        (out * upstream.to(where)).sum().backward()
        results[where] = (out.detach().cpu(), x.grad.cpu())
    (cpu_out, cpu_grad), (out, grad) = results["cpu"], results[device]
    assert cpu_out.abs().sum() > 0 and cpu_grad.abs().sum() > 0
    torch.testing.assert_close(out, cpu_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, cpu_grad, rtol=1e-5, atol=1e-5)


def check_roi_pooler(device):
    """The multi-level ROIPooler (P2-P5, both RoIAlign types) on ``device`` against the CPU;
    the boxes cover every level."""
    g = torch.Generator().manual_seed(12)
    strides = [4, 8, 16, 32]
    image = (256, 320)
    features = [torch.randn(2, 6, image[0] // s, image[1] // s, generator=g) for s in strides]
    rois = random_rois(400, image, g)
    boxes = [rois[rois[:, 0] == i, 1:] for i in range(2)]
    levels = assign_boxes_to_levels(boxes, 2, 5, canonical_box_size=56.0)
    assert set(levels.tolist()) == {0, 1, 2, 3}
    for aligned in (True, False):
        pooler = ROIPooler(output_size=7, strides=strides, sampling_ratio=0, aligned=aligned,
                           canonical_box_size=56.0)
        cpu_out = pooler(features, boxes)
        out = pooler([f.to(device) for f in features], [b.to(device) for b in boxes])
        assert out.device.type == torch.device(device).type
        torch.testing.assert_close(out.cpu(), cpu_out, rtol=1e-5, atol=1e-5)


def grid_boxes(num, generator, image_size=512):
    """(num, 4) XYXY boxes on a half-pixel grid (exact in float32, also after batched NMS's
    per-class offsets, so IoUs are computed identically on every device) and distinct
    scores."""
    xy = torch.randint(0, 2 * image_size - 64, (num, 2), generator=generator) / 2
    wh = torch.randint(8, 2 * 96, (num, 2), generator=generator) / 2
    boxes = torch.cat([xy, (xy + wh).clamp(max=image_size)], dim=1)
    scores = (torch.randperm(num, generator=generator).float() + 1) / num
    return boxes, scores


def check_nms(device):
    """torchvision's nms on ``device`` keeps the same boxes in the same order as on the CPU."""
    g = torch.Generator().manual_seed(13)
    boxes, scores = grid_boxes(3000, g)
    for threshold in (0.3, 0.5, 0.7):
        keep_cpu = nms(boxes, scores, threshold)
        keep = nms(boxes.to(device), scores.to(device), threshold).cpu()
        assert 0 < len(keep_cpu) < len(boxes)
        assert torch.equal(keep, keep_cpu), threshold


# torchvision's batched_nms switches from the coordinate trick to a loop over classes above
# 4000 box coordinates on the CPU but 100000 on CUDA (20000 in older releases): these sizes
# cover both regimes and the gap between them
BATCHED_NMS_SIZES = (300, 2000, 6000, 30000)


def check_batched_nms(device, num_boxes, num_classes=5):
    """torchvision's batched_nms on ``device`` against the CPU: the same boxes, same order."""
    g = torch.Generator().manual_seed(14 + num_boxes)
    boxes, scores = grid_boxes(num_boxes, g)
    classes = torch.randint(0, num_classes, (num_boxes,), generator=g)
    keep_cpu = batched_nms(boxes, scores, classes, 0.5)
    keep = batched_nms(boxes.to(device), scores.to(device), classes.to(device), 0.5).cpu()
    assert 0 < len(keep_cpu) < num_boxes
    assert torch.equal(keep, keep_cpu)


# ------------------------------------------------------------------------------------------
# The detectors' eval forward against the CPU, same weights
# ------------------------------------------------------------------------------------------
# The demo configs shrunk. The dense detectors' heads are rescaled (see tiny_model) and their
# postprocessing, which runs in float32 even for a float64 network, keeps every candidate above
# the score threshold (no top-k cut). For these seeds every decision of the postprocessing (the
# score threshold, which box of an overlapping pair NMS keeps, whether an overlap exceeds the NMS
# threshold) was measured to be at least 5e-5 (relative) from its boundary, several hundred float32
# ulps: rounding differences between devices cannot flip one. Mask R-CNN's box and mask heads run
# in float64 (its RPN's postprocessing in float32, with wider margins still).
KEEP_ALL_CANDIDATES = ["TEST.DETECTIONS_PER_IMAGE", "100000"]
TINY_MODELS = {
    "retinanet": ("configs/demo/retinanet_tiny_shapes.yaml", [
        "MODEL.TINYNET.CHANNELS", "[8, 16, 16, 32, 32]", "MODEL.NECK.OUT_CHANNELS", "32",
        "MODEL.GN.NUM_GROUPS", "8", "MODEL.RETINANET.SCORE_THRESH_TEST", "0.8",
        "MODEL.RETINANET.TOPK_CANDIDATES_TEST", "100000"] + KEEP_ALL_CANDIDATES),
    "efficientdet": ("configs/efficientdet/EfficientDet-tiny-shapes.yaml", [
        "MODEL.TINYNET.CHANNELS", "[8, 16, 16, 32, 32]", "MODEL.BIFPN.CHANNELS", "16",
        "MODEL.BIFPN.NUM_REPEATS", "2", "MODEL.EFFICIENTDET.NUM_HEAD_CONVS", "1",
        "MODEL.EFFICIENTDET.SCORE_THRESH_TEST", "0.8",
        "MODEL.EFFICIENTDET.TOPK_CANDIDATES_TEST", "100000"] + KEEP_ALL_CANDIDATES),
    "mask_rcnn": ("configs/demo/mask_rcnn_tiny_shapes.yaml", [
        "MODEL.TINYNET.CHANNELS", "[8, 16, 16, 32, 32]", "MODEL.NECK.OUT_CHANNELS", "16",
        "MODEL.ROI_BOX_HEAD.FC_DIM", "32", "MODEL.ROI_MASK_HEAD.NUM_CONV", "1",
        "MODEL.ROI_MASK_HEAD.CONV_DIM", "16", "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0"]),
}
# dense heads: factors on the class-logit and box-delta weights. With the prior's bias all
# scores sit in a narrow band around 0.01, a few ulps apart; spread over (0, 1) they are not
DENSE_HEAD_SCALES = {"retinanet": (20.0, 3.0), "efficientdet": (8.0, 3.0)}
# network-input sizes (h, w) of the two images and the original sizes they are rescaled to
EVAL_IMAGES = (((64, 64), (96, 96)), ((48, 64), (60, 80)))
EVAL_SEED = 4
BOX_ATOL_PX, SCORE_ATOL, MASK_ATOL = 1e-3, 1e-4, 1e-4


def _spread_dense_head(head, logit_scale, delta_scale):
    with torch.no_grad():
        for name, scale in (("cls_score", logit_scale), ("bbox_pred", delta_scale)):
            layer = getattr(head, name)
            layer = getattr(layer, "conv_pw", layer)  # the last conv of a separable conv
            layer.weight.mul_(scale)
            if name == "cls_score":
                layer.bias.zero_()


def tiny_model(name):
    """The tiny CPU model ``name`` of TINY_MODELS in eval mode: seeded random weights, random
    BatchNorm statistics and affine parameters, dense heads spread (DENSE_HEAD_SCALES)."""
    config, opts = TINY_MODELS[name]
    cfg = get_cfg()
    cfg.merge_from_file(os.path.join(ROOT, config))
    cfg.merge_from_list(opts + ["MODEL.DEVICE", "cpu", "INPUT.MIN_SIZE_TEST", "64",
                                "INPUT.MAX_SIZE_TEST", "64"])
    torch.manual_seed(5)
    model = build_model(cfg)
    randomize_batchnorms(model.modules(), torch.Generator().manual_seed(5))
    if name in DENSE_HEAD_SCALES:
        _spread_dense_head(model.head, *DENSE_HEAD_SCALES[name])
    return model.eval()


def eval_inputs(seed=EVAL_SEED):
    g = torch.Generator().manual_seed(seed)
    return [{"image": torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8),
             "height": oh, "width": ow, "image_id": i}
            for i, ((h, w), (oh, ow)) in enumerate(EVAL_IMAGES)]


def _mask_corners(boxes, mask_size):
    """The integer box a mask of ``mask_size`` is pasted onto (see paste_masks_in_image)."""
    return expand_boxes(boxes, (mask_size + 2) / mask_size).to(torch.int64)


def _tensors(output):
    """The tensors of a module's output (tensor, dict, list or tuple, nested), in order."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (list, tuple)):
        return [t for item in output for t in _tensors(item)]
    return []


def _network_parts(model):
    """The modules before any discontinuous step (top-k, NMS): backbone, neck and the dense
    head (the RPN's head in a two-stage model)."""
    head = model.head if hasattr(model, "head") else model.proposal_generator.head
    return {"backbone": model.backbone, "neck": model.neck, "head": head}


def _record_network_outputs(model):
    outputs, handles = {}, []
    for name, module in _network_parts(model).items():
        handles.append(module.register_forward_hook(
            lambda m, i, out, name=name: outputs.__setitem__(name, _tensors(out))))
    return outputs, handles


def check_eval_forward(name, device):
    """The tiny model ``name`` on ``device`` and on the CPU, same weights, same images.

    In float32 (no TF32) the raw outputs of backbone, neck and head agree within rtol / atol
    1e-4. The detections are compared with the networks in float64, so that no decision of the
    postprocessing lies within rounding of its boundary (see TINY_MODELS): the same detections
    (paired by class and box), boxes within 1e-3 px, scores within 1e-4, pasted mask
    probabilities within 1e-4. Returns the number of detections compared."""
    cpu_model = tiny_model(name)
    model = copy.deepcopy(cpu_model).to(device)
    assert model.device.type == torch.device(device).type
    raw = []
    for m in (cpu_model, model):
        outputs, handles = _record_network_outputs(m)
        with torch.no_grad(), ieee_float32():
            m(eval_inputs())
        for h in handles:
            h.remove()
        raw.append(outputs)
    for part, expected in raw[0].items():
        got = raw[1][part]
        assert expected and len(got) == len(expected), part
        for e, g in zip(expected, got):
            assert g.device.type == torch.device(device).type and g.dtype == torch.float32
            torch.testing.assert_close(g.cpu(), e, rtol=1e-4, atol=1e-4, msg=f"{name} {part}")

    cpu_model.double()
    model.double()
    mask_sizes = set()
    if hasattr(cpu_model, "mask_threshold"):  # compare probabilities, not thresholded masks
        cpu_model.mask_threshold = model.mask_threshold = None
        cpu_model.roi_heads.mask_head.register_forward_hook(
            lambda m, i, out: mask_sizes.add(out.shape[-1]))
    with torch.no_grad():
        expected = cpu_model(eval_inputs())
        got = model(eval_inputs())
    pair_detections = load_tool("export_model").pair_detections
    compared = 0
    for image_expected, image_got in zip(expected, got):
        ref, out = image_expected["instances"], image_got["instances"].to("cpu")
        assert image_got["instances"].scores.device.type == torch.device(device).type
        assert ref.image_size == out.image_size
        ref_boxes, out_boxes = ref.pred_boxes.tensor, out.pred_boxes.tensor
        assert len(ref) > 0 and len(out) == len(ref), (name, len(ref), len(out))
        order = pair_detections(ref_boxes, ref.scores, ref.pred_classes, out_boxes,
                                out.pred_classes)
        assert order is not None, f"{name}: a detection has no partner of its class"
        torch.testing.assert_close(out_boxes[order], ref_boxes, rtol=0, atol=BOX_ATOL_PX)
        torch.testing.assert_close(out.scores[order], ref.scores, rtol=0, atol=SCORE_ATOL)
        if ref.has("pred_masks"):
            # pasted onto the same integer boxes (a corner within rounding of an integer would
            # move a mask by a pixel; in float64 none is that close)
            (mask_size,) = mask_sizes
            assert torch.equal(_mask_corners(ref_boxes, mask_size),
                               _mask_corners(out_boxes[order], mask_size)), name
            torch.testing.assert_close(out.pred_masks[order], ref.pred_masks, rtol=0,
                                       atol=MASK_ATOL)
        compared += len(ref)
    return compared
