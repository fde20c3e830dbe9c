"""From raw head outputs to detections: each detector's decoding, score threshold and NMS
(:mod:`.retinanet`, :mod:`.efficientdet`), and the shared rescaling to the original image
(:mod:`.rescale`)."""
from .efficientdet import efficientdet_inference, topk_over_levels
from .rescale import detections_to_outputs, rescale_detections
from .retinanet import retinanet_inference_single_image

__all__ = ["efficientdet_inference", "topk_over_levels", "detections_to_outputs",
           "rescale_detections", "retinanet_inference_single_image"]
