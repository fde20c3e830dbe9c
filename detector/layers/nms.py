"""Class-aware NMS: ``torchvision.ops.batched_nms``'s results, faster on the CPU.

On the CPU with more than 4000 boxes, torchvision's ``batched_nms`` runs one ``nms`` per group
from a Python loop (EfficientDet's 5000 candidates over 90 classes make 70-90 calls per image);
below that, one ``nms`` over all boxes with the groups moved apart, which compares every pair.
The C++ kernel of ``csrc/grouped_nms.cpp`` compares each box only with the boxes already kept in
its group, computing the overlap as torchvision's kernel does: the same boxes are kept, in the
same order (decreasing score; equal scores keep their input order). Elsewhere (CUDA, other
dtypes, tracing and scripting, or without the kernel) torchvision's function runs.
"""
import ctypes
from typing import Optional

import torch
from torchvision.ops import batched_nms as _torchvision_batched_nms

from .cpu_kernels import load_kernel

__all__ = ["batched_nms"]


def _kernel() -> Optional[ctypes.CDLL]:
    lib = load_kernel("grouped_nms")
    if lib is not None and lib.detector_grouped_nms.argtypes is None:
        lib.detector_grouped_nms.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                             ctypes.c_double, ctypes.c_void_p]
        lib.detector_grouped_nms.restype = None
    return lib


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor,
                iou_threshold: float) -> torch.Tensor:
    """Indices of the (N, 4) XYXY ``boxes`` kept by NMS at ``iou_threshold`` within each group
    of equal ``idxs``, sorted by decreasing ``scores``: ``torchvision.ops.batched_nms``."""
    if (boxes.device.type != "cpu" or boxes.dtype != torch.float32
            or torch.jit.is_scripting() or torch.jit.is_tracing()
            or torch.compiler.is_compiling()):
        return _torchvision_batched_nms(boxes, scores, idxs, iou_threshold)
    kernel = _kernel()
    if kernel is None:
        return _torchvision_batched_nms(boxes, scores, idxs, iou_threshold)
    if boxes.shape[0] == 0:
        return torch.empty(0, dtype=torch.int64)
    order = torch.sort(scores, descending=True, stable=True).indices
    sorted_boxes = boxes[order].contiguous()
    sorted_groups = idxs[order].to(torch.int64).contiguous()
    keep = torch.empty(boxes.shape[0], dtype=torch.uint8)
    kernel.detector_grouped_nms(sorted_boxes.data_ptr(), sorted_groups.data_ptr(),
                                boxes.shape[0], float(iou_threshold), keep.data_ptr())
    return order[keep.bool()]
