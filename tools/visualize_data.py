#!/usr/bin/env python
r"""Draw training samples with their boxes, class names and masks to PNG files.

    # what the model trains on: the training loader, after the configured augmentation
    python tools/visualize_data.py --config-file configs/demo/mask_rcnn_tiny_shapes.yaml \
        --output-dir vis/train --num-images 16
    # the raw annotations on the original images
    python tools/visualize_data.py --config-file cfg.yaml --source annotation --output-dir vis/raw

The images come from DATASETS.TRAIN; files are named <image_id>.png (<image_id>_<k>.png when an
image is drawn again, e.g. by the loader's sampling with another augmentation). Config overrides
(KEY VALUE) may follow, e.g. INPUT.RANDOM_FLIP horizontal. Bad input ends with one line
"visualize_data.py: error: ...".
"""
import argparse
import itertools
import logging
import os
import sys
from collections import Counter

import numpy as np

from detector.data import (
    DatasetCatalog,
    MetadataCatalog,
    build_detection_train_loader,
    read_image,
)
from detector.engine import annotations_to_arrays, instances_to_arrays, setup_cfg
from detector.engine.cli import CommandLineParser
from detector.utils.logger import setup_logger
from detector.utils.visualizer import draw_instances, save_image, scale_for_display

PROG = "visualize_data.py"
logger = logging.getLogger("detector")


def build_parser():
    parser = CommandLineParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--source", choices=["dataloader", "annotation"], default="dataloader",
                        help="dataloader: after the training augmentation (default); "
                             "annotation: the dataset's annotations on the original images")
    parser.add_argument("--output-dir", required=True, help="folder for the PNG files")
    parser.add_argument("--num-images", type=int, default=20, help="how many images (default 20)")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="enlarge the images by this factor before drawing (default 1)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=None,
                        help="config overrides as KEY VALUE pairs")
    return parser


def _class_names(dataset_names):
    return MetadataCatalog.get(dataset_names[0]).get("thing_classes") if dataset_names else None


def to_rgb(image_chw, image_format: str) -> np.ndarray:
    """The loader's (C, H, W) uint8 tensor in ``image_format`` as (H, W, 3) uint8 RGB."""
    image = image_chw.numpy().transpose(1, 2, 0)
    if image_format == "BGR":
        image = image[:, :, ::-1]
    return np.ascontiguousarray(image.astype(np.uint8))


def dataloader_samples(cfg, num_images: int):
    """(image_id, RGB image, drawing arrays) of the first ``num_images`` training samples."""
    loader = build_detection_train_loader(cfg)
    samples = itertools.chain.from_iterable(loader)
    for mapped in itertools.islice(samples, num_images):
        arrays = instances_to_arrays(mapped["instances"])
        yield mapped.get("image_id"), to_rgb(mapped["image"], cfg.INPUT.FORMAT), arrays


def annotation_samples(cfg, num_images: int):
    """(image_id, RGB image, drawing arrays) of the first ``num_images`` dataset dicts."""
    dicts = itertools.chain.from_iterable(DatasetCatalog.get(n) for n in cfg.DATASETS.TRAIN)
    for d in itertools.islice(dicts, num_images):
        image = read_image(d["file_name"], "RGB")
        arrays = annotations_to_arrays(d.get("annotations", []), *image.shape[:2])
        yield d.get("image_id"), image, arrays


def unique_path(output_dir: str, image_id, seen: Counter) -> str:
    """<image_id>.png, then <image_id>_1.png, <image_id>_2.png ... for repeats."""
    seen[image_id] += 1
    suffix = "" if seen[image_id] == 1 else f"_{seen[image_id] - 1}"
    return os.path.join(output_dir, f"{image_id}{suffix}.png")


def main(argv=None):
    """Write the pictures; returns their paths."""
    args = build_parser().parse_args(argv)
    if args.num_images <= 0 or args.scale <= 0:
        raise SystemExit(f"{PROG}: error: --num-images and --scale must be positive, got "
                         f"{args.num_images} and {args.scale}")
    setup_logger(None, name="detector")
    try:
        cfg = setup_cfg(args)
        if not cfg.DATASETS.TRAIN:
            raise ValueError("DATASETS.TRAIN is empty: nothing to draw")
        class_names = _class_names(cfg.DATASETS.TRAIN)
        samples = (dataloader_samples if args.source == "dataloader"
                   else annotation_samples)(cfg, args.num_images)
        written, seen = [], Counter()
        for image_id, image, arrays in samples:
            if class_names is None:  # custom datasets set their classes when loaded
                class_names = _class_names(cfg.DATASETS.TRAIN)
            path = unique_path(args.output_dir, image_id, seen)
            image, arrays = scale_for_display(image, args.scale, **arrays)
            save_image(draw_instances(image, class_names=class_names, **arrays), path)
            written.append(path)
    except (ValueError, KeyError, OSError, RuntimeError) as err:
        message = " ".join(str(err).split())
        raise SystemExit(f"{PROG}: error: {message}") from None
    logger.info("Wrote %d image(s) (%s) to %s", len(written), args.source, args.output_dir)
    return written


if __name__ == "__main__":
    main(sys.argv[1:])
