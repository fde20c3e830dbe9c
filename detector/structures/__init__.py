from .boxes import Boxes, pairwise_ioa, pairwise_iou, xywh_to_xyxy, xyxy_to_xywh
from .image_list import ImageList
from .instances import Instances
from .masks import BitMasks, PolygonMasks, decode_rles, polygon_area, polygons_to_rles

__all__ = ["BitMasks", "Boxes", "ImageList", "Instances", "PolygonMasks", "decode_rles",
           "pairwise_ioa", "pairwise_iou", "polygon_area", "polygons_to_rles", "xywh_to_xyxy",
           "xyxy_to_xywh"]
