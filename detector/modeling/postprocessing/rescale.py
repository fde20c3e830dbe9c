"""Detections of the resized network input, back on the original images."""
from typing import List, Optional, Sequence

from detector.structures import Instances

from .masks import paste_masks_in_image

__all__ = ["rescale_detections", "detections_to_outputs"]


def rescale_detections(instances: Instances, output_height: int, output_width: int, *,
                       mask_threshold: Optional[float] = 0.5) -> Instances:
    """Scale detections of a (resized) input image back to the original ``output_height`` x
    ``output_width`` and clip them there. Per-box ``pred_masks`` (R, 1, M, M) probabilities are
    pasted into the whole image: (R, H, W) bool above ``mask_threshold`` (float if None)."""
    in_h, in_w = instances.image_size
    scale_x, scale_y = output_width / in_w, output_height / in_h
    result = Instances((output_height, output_width))
    boxes = instances.pred_boxes.clone()
    if (scale_x, scale_y) != (1.0, 1.0):
        boxes.scale(scale_x, scale_y)
    boxes.clip((output_height, output_width))
    result.pred_boxes = boxes
    result.scores = instances.scores
    result.pred_classes = instances.pred_classes
    if instances.has("pred_masks"):
        result.pred_masks = paste_masks_in_image(instances.pred_masks, boxes.tensor,
                                                 (output_height, output_width),
                                                 threshold=mask_threshold)
    return result


def detections_to_outputs(detections: Sequence[Instances], batched_inputs: List[dict], *,
                          mask_threshold: Optional[float] = 0.5) -> List[dict]:
    """The model's eval output: one ``{"instances": Instances}`` per input, rescaled to the
    input's ``height`` x ``width`` (the original image; the network input size if absent)."""
    outputs = []
    for x, det in zip(batched_inputs, detections):
        height, width = x.get("height", det.image_size[0]), x.get("width", det.image_size[1])
        outputs.append({"instances": rescale_detections(det, height, width,
                                                        mask_threshold=mask_threshold)})
    return outputs
