"""Tiny hand-made COCO ground truth shared by the evaluation tests."""
import json

import torch

from detector.structures import Boxes, Instances

# Three non-contiguous categories; contiguous class k of the model is TINY_CATEGORY_IDS[k]
TINY_CATEGORY_IDS = [3, 7, 11]
TINY_CLASS_NAMES = ["cat", "dog", "bird"]
# image id -> list of (category id, XYWH box); every box has area 1600 (COCO "medium")
TINY_OBJECTS = {
    5: [(3, [10.0, 20.0, 40.0, 40.0]), (7, [60.0, 50.0, 40.0, 40.0])],
    9: [(11, [0.0, 0.0, 40.0, 40.0]), (3, [70.0, 70.0, 40.0, 40.0])],
}


def tiny_gt_dict():
    images = [{"id": i, "width": 120, "height": 120, "file_name": f"{i}.jpg"} for i in TINY_OBJECTS]
    annotations = []
    for image_id, objects in TINY_OBJECTS.items():
        for cat_id, (x, y, w, h) in objects:
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": cat_id,
                "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0,
                "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]],
            })
    categories = [{"id": c, "name": n} for c, n in zip(TINY_CATEGORY_IDS, TINY_CLASS_NAMES)]
    return {"images": images, "annotations": annotations, "categories": categories}


def perfect_results():
    """One exact detection per ground-truth object."""
    return [{"image_id": image_id, "category_id": cat_id, "bbox": list(box), "score": 0.9}
            for image_id, objects in TINY_OBJECTS.items() for cat_id, box in objects]


def write_json(path, data):
    with open(path, "w") as f:
        json.dump(data, f)
    return str(path)


def prediction(image_id, shift_dog=0.0, extra=()):
    """Model-style output of one image: the ground truth as XYXY boxes with contiguous classes."""
    boxes, classes = [], []
    for cat_id, (x, y, w, h) in TINY_OBJECTS[image_id]:
        dx = shift_dog if cat_id == 7 else 0.0
        boxes.append([x + dx, y, x + dx + w, y + h])
        classes.append(TINY_CATEGORY_IDS.index(cat_id))
    for box, cls in extra:
        boxes.append(box)
        classes.append(cls)
    n = len(boxes)
    return {"instances": Instances(
        (120, 120), pred_boxes=Boxes(torch.tensor(boxes, dtype=torch.float32)),
        scores=torch.linspace(0.9, 0.5, n), pred_classes=torch.tensor(classes, dtype=torch.int64))}
