"""From raw head outputs to detections: each detector's decoding, score threshold and NMS
(:mod:`.retinanet`, :mod:`.efficientdet`), the shared rescaling to the original image
(:mod:`.rescale`) and the pasting of instance masks into it (:mod:`.masks`)."""
from .efficientdet import efficientdet_inference, topk_over_levels
from .masks import expand_boxes, paste_masks_in_image
from .rescale import detections_to_outputs, rescale_detections
from .retinanet import retinanet_inference, retinanet_inference_single_image, topk_above_threshold

__all__ = ["expand_boxes", "paste_masks_in_image", "efficientdet_inference", "topk_over_levels",
           "detections_to_outputs", "rescale_detections", "retinanet_inference",
           "retinanet_inference_single_image", "topk_above_threshold"]
