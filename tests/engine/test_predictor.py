"""DefaultPredictor gives the detections tools/test_net.py writes for the same image and
checkpoint (EMA weights preferred alike), in the image's pixel coordinates."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from detector.checkpoint import DetectionCheckpointer
from detector.config import get_cfg
from detector.data import DatasetCatalog, MetadataCatalog, read_image, register_coco_instances
from detector.engine import DefaultPredictor
from detector.modeling import build_model
from detector.solver import ModelEMA
from tool_loader import load_tool

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "configs", "demo", "retinanet_tiny_shapes.yaml")
DATASET = "_test_predictor_one_image"
CATEGORY_IDS = [3, 7, 11]  # dataset ids, not contiguous: the results json maps them
# a non-square image of another size than the 64 px network input: resize and rescale both run
IMAGE_HW = (90, 120)
TINY = [
    "MODEL.TINYNET.CHANNELS", "[8, 8, 16, 16, 16]", "MODEL.NECK.OUT_CHANNELS", "16",
    "MODEL.GN.NUM_GROUPS", "4", "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "96",
    "DATALOADER.NUM_WORKERS", "0", "TEST.DETECTIONS_PER_IMAGE", "30", "SOLVER.EMA.ENABLED", "True",
    "SEED", "3", "LOG_PERIOD", "100",
]


def _write_dataset(folder):
    """One image with a few coloured rectangles and its COCO json."""
    rng = np.random.default_rng(0)
    h, w = IMAGE_HW
    pixels = rng.integers(0, 60, size=(h, w, 3), dtype=np.uint8)
    for k in range(4):
        y, x = int(rng.integers(0, h - 30)), int(rng.integers(0, w - 30))
        pixels[y:y + 25, x:x + 28] = rng.integers(80, 255, size=3, dtype=np.uint8)
    os.makedirs(folder / "images", exist_ok=True)
    Image.fromarray(pixels).save(folder / "images" / "a.png")  # lossless: both read the same
    gt = {"images": [{"id": 5, "file_name": "a.png", "height": h, "width": w}],
          "annotations": [{"id": 1, "image_id": 5, "category_id": 7, "bbox": [10., 10., 28., 25.],
                           "area": 700.0, "iscrowd": 0}],
          "categories": [{"id": c, "name": f"c{c}"} for c in CATEGORY_IDS]}
    json_file = folder / "gt.json"
    json_file.write_text(json.dumps(gt))
    return str(json_file), str(folder / "images")


def _save_checkpoint(cfg, out_dir):
    """Random weights whose class scores spread around 0.3 (so there are detections above the
    0.05 threshold), and EMA weights that differ from them."""
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():
        model.head.cls_score.weight.normal_(0, 0.05)
        model.head.cls_score.bias.fill_(-0.85)
        model.head.bbox_pred.weight.normal_(0, 0.02)
    ema = ModelEMA(model, decay=0.5)
    with torch.no_grad():
        for p in ema.module.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    DetectionCheckpointer(model, str(out_dir), ema=ema).save("model_final")
    return str(out_dir / "model_final.pth")


@pytest.fixture
def saved_model(tmp_path):
    json_file, image_root = _write_dataset(tmp_path / "data")
    register_coco_instances(DATASET, {}, json_file, image_root)
    opts = TINY + ["DATASETS.TEST", f"('{DATASET}',)", "OUTPUT_DIR", str(tmp_path / "out")]
    cfg = get_cfg()
    cfg.merge_from_file(CONFIG)
    cfg.merge_from_list(opts)
    weights = _save_checkpoint(cfg, tmp_path)
    cfg.merge_from_list(["MODEL.WEIGHTS", weights])
    yield cfg, opts + ["MODEL.WEIGHTS", weights], os.path.join(image_root, "a.png")
    DatasetCatalog.remove(DATASET)
    MetadataCatalog.remove(DATASET)


def _sorted_records(boxes_xywh, scores, category_ids):
    rows = [(-float(s), int(c), *[float(v) for v in b])
            for b, s, c in zip(boxes_xywh, scores, category_ids)]
    return np.array(sorted(rows), dtype=np.float64).reshape(-1, 6)


def _predictor_records(instances):
    boxes = instances.pred_boxes.tensor.numpy().astype(np.float64)
    xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)
    categories = [CATEGORY_IDS[c] for c in instances.pred_classes.tolist()]
    return _sorted_records(xywh, instances.scores.numpy(), categories)


def test_predictor_matches_test_net(saved_model):
    cfg, opts, image_path = saved_model
    load_tool("test_net").cli(["--config-file", CONFIG, *opts])
    results_file = os.path.join(cfg.OUTPUT_DIR, "inference", DATASET,
                                "coco_instances_results.json")
    with open(results_file) as f:
        records = json.load(f)
    assert len(records) >= 5, "the test needs detections to compare"
    assert {r["image_id"] for r in records} == {5}
    expected = _sorted_records([r["bbox"] for r in records], [r["score"] for r in records],
                               [r["category_id"] for r in records])

    predictor = DefaultPredictor(cfg)
    instances = predictor(read_image(image_path, cfg.INPUT.FORMAT))
    assert instances.image_size == IMAGE_HW
    got = _predictor_records(instances)
    assert got.shape == expected.shape
    np.testing.assert_array_equal(got[:, 1], expected[:, 1])              # classes
    np.testing.assert_allclose(-got[:, 0], -expected[:, 0], rtol=0, atol=1e-5)  # scores
    np.testing.assert_allclose(got[:, 2:], expected[:, 2:], rtol=0, atol=1e-3)  # boxes, px
    # boxes reach beyond the 64 px network input: they are in the original image's pixels
    assert got[:, 2].max() + got[:, 4].max() > 64

    # the EMA weights are the ones used: the raw model weights give other scores
    cfg_raw = cfg.clone()
    cfg_raw.merge_from_list(["SOLVER.EMA.ENABLED", "False"])
    raw = _predictor_records(DefaultPredictor(cfg_raw)(read_image(image_path, cfg.INPUT.FORMAT)))
    assert raw.shape != got.shape or np.abs(raw[:, 0] - got[:, 0]).max() > 1e-4


@pytest.mark.parametrize("image, fragment", [
    (np.zeros((32, 32), dtype=np.uint8), r"shape \(H, W, 3\) in RGB, got shape \(32, 32\)"),
    (np.zeros((32, 32, 4), dtype=np.uint8), r"got shape \(32, 32, 4\)"),
    (np.zeros((32, 32, 3), dtype=np.float32), r"uint8 image \(0-255\) in RGB, got dtype float32"),
    (torch.zeros(32, 32, 3, dtype=torch.uint8), r"numpy array .* got Tensor"),
])
def test_bad_image_is_a_one_line_error(saved_model, image, fragment):
    cfg, _, _ = saved_model
    predictor = DefaultPredictor(cfg)
    with pytest.raises(ValueError, match=fragment) as info:
        predictor(image)
    assert "\n" not in str(info.value)


def test_empty_weights_are_refused():
    cfg = get_cfg()
    cfg.merge_from_file(CONFIG)
    with pytest.raises(ValueError, match=r"MODEL.WEIGHTS is empty"):
        DefaultPredictor(cfg)


def test_test_amp_runs_the_network_in_bf16_and_postprocessing_in_fp32(saved_model):
    cfg, _, image_path = saved_model
    image = read_image(image_path, cfg.INPUT.FORMAT)
    fp32 = DefaultPredictor(cfg)(image)
    amp_cfg = cfg.clone()
    amp_cfg.merge_from_list(["TEST.AMP.ENABLED", "True"])
    predictor = DefaultPredictor(amp_cfg)
    head_dtypes = []
    predictor.model.head.register_forward_hook(
        lambda module, inputs, outputs: head_dtypes.append(outputs[0][0].dtype))
    amp = predictor(image)
    assert head_dtypes == [torch.bfloat16]
    assert amp.scores.dtype == amp.pred_boxes.tensor.dtype == torch.float32
    assert len(amp) > 0 and len(fp32) > 0
    # bf16 keeps ~3 significant digits: the best detection moves, but little
    assert int(amp.pred_classes[0]) == int(fp32.pred_classes[0])
    assert abs(float(amp.scores[0]) - float(fp32.scores[0])) < 0.02
    assert float((amp.pred_boxes.tensor[0] - fp32.pred_boxes.tensor[0]).abs().max()) < 2.0
