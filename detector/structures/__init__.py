from .boxes import Boxes, pairwise_ioa, pairwise_iou, xywh_to_xyxy, xyxy_to_xywh
from .image_list import ImageList
from .instances import Instances

__all__ = ["Boxes", "ImageList", "Instances", "pairwise_ioa", "pairwise_iou", "xywh_to_xyxy",
           "xyxy_to_xywh"]
