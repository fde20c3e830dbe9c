"""tools/visualize_data.py, tools/visualize_predictions.py and tools/demo.py write PNGs of the
right size whose drawings are those of detector.utils.visualizer (box outlines in the class
colour), and end bad input with one line."""
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_util

from detector.checkpoint import DetectionCheckpointer
from detector.config import get_cfg
from detector.data import DatasetCatalog, MetadataCatalog, read_image, register_coco_instances
from detector.data.datasets.synthetic import SHAPES_CLASSES, generate_shapes_dataset
from detector.engine import DefaultPredictor, annotations_to_arrays, instances_to_arrays
from detector.modeling import build_model
from detector.utils.visualizer import class_color, draw_instances
from tool_loader import load_tool

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "configs", "demo", "retinanet_tiny_shapes.yaml")
MASK_CONFIG = os.path.join(ROOT, "configs", "demo", "mask_rcnn_tiny_shapes.yaml")
DATASET = "_test_visualize_tools_shapes"
SIZE = 112  # the smallest shapes image
PAIR_WIDTH = 2 * SIZE + 4  # ground truth | predictions
TINY = [
    "MODEL.TINYNET.CHANNELS", "[8, 8, 16, 16, 16]", "MODEL.NECK.OUT_CHANNELS", "16",
    "MODEL.GN.NUM_GROUPS", "4", "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64",
    "INPUT.MIN_SIZE_TRAIN", "(96,)", "INPUT.MAX_SIZE_TRAIN", "96", "DATALOADER.NUM_WORKERS", "0",
    "SOLVER.IMS_PER_BATCH", "2", "SEED", "3",
    "DATASETS.TRAIN", f"('{DATASET}',)", "DATASETS.TEST", f"('{DATASET}',)",
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A 3-image shapes dataset (RLE masks) and a random-weight tiny RetinaNet whose scores
    spread around 0.3."""
    folder = tmp_path_factory.mktemp("visualize_tools")
    json_file = generate_shapes_dataset(str(folder / "data"), 3, seed=21, image_size=SIZE)
    register_coco_instances(DATASET, {"thing_classes": list(SHAPES_CLASSES)}, json_file,
                            str(folder / "data" / "images"))
    cfg = get_cfg()
    cfg.merge_from_file(CONFIG)
    cfg.merge_from_list(TINY + ["OUTPUT_DIR", str(folder / "out")])
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():
        model.head.cls_score.weight.normal_(0, 0.05)
        model.head.cls_score.bias.fill_(-0.85)
    DetectionCheckpointer(model, str(folder)).save("model_final")
    weights = str(folder / "model_final.pth")
    cfg.merge_from_list(["MODEL.WEIGHTS", weights])
    yield {"folder": folder, "cfg": cfg, "opts": TINY + ["MODEL.WEIGHTS", weights],
           "dicts": DatasetCatalog.get(DATASET)}
    DatasetCatalog.remove(DATASET)
    MetadataCatalog.remove(DATASET)


def _png(path):
    with Image.open(path) as img:
        assert img.format == "PNG"
        return np.asarray(img.convert("RGB"))


def _has_outline(picture, box, colour):
    """Some edge midpoint of the XYXY ``box`` (as draw_instances rounds it) has ``colour``."""
    x0, y0 = int(round(box[0])), int(round(box[1]))
    x1, y1 = int(round(box[2])) - 1, int(round(box[3])) - 1
    xm, ym = (x0 + x1) // 2, (y0 + y1) // 2
    points = [(ym, x0), (ym, x1), (y1, xm), (y0, xm)]
    return any(tuple(picture[y, x]) == tuple(colour) for y, x in points)


def _ground_truth_drawing(dataset_dict):
    image = read_image(dataset_dict["file_name"], "RGB")
    arrays = annotations_to_arrays(dataset_dict["annotations"], *image.shape[:2])
    return image, arrays, draw_instances(image, class_names=list(SHAPES_CLASSES), **arrays)


# --------------------------------------------------------------------------------------------
# visualize_data.py
# --------------------------------------------------------------------------------------------
def test_visualize_data_annotations(setup, tmp_path):
    written = load_tool("visualize_data").main([
        "--config-file", CONFIG, "--source", "annotation", "--output-dir", str(tmp_path),
        "--num-images", "2", *TINY])
    assert [os.path.basename(p) for p in written] == [f"{d['image_id']}.png"
                                                     for d in setup["dicts"][:2]]
    for path, d in zip(written, setup["dicts"]):
        picture = _png(path)
        assert picture.shape == (SIZE, SIZE, 3)
        _, arrays, expected = _ground_truth_drawing(d)
        assert arrays["masks"] is not None and arrays["masks"].any()
        np.testing.assert_array_equal(picture, expected)
        assert any(_has_outline(picture, b, class_color(c))
                   for b, c in zip(arrays["boxes"], arrays["classes"]))
    # --scale enlarges image and drawing alike
    enlarged = load_tool("visualize_data").main([
        "--config-file", CONFIG, "--source", "annotation", "--output-dir", str(tmp_path / "x2"),
        "--num-images", "1", "--scale", "2", *TINY])
    picture = _png(enlarged[0])
    assert picture.shape == (2 * SIZE, 2 * SIZE, 3)
    _, arrays, _ = _ground_truth_drawing(setup["dicts"][0])
    assert any(_has_outline(picture, 2 * b, class_color(c))
               for b, c in zip(arrays["boxes"], arrays["classes"]))


def test_visualize_data_dataloader_with_masks(setup, tmp_path):
    # Mask R-CNN config: the loader's instances carry polygon masks, resized to 96 px
    written = load_tool("visualize_data").main([
        "--config-file", MASK_CONFIG, "--output-dir", str(tmp_path), "--num-images", "4",
        *TINY, "INPUT.RANDOM_FLIP", "horizontal"])
    assert len(written) == 4
    ids = [os.path.basename(p) for p in written]
    # 3 images, 4 samples: some image is drawn twice, under a numbered name
    assert len(set(ids)) == 4 and any("_1.png" in name for name in ids)
    # the same samples (same SEED) without masks: only the mask tint differs
    without_masks = load_tool("visualize_data").main([
        "--config-file", MASK_CONFIG, "--output-dir", str(tmp_path / "boxes"), "--num-images",
        "4", *TINY, "INPUT.RANDOM_FLIP", "horizontal", "MODEL.MASK_ON", "False"])
    for path, plain_path in zip(written, without_masks):
        picture, plain = _png(path), _png(plain_path)
        assert picture.shape == plain.shape == (96, 96, 3)
        colours = {tuple(p) for p in picture.reshape(-1, 3)}
        assert any(class_color(c) in colours for c in range(3))
        tinted = (picture != plain).any(axis=2)
        assert 0.02 < tinted.mean() < 0.6


def test_visualize_data_bad_input_is_one_line(setup, tmp_path):
    with pytest.raises(SystemExit) as info:
        load_tool("visualize_data").main([
            "--config-file", CONFIG, "--output-dir", str(tmp_path), *TINY,
            "DATASETS.TRAIN", "('no_such_dataset',)"])
    message = str(info.value)
    assert message.startswith("visualize_data.py: error:") and "no_such_dataset" in message
    assert "\n" not in message


# --------------------------------------------------------------------------------------------
# visualize_predictions.py
# --------------------------------------------------------------------------------------------
def test_visualize_predictions_from_model(setup, tmp_path):
    predictor = DefaultPredictor(setup["cfg"])
    written = load_tool("visualize_predictions").main([
        "--config-file", CONFIG, "--output-dir", str(tmp_path), "--num-images", "2",
        "--score-threshold", "0.25", *setup["opts"]])
    assert len(written) == 2
    for path, d in zip(written, setup["dicts"]):
        assert os.path.basename(path) == f"{d['image_id']}.png"
        picture = _png(path)
        assert picture.shape == (SIZE, PAIR_WIDTH, 3)
        image, _, expected_gt = _ground_truth_drawing(d)
        np.testing.assert_array_equal(picture[:, :SIZE], expected_gt)
        predictions = instances_to_arrays(predictor(image))
        kept = predictions["scores"] >= 0.25
        assert kept.any(), "the test needs detections above the threshold"
        expected = draw_instances(image, class_names=list(SHAPES_CLASSES), score_threshold=0.25,
                                  **predictions)
        right = picture[:, SIZE + 4:]
        # the same predictions as DefaultPredictor's, drawn the same way
        assert (right != expected).any(axis=2).mean() < 0.01
        assert any(_has_outline(right, b, class_color(c)) for b, c in
                   zip(predictions["boxes"][kept], predictions["classes"][kept]))


def test_visualize_predictions_from_results_json(setup, tmp_path):
    d = setup["dicts"][0]
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8, order="F")
    mask[30:60, 40:80] = 1
    rle = mask_util.encode(mask)
    rle["counts"] = rle["counts"].decode("ascii")
    results = [
        # square (dataset id 2), XYWH
        {"image_id": d["image_id"], "category_id": 2, "bbox": [40.0, 30.0, 40.0, 30.0],
         "score": 0.9, "segmentation": rle},
        {"image_id": d["image_id"], "category_id": 3, "bbox": [5.0, 70.0, 30.0, 30.0],
         "score": 0.2, "segmentation": rle},
    ]
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    written = load_tool("visualize_predictions").main([
        "--results-json", str(path), "--dataset", DATASET, "--output-dir", str(tmp_path / "vis"),
        "--num-images", "1", "--score-threshold", "0.5"])
    picture = _png(written[0])
    assert picture.shape == (SIZE, PAIR_WIDTH, 3)
    image, _, expected_gt = _ground_truth_drawing(d)
    np.testing.assert_array_equal(picture[:, :SIZE], expected_gt)
    right = picture[:, SIZE + 4:]
    assert tuple(right[45, 40]) == tuple(right[45, 79]) == class_color(1)
    assert tuple(right[59, 60]) == class_color(1)
    # the mask is tinted, the low-score detection is not drawn
    assert tuple(right[45, 60]) != tuple(image[45, 60])
    assert not any(tuple(right[y, 5]) == class_color(2) for y in range(70, 100))

    results[0]["category_id"] = 9
    path.write_text(json.dumps(results))
    with pytest.raises(SystemExit, match=r"^visualize_predictions.py: error: .*category id\(s\) "
                                         r"\[9\]"):
        load_tool("visualize_predictions").main([
            "--results-json", str(path), "--dataset", DATASET, "--output-dir", str(tmp_path)])


# --------------------------------------------------------------------------------------------
# demo.py
# --------------------------------------------------------------------------------------------
def test_demo_on_an_image_and_a_folder(setup, tmp_path):
    files = [d["file_name"] for d in setup["dicts"]]
    folder = tmp_path / "inputs"
    folder.mkdir()
    for f in files[1:]:
        shutil.copy(f, folder / ("copy_" + os.path.basename(f)))
    (folder / "notes.txt").write_text("not an image")
    threshold = 0.3
    # the overrides right after --input's paths are told apart from them
    written = load_tool("demo").main([
        "--config-file", CONFIG, "--output", str(tmp_path / "out"), "--score-threshold",
        str(threshold), "--input", files[0], str(folder), *setup["opts"]])
    expected_names = [os.path.splitext(os.path.basename(files[0]))[0] + ".png"] + sorted(
        "copy_" + os.path.splitext(os.path.basename(f))[0] + ".png" for f in files[1:])
    assert [os.path.basename(p) for p in written] == expected_names
    predictor = DefaultPredictor(setup["cfg"])
    for path, source in zip(written, files):
        picture = _png(path)
        assert picture.shape == (SIZE, SIZE, 3)
        image = read_image(source, "RGB")
        predictions = instances_to_arrays(predictor(image))
        kept = predictions["scores"] >= threshold
        assert kept.any(), "the test needs detections above the threshold"
        np.testing.assert_array_equal(picture, draw_instances(
            image, class_names=list(SHAPES_CLASSES), score_threshold=threshold, **predictions))
        assert any(_has_outline(picture, b, class_color(c)) for b, c in
                   zip(predictions["boxes"][kept], predictions["classes"][kept]))


def test_demo_bad_input_is_one_line(setup, tmp_path):
    demo = load_tool("demo")
    with pytest.raises(SystemExit, match=r"^demo.py: error: --input .*absent.png: no such file"):
        demo.main(["--config-file", CONFIG, "--input", str(tmp_path / "absent.png"),
                   "--output", str(tmp_path / "out"), *setup["opts"]])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit, match=r"^demo.py: error: --input .*empty: the folder has no"):
        demo.main(["--config-file", CONFIG, "--input", str(empty), "--output",
                   str(tmp_path / "out"), *setup["opts"]])


def test_demo_video(setup, tmp_path):
    video = tmp_path / "clip.mp4"
    try:
        import av
    except ImportError:
        # without PyAV a video input is a one-line error naming the package, before any work
        video.write_bytes(b"\x00" * 16)
        with pytest.raises(SystemExit, match=r"^demo.py: error: video input needs PyAV: "
                                             r"pip install av"):
            load_tool("demo").main(["--config-file", CONFIG, "--input", str(video), "--output",
                                    str(tmp_path / "out"), *setup["opts"]])
        return
    frames = [read_image(d["file_name"], "RGB") for d in setup["dicts"]]
    with av.open(str(video), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=5)
        stream.height, stream.width, stream.pix_fmt = SIZE, SIZE, "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    written = load_tool("demo").main([
        "--config-file", CONFIG, "--input", str(video), "--output", str(tmp_path / "out"),
        "--score-threshold", "0.3", *setup["opts"]])
    assert [os.path.basename(p) for p in written] == ["clip.mp4"]
    with av.open(written[0]) as container:
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(decoded) == len(frames) and decoded[0].shape == (SIZE, SIZE, 3)
