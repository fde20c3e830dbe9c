#!/usr/bin/env python
r"""Run a trained model on your own images or videos and write the drawn predictions.

    python tools/demo.py --config-file configs/demo/retinanet_tiny_shapes.yaml \
        --input photo.jpg more_photos/ clip.mp4 --output demo_out \
        MODEL.WEIGHTS output/demo/model_final.pth [--score-threshold 0.5]

Inputs: image files, folders (their images, not recursive) or video files (.mp4, .avi, .mov,
.mkv, .webm). An image becomes <output>/<name>.png; a video becomes <output>/<name>.mp4, a video
(MPEG-4) of the drawn frames at the input's frame rate; <name>_1 ... when a name repeats.
Videos need PyAV (pip install av). Class names come from the metadata of DATASETS.TEST[0] (else
DATASETS.TRAIN[0]). Config overrides (KEY VALUE) may follow. Bad input ends with one line
"demo.py: error: ...".
"""
import argparse
import logging
import os
import re
import sys
from fractions import Fraction

import numpy as np

from detector.data import ImageLoadError, MetadataCatalog, read_image
from detector.engine import DefaultPredictor, instances_to_arrays, setup_cfg
from detector.engine.cli import CommandLineParser
from detector.utils.logger import setup_logger
from detector.utils.visualizer import draw_instances, save_image

PROG = "demo.py"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm")
logger = logging.getLogger("detector")


def build_parser():
    parser = CommandLineParser(prog=PROG, description=__doc__.split("\n\n")[0],
                               formatter_class=argparse.RawDescriptionHelpFormatter,
                               epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--input", nargs="+", required=True, metavar="PATH",
                        help="image files, folders of images, or video files")
    parser.add_argument("--output", required=True, metavar="DIR",
                        help="folder for the drawn images (PNG) and videos (MP4)")
    parser.add_argument("--score-threshold", type=float, default=0.5,
                        help="draw predictions scoring at least this (default 0.5)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=None,
                        help="config overrides as KEY VALUE pairs, e.g. MODEL.WEIGHTS model.pth")
    return parser


# "MODEL.WEIGHTS": a KEY of the overrides that --input's list took in
_CONFIG_KEY = re.compile(r"^[A-Z][A-Z0-9_]*(\.[A-Z0-9_]+)+$")


def split_overrides(inputs):
    """--input takes every token up to the next flag: the first token that is not a file but a
    config KEY starts the KEY VALUE overrides. Returns (inputs, overrides)."""
    for i, token in enumerate(inputs):
        if _CONFIG_KEY.match(token) and not os.path.exists(token):
            return inputs[:i], inputs[i:]
    return inputs, []


def expand_inputs(paths):
    """(kind, path) with kind "image" or "video"; folders give their images, sorted."""
    items = []
    for path in paths:
        if os.path.isdir(path):
            names = sorted(n for n in os.listdir(path) if n.lower().endswith(IMAGE_EXTENSIONS))
            if not names:
                raise ValueError(f"--input {path}: the folder has no images "
                                 f"({', '.join(IMAGE_EXTENSIONS)})")
            items.extend(("image", os.path.join(path, n)) for n in names)
        elif not os.path.isfile(path):
            raise ValueError(f"--input {path}: no such file or folder")
        elif path.lower().endswith(VIDEO_EXTENSIONS):
            items.append(("video", path))
        else:
            items.append(("image", path))
    return items


def output_path(output_dir: str, path: str, extension: str, taken) -> str:
    """<output_dir>/<name><extension>, or <name>_<k><extension> if an earlier input took it."""
    stem = os.path.splitext(os.path.basename(path))[0]
    out, k = os.path.join(output_dir, stem + extension), 0
    while out in taken:
        k += 1
        out = os.path.join(output_dir, f"{stem}_{k}{extension}")
    return out


def _import_av():
    try:
        import av
    except ImportError:
        raise ValueError("video input needs PyAV: pip install av "
                         "(or pip install -e .[video])") from None
    return av


class Demo:
    """A ``DefaultPredictor`` and the drawing of its predictions on RGB images."""

    def __init__(self, cfg, score_threshold: float):
        self.predictor = DefaultPredictor(cfg)
        self.input_format = cfg.INPUT.FORMAT
        self.score_threshold = float(score_threshold)
        datasets = list(cfg.DATASETS.TEST) or list(cfg.DATASETS.TRAIN)
        self.class_names = (MetadataCatalog.get(datasets[0]).get("thing_classes")
                            if datasets else None)

    def draw(self, image_rgb: np.ndarray) -> np.ndarray:
        """Predictions on one (H, W, 3) uint8 RGB image, drawn."""
        image = image_rgb[:, :, ::-1] if self.input_format == "BGR" else image_rgb
        instances = self.predictor(np.ascontiguousarray(image))
        return draw_instances(image_rgb, class_names=self.class_names,
                              score_threshold=self.score_threshold,
                              **instances_to_arrays(instances))

    def run_image(self, path: str, out: str) -> str:
        """The drawn predictions of image file ``path``, as PNG ``out``."""
        save_image(self.draw(read_image(path, "RGB")), out)
        return out

    def run_video(self, path: str, out: str) -> str:
        """Every frame of ``path`` drawn, into the MPEG-4 video ``out`` at the input's rate."""
        av = _import_av()
        tmp = out + ".tmp.mp4"
        num_frames = 0
        try:
            with av.open(path) as source, av.open(tmp, mode="w") as sink:
                if not source.streams.video:
                    raise ValueError(f"{path}: no video stream")
                video = source.streams.video[0]
                rate = video.average_rate or video.guessed_rate or Fraction(25)
                stream = None
                for frame in source.decode(video):
                    drawn = self.draw(frame.to_ndarray(format="rgb24"))
                    if stream is None:
                        stream = sink.add_stream("mpeg4", rate=Fraction(rate))
                        # yuv420p needs even sizes
                        stream.height = drawn.shape[0] - drawn.shape[0] % 2
                        stream.width = drawn.shape[1] - drawn.shape[1] % 2
                        stream.pix_fmt = "yuv420p"
                    drawn = np.ascontiguousarray(drawn[:stream.height, :stream.width])
                    for packet in stream.encode(av.VideoFrame.from_ndarray(drawn,
                                                                           format="rgb24")):
                        sink.mux(packet)
                    num_frames += 1
                if stream is None:
                    raise ValueError(f"{path}: the video has no frames")
                for packet in stream.encode():  # flush the encoder
                    sink.mux(packet)
            os.replace(tmp, out)
        except av.error.FFmpegError as err:
            raise ValueError(f"{path}: cannot read or write the video: {err}") from None
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        logger.info("%s: %d frame(s) -> %s", path, num_frames, out)
        return out


def main(argv=None):
    """Write the drawn predictions of every input; returns the written paths."""
    args = build_parser().parse_args(argv)
    args.input, overrides = split_overrides(args.input)
    args.opts = overrides + list(args.opts or [])
    setup_logger(None, name="detector")
    try:
        if not args.input:
            raise ValueError("--input needs at least one image, folder or video")
        items = expand_inputs(args.input)
        if any(kind == "video" for kind, _ in items):
            _import_av()  # fail before the model is built
        cfg = setup_cfg(args)
        demo = Demo(cfg, args.score_threshold)
        os.makedirs(args.output, exist_ok=True)
        written = []
        for kind, path in items:
            out = output_path(args.output, path, ".mp4" if kind == "video" else ".png", written)
            run = demo.run_video if kind == "video" else demo.run_image
            written.append(run(path, out))
    except (ValueError, KeyError, OSError, RuntimeError, ImageLoadError) as err:
        message = " ".join(str(err).split())
        raise SystemExit(f"{PROG}: error: {message}") from None
    logger.info("Wrote %d file(s) to %s", len(written), args.output)
    return written


if __name__ == "__main__":
    main(sys.argv[1:])
