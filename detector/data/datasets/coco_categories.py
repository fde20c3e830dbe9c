"""COCO's 80 thing categories: the one table every COCO category fact in the project derives from
(dataset metadata, the class slots of pretrained COCO heads that keep COCO's unused ids)."""
from typing import Dict, Tuple

__all__ = [
    "COCO_CATEGORIES", "COCO_CATEGORY_IDS", "COCO_CATEGORY_NAMES", "coco_metadata",
    "coco80_head_indices", "TORCHVISION_COCO80_INDICES", "EFFDET_COCO80_INDICES",
]

# COCO's 80 thing categories as (dataset id, name); ids are not contiguous
COCO_CATEGORIES = (
    (1, "person"), (2, "bicycle"), (3, "car"), (4, "motorcycle"), (5, "airplane"), (6, "bus"),
    (7, "train"), (8, "truck"), (9, "boat"), (10, "traffic light"), (11, "fire hydrant"),
    (13, "stop sign"), (14, "parking meter"), (15, "bench"), (16, "bird"), (17, "cat"),
    (18, "dog"), (19, "horse"), (20, "sheep"), (21, "cow"), (22, "elephant"), (23, "bear"),
    (24, "zebra"), (25, "giraffe"), (27, "backpack"), (28, "umbrella"), (31, "handbag"),
    (32, "tie"), (33, "suitcase"), (34, "frisbee"), (35, "skis"), (36, "snowboard"),
    (37, "sports ball"), (38, "kite"), (39, "baseball bat"), (40, "baseball glove"),
    (41, "skateboard"), (42, "surfboard"), (43, "tennis racket"), (44, "bottle"),
    (46, "wine glass"), (47, "cup"), (48, "fork"), (49, "knife"), (50, "spoon"), (51, "bowl"),
    (52, "banana"), (53, "apple"), (54, "sandwich"), (55, "orange"), (56, "broccoli"),
    (57, "carrot"), (58, "hot dog"), (59, "pizza"), (60, "donut"), (61, "cake"), (62, "chair"),
    (63, "couch"), (64, "potted plant"), (65, "bed"), (67, "dining table"), (70, "toilet"),
    (72, "tv"), (73, "laptop"), (74, "mouse"), (75, "remote"), (76, "keyboard"),
    (77, "cell phone"), (78, "microwave"), (79, "oven"), (80, "toaster"), (81, "sink"),
    (82, "refrigerator"), (84, "book"), (85, "clock"), (86, "vase"), (87, "scissors"),
    (88, "teddy bear"), (89, "hair drier"), (90, "toothbrush"),
)
COCO_CATEGORY_IDS: Tuple[int, ...] = tuple(cid for cid, _ in COCO_CATEGORIES)
COCO_CATEGORY_NAMES: Tuple[str, ...] = tuple(name for _, name in COCO_CATEGORIES)


def coco_metadata() -> Dict[str, object]:
    """``thing_classes`` and the dataset id <-> contiguous id maps of the 80 categories, in id
    order (contiguous id i is the i-th smallest COCO id)."""
    return {
        "thing_classes": list(COCO_CATEGORY_NAMES),
        "thing_dataset_id_to_contiguous_id": {cid: i for i, cid in enumerate(COCO_CATEGORY_IDS)},
        "thing_contiguous_id_to_dataset_id": dict(enumerate(COCO_CATEGORY_IDS)),
    }


def coco80_head_indices(first_id_index: int) -> Tuple[int, ...]:
    """The classifier output of each of the 80 categories (in contiguous order) in a COCO head
    that keeps a slot for every id up to 90, category id ``k`` at output ``k - first_id_index``.
    Pass the result to the converters' ``select_classes`` to get an 80-class head."""
    return tuple(cid - first_id_index for cid in COCO_CATEGORY_IDS)


# torchvision's 91-way heads: output k is category id k (output 0 is background)
TORCHVISION_COCO80_INDICES = coco80_head_indices(0)
# effdet's 90-way heads: output k is category id k + 1
EFFDET_COCO80_INDICES = coco80_head_indices(1)
