"""Helpers of the data tests: tiny COCO-format datasets written to a temporary folder."""
import json

import numpy as np
from PIL import Image

# Non-contiguous, unsorted on purpose: contiguous ids must follow the sorted dataset ids
CATEGORIES = [{"id": 7, "name": "dog"}, {"id": 3, "name": "cat"}, {"id": 12, "name": "bird"}]


def write_image(path, height, width, seed=0):
    rng = np.random.RandomState(seed)
    Image.fromarray(rng.randint(0, 255, size=(height, width, 3), dtype=np.uint8)).save(path)


def write_coco(tmp_path, images, annotations, categories=CATEGORIES, write_images=True,
               name="instances.json"):
    """Write ``images`` ({id, file_name, height, width}) as random JPEGs under tmp_path/images
    and the COCO json; returns (json path, image root)."""
    root = tmp_path / "images"
    root.mkdir(exist_ok=True)
    if write_images:
        for img in images:
            write_image(root / img["file_name"], img["height"], img["width"], seed=img["id"])
    data = {"images": images, "annotations": annotations, "categories": categories}
    json_file = tmp_path / name
    json_file.write_text(json.dumps(data))
    return str(json_file), str(root)


def ann(ann_id, image_id, bbox, category_id=7, iscrowd=0, segmentation=None):
    out = {"id": ann_id, "image_id": image_id, "bbox": bbox, "category_id": category_id,
           "iscrowd": iscrowd, "area": 1.0}
    if segmentation is not None:
        out["segmentation"] = segmentation
    return out
