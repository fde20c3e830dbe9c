#!/usr/bin/env python
r"""Draw a model's predictions next to the ground truth, to PNG files: for each image the
ground truth on the left and the predictions (boxes, class names, scores, masks) above
--score-threshold on the right.

From a model (run on the first --num-images images of the dataset, as tools/test_net.py does):
    python tools/visualize_predictions.py --config-file cfg.yaml --output-dir vis/pred \
        MODEL.WEIGHTS output/model_final.pth [--dataset NAME (default DATASETS.TEST[0])]

From a saved COCO results file (e.g. OUTPUT_DIR/inference/<dataset>/coco_instances_results.json;
category ids are mapped back with the dataset's metadata, masks from RLE "segmentation"):
    python tools/visualize_predictions.py --results-json results.json --dataset coco_2017_val \
        --output-dir vis/pred --score-threshold 0.3

Files are named <image_id>.png. Bad input ends with one line "visualize_predictions.py: error: ...".
"""
import argparse
import itertools
import json
import logging
import os
import sys
from collections import defaultdict

import numpy as np
import torch
from pycocotools import mask as mask_util

from detector.data import (
    DatasetCatalog,
    MetadataCatalog,
    build_detection_test_loader,
    read_image,
)
from detector.engine import (
    DefaultTrainer,
    annotations_to_arrays,
    draw_ground_truth_and_predictions,
    instances_to_arrays,
    setup_cfg,
)
from detector.engine.cli import CommandLineParser
from detector.engine.defaults import check_num_classes
from detector.utils.logger import setup_logger
from detector.utils.visualizer import save_image

PROG = "visualize_predictions.py"
logger = logging.getLogger("detector")


def build_parser():
    parser = CommandLineParser(prog=PROG, description=__doc__.split("\n\n")[0],
                               formatter_class=argparse.RawDescriptionHelpFormatter,
                               epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--config-file", default="", metavar="FILE",
                        help="config of the model (with MODEL.WEIGHTS among the overrides)")
    parser.add_argument("--results-json", default="", help="COCO results file to draw instead")
    parser.add_argument("--dataset", default="",
                        help="registered dataset (default with a config: DATASETS.TEST[0])")
    parser.add_argument("--output-dir", required=True, help="folder for the PNG files")
    parser.add_argument("--num-images", type=int, default=20, help="how many images (default 20)")
    parser.add_argument("--score-threshold", type=float, default=0.5,
                        help="draw predictions scoring at least this (default 0.5)")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="enlarge the images by this factor before drawing (default 1)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=None,
                        help="config overrides as KEY VALUE pairs")
    return parser


def _ground_truth(dataset_dict, image):
    return annotations_to_arrays(dataset_dict.get("annotations", []), *image.shape[:2])


def model_pictures(cfg, dataset_name: str, num_images: int, score_threshold: float,
                   scale: float = 1.0):
    """(image_id, picture) of the model's predictions on the first ``num_images`` images."""
    model = DefaultTrainer.build_model(cfg)
    DefaultTrainer.load_for_evaluation(cfg, model)
    model.eval()
    loader = build_detection_test_loader(cfg, dataset_name)
    check_num_classes(model, dataset_name)
    dicts = {d["image_id"]: d for d in DatasetCatalog.get(dataset_name)[:num_images]}
    class_names = MetadataCatalog.get(dataset_name).get("thing_classes")
    with torch.no_grad():
        for batch in itertools.islice(loader, num_images):
            outputs = model(batch)
            for inputs, output in zip(batch, outputs):
                image = read_image(inputs["file_name"], "RGB")
                predictions = instances_to_arrays(output["instances"].to(torch.device("cpu")))
                yield inputs["image_id"], draw_ground_truth_and_predictions(
                    image, _ground_truth(dicts[inputs["image_id"]], image), predictions,
                    class_names, score_threshold=score_threshold, scale=scale)


def _load_results(path: str):
    if not os.path.isfile(path):
        raise ValueError(f"{path}: results file not found")
    try:
        with open(path) as f:
            results = json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: malformed results JSON: {err}") from None
    if not isinstance(results, list):
        raise ValueError(f"{path}: a COCO results file is a list of detections, "
                         f"got {type(results).__name__}")
    for i, r in enumerate(results):
        missing = [k for k in ("image_id", "category_id", "bbox", "score")
                   if not isinstance(r, dict) or k not in r]
        if missing:
            raise ValueError(f"{path}: detection {i} lacks key(s) {missing}")
    return results


def results_to_arrays(detections, id_to_contiguous, height: int, width: int, path: str):
    """The drawing arrays of one image's COCO detections (XYWH ``bbox``, dataset category ids,
    optional RLE ``segmentation``)."""
    boxes = np.array([d["bbox"] for d in detections], dtype=np.float64).reshape(-1, 4)
    boxes[:, 2:] += boxes[:, :2]
    unknown = sorted({d["category_id"] for d in detections} - set(id_to_contiguous))
    if unknown:
        raise ValueError(f"{path}: category id(s) {unknown} are not in the dataset's metadata "
                         f"(thing_dataset_id_to_contiguous_id)")
    classes = np.array([id_to_contiguous[d["category_id"]] for d in detections], dtype=np.int64)
    scores = np.array([d["score"] for d in detections], dtype=np.float64)
    masks = None
    if detections and all("segmentation" in d for d in detections):
        masks = np.zeros((len(detections), height, width), dtype=bool)
        for i, d in enumerate(detections):
            rle = dict(d["segmentation"])
            if list(rle.get("size", [])) != [height, width]:
                raise ValueError(f"{path}: segmentation of image {d['image_id']} has size "
                                 f"{rle.get('size')}, the image is {[height, width]}")
            masks[i] = mask_util.decode(rle).astype(bool)
    return {"boxes": boxes, "classes": classes, "scores": scores, "masks": masks}


def results_pictures(results_json: str, dataset_name: str, num_images: int,
                     score_threshold: float, scale: float = 1.0):
    """(image_id, picture) of a results file's detections on the first ``num_images`` images
    of the dataset."""
    results = _load_results(results_json)
    dataset_dicts = DatasetCatalog.get(dataset_name)
    meta = MetadataCatalog.get(dataset_name)
    unknown = sorted({r["image_id"] for r in results} - {d["image_id"] for d in dataset_dicts})
    if unknown:
        shown = ", ".join(str(i) for i in unknown[:5]) + (" ..." if len(unknown) > 5 else "")
        raise ValueError(f"{results_json}: image id(s) {shown} are not in dataset "
                         f"'{dataset_name}'")
    id_map = {int(k): int(v) for k, v in meta.thing_dataset_id_to_contiguous_id.items()}
    by_image = defaultdict(list)
    for r in results:
        by_image[r["image_id"]].append(r)
    for d in dataset_dicts[:num_images]:
        image = read_image(d["file_name"], "RGB")
        predictions = results_to_arrays(by_image[d["image_id"]], id_map, *image.shape[:2],
                                        path=results_json)
        yield d["image_id"], draw_ground_truth_and_predictions(
            image, _ground_truth(d, image), predictions, meta.get("thing_classes"),
            score_threshold=score_threshold, scale=scale)


def main(argv=None):
    """Write the pictures; returns their paths."""
    args = build_parser().parse_args(argv)
    if args.num_images <= 0:
        raise SystemExit(f"{PROG}: error: --num-images must be positive, got {args.num_images}")
    if args.scale <= 0:
        raise SystemExit(f"{PROG}: error: --scale must be positive, got {args.scale}")
    if bool(args.config_file) == bool(args.results_json):
        raise SystemExit(f"{PROG}: error: give either --config-file (with MODEL.WEIGHTS) or "
                         f"--results-json (with --dataset)")
    setup_logger(None, name="detector")
    try:
        if args.results_json:
            if not args.dataset:
                raise ValueError("--results-json needs --dataset, the registered dataset the "
                                 "results are of")
            pictures = results_pictures(args.results_json, args.dataset, args.num_images,
                                        args.score_threshold, args.scale)
        else:
            cfg = setup_cfg(args)
            if not cfg.MODEL.WEIGHTS:
                raise ValueError("MODEL.WEIGHTS is empty: add MODEL.WEIGHTS <checkpoint>")
            dataset = args.dataset or (cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else "")
            if not dataset:
                raise ValueError("no dataset: give --dataset or set DATASETS.TEST")
            pictures = model_pictures(cfg, dataset, args.num_images, args.score_threshold,
                                      args.scale)
        written = []
        for image_id, picture in pictures:
            path = os.path.join(args.output_dir, f"{image_id}.png")
            save_image(picture, path)
            written.append(path)
    except (ValueError, KeyError, OSError, RuntimeError) as err:
        message = " ".join(str(err).split())
        raise SystemExit(f"{PROG}: error: {message}") from None
    logger.info("Wrote %d image(s) to %s", len(written), args.output_dir)
    return written


if __name__ == "__main__":
    main(sys.argv[1:])
