"""A deterministic synthetic COCO ground truth + detections pair, for benchmarking and checking
that evaluation backends agree. Nothing here is downloaded or read from disk."""
from typing import Dict, Iterator, List, Tuple

import numpy as np

__all__ = ["make_synthetic_coco", "synthetic_model_outputs"]


def _random_boxes(rng: np.random.Generator, n: int, widths: np.ndarray, heights: np.ndarray):
    """``n`` XYWH boxes inside images of the given sizes, sizes log-uniform (small to large)."""
    side = np.exp(rng.uniform(np.log(4.0), np.log(0.9 * np.minimum(widths, heights)), size=n))
    aspect = np.exp(rng.uniform(np.log(0.5), np.log(2.0), size=n))
    w = np.minimum(side * np.sqrt(aspect), widths - 1.0)
    h = np.minimum(side / np.sqrt(aspect), heights - 1.0)
    x = rng.uniform(0.0, widths - w)
    y = rng.uniform(0.0, heights - h)
    return np.stack([x, y, w, h], axis=1)


def make_synthetic_coco(num_images: int = 5000, dets_per_image: int = 100,
                        gt_per_image: float = 7.0, num_categories: int = 80,
                        seed: int = 0, with_masks: bool = False) -> Tuple[dict, List[dict]]:
    """A COCO instances dict and a bbox results list that look like a real detector's.

    Images get Poisson(``gt_per_image``) objects (about 1% crowd) with sizes across COCO's small /
    medium / large ranges and a skewed class frequency; category ids are non-contiguous like
    COCO's. Every image gets ``dets_per_image`` detections: jittered copies of its objects (mostly
    with the right class, higher scores) and random boxes (lower scores). Boxes are rounded to 2
    decimals and scores to 3, as in the cocoapi example results, so equal scores (ties) occur and
    the evaluators' tie ordering is exercised. With ``with_masks`` every detection also carries
    its box as a polygon ``segmentation`` (for segm evaluation). The same arguments always give
    the same data.
    """
    if num_images < 1 or dets_per_image < 0 or num_categories < 1:
        raise ValueError("make_synthetic_coco needs num_images >= 1, dets_per_image >= 0 and "
                         "num_categories >= 1")
    rng = np.random.default_rng(seed)
    cat_ids = np.sort(rng.choice(np.arange(1, int(num_categories * 1.15) + 2), num_categories,
                                 replace=False))
    cat_freq = rng.dirichlet(np.full(num_categories, 0.7))
    image_ids = 1 + 2 * np.arange(num_images)  # non-contiguous, as in real datasets
    widths = rng.integers(320, 641, size=num_images).astype(np.float64)
    heights = rng.integers(240, 641, size=num_images).astype(np.float64)
    images = [{"id": int(i), "width": int(w), "height": int(h), "file_name": f"{int(i):012d}.jpg"}
              for i, w, h in zip(image_ids, widths, heights)]
    categories = [{"id": int(c), "name": f"class_{int(c)}", "supercategory": "thing"}
                  for c in cat_ids]

    gt_counts = rng.poisson(gt_per_image, size=num_images)
    gt_img = np.repeat(np.arange(num_images), gt_counts)
    gt_boxes = np.round(_random_boxes(rng, len(gt_img), widths[gt_img], heights[gt_img]), 2)
    gt_cls = rng.choice(num_categories, size=len(gt_img), p=cat_freq)
    gt_crowd = rng.random(len(gt_img)) < 0.01
    annotations = []
    for k, (img, box, cls, crowd) in enumerate(zip(gt_img, gt_boxes.tolist(), gt_cls, gt_crowd)):
        x, y, w, h = box
        annotations.append({
            "id": k + 1, "image_id": int(image_ids[img]), "category_id": int(cat_ids[cls]),
            "bbox": box, "area": round(w * h, 4), "iscrowd": int(crowd),
            "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]],
        })
    gt = {"info": {"description": f"synthetic COCO, seed {seed}"}, "images": images,
          "annotations": annotations, "categories": categories}

    results: List[dict] = []
    first_gt = np.concatenate([[0], np.cumsum(gt_counts)])
    for img in range(num_images):
        lo, hi = first_gt[img], first_gt[img + 1]
        # up to two noisy copies of every object, then random boxes to fill the budget
        copies = np.repeat(np.arange(lo, hi), rng.integers(1, 3, size=hi - lo))
        copies = copies[:dets_per_image]
        base = gt_boxes[copies]
        noise = rng.normal(0.0, 0.08, size=base.shape) * np.repeat(base[:, 2:], 2, axis=1)
        tp_boxes = base + noise
        tp_boxes[:, 2:] = np.maximum(tp_boxes[:, 2:], 1.0)
        tp_cls = np.where(rng.random(len(copies)) < 0.9, gt_cls[copies],
                          rng.integers(0, num_categories, size=len(copies)))
        tp_scores = rng.beta(4.0, 2.0, size=len(copies))
        num_random = dets_per_image - len(copies)
        rand_boxes = _random_boxes(rng, num_random, np.full(num_random, widths[img]),
                                   np.full(num_random, heights[img]))
        rand_cls = rng.choice(num_categories, size=num_random, p=cat_freq)
        rand_scores = rng.beta(1.5, 5.0, size=num_random)
        boxes = np.round(np.concatenate([tp_boxes, rand_boxes]), 2).tolist()
        classes = cat_ids[np.concatenate([tp_cls, rand_cls]).astype(np.int64)].tolist()
        scores = np.round(np.concatenate([tp_scores, rand_scores]), 3).tolist()
        image_id = int(image_ids[img])
        records = [{"image_id": image_id, "category_id": c, "bbox": b, "score": s}
                   for b, c, s in zip(boxes, classes, scores)]
        if with_masks:
            for r in records:
                x, y, w, h = r["bbox"]
                r["segmentation"] = [[x, y, x + w, y, x + w, y + h, x, y + h]]
        results.extend(records)
    return gt, results


def synthetic_model_outputs(gt: dict, results: List[dict], with_masks: bool = False
                            ) -> Iterator[Tuple[dict, dict]]:
    """(input, output) pairs of every image of ``gt`` as a detector's inference gives them to
    an evaluator: ``Instances`` with float32 XYXY ``pred_boxes``, ``scores`` and contiguous
    ``pred_classes`` (category ids sorted), from the COCO ``results`` of make_synthetic_coco.

    With ``with_masks`` every instance also gets ``pred_masks``, its box filled (made lazily,
    one image at a time, as a model's pasted masks arrive).
    """
    import torch

    from detector.structures import Boxes, Instances

    contiguous = {cat["id"]: k for k, cat in enumerate(sorted(gt["categories"],
                                                              key=lambda c: c["id"]))}
    by_image: Dict[int, List[dict]] = {img["id"]: [] for img in gt["images"]}
    for record in results:
        by_image[record["image_id"]].append(record)
    for img in gt["images"]:
        records = by_image[img["id"]]
        xywh = torch.tensor([r["bbox"] for r in records], dtype=torch.float64).reshape(-1, 4)
        boxes = torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1).float()
        instances = Instances(
            (img["height"], img["width"]), pred_boxes=Boxes(boxes),
            scores=torch.tensor([r["score"] for r in records], dtype=torch.float32),
            pred_classes=torch.tensor([contiguous[r["category_id"]] for r in records],
                                      dtype=torch.int64))
        if with_masks:
            masks = torch.zeros(len(records), img["height"], img["width"], dtype=torch.bool)
            for k, (x1, y1, x2, y2) in enumerate(boxes.round().int().tolist()):
                masks[k, max(y1, 0):y2, max(x1, 0):x2] = True
            instances.pred_masks = masks
        yield ({"image_id": img["id"], "height": img["height"], "width": img["width"]},
               {"instances": instances})
