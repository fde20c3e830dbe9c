"""Detections of the resized network input, back on the original images."""
from typing import List, Sequence

from detector.structures import Instances

__all__ = ["rescale_detections", "detections_to_outputs"]


def rescale_detections(instances: Instances, output_height: int, output_width: int) -> Instances:
    """Scale detections of a (resized) input image back to the original ``output_height`` x
    ``output_width`` and clip them there."""
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
    return result


def detections_to_outputs(detections: Sequence[Instances], batched_inputs: List[dict]
                          ) -> List[dict]:
    """The model's eval output: one ``{"instances": Instances}`` per input, rescaled to the
    input's ``height`` x ``width`` (the original image; the network input size if absent)."""
    outputs = []
    for x, det in zip(batched_inputs, detections):
        height, width = x.get("height", det.image_size[0]), x.get("width", det.image_size[1])
        outputs.append({"instances": rescale_detections(det, height, width)})
    return outputs
