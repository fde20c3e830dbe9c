"""Instances and annotations become drawing arrays, and DefaultTrainer puts ground truth |
prediction pictures of the first TEST.VIS_NUM_IMAGES validation images into TensorBoard after
every evaluation."""
import io
import os

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_util

from detector.data import DatasetCatalog, MetadataCatalog, read_image, register_coco_instances
from detector.data.datasets.synthetic import SHAPES_CLASSES, generate_shapes_dataset
from detector.engine import (
    DefaultTrainer,
    EvalImages,
    annotations_to_arrays,
    default_argument_parser,
    instances_to_arrays,
    setup_cfg,
)
from detector.structures import BitMasks, Boxes, Instances, PolygonMasks
from detector.utils.visualizer import draw_instances

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "configs", "demo", "retinanet_tiny_shapes.yaml")
DATASET = "_test_eval_images_shapes"
IMAGE_SIZE = 112  # the smallest shapes image


def test_instances_to_arrays_predictions_and_ground_truth():
    pred = Instances((20, 30))
    pred.pred_boxes = Boxes(torch.tensor([[1.0, 2.0, 10.0, 12.0]]))
    pred.scores = torch.tensor([0.7])
    pred.pred_classes = torch.tensor([2])
    masks = torch.zeros(1, 20, 30, dtype=torch.bool)
    masks[0, 3:6, 4:8] = True
    pred.pred_masks = masks
    arrays = instances_to_arrays(pred)
    np.testing.assert_allclose(arrays["boxes"], [[1, 2, 10, 12]])
    assert arrays["classes"].tolist() == [2] and arrays["scores"].tolist() == pytest.approx([0.7])
    assert arrays["masks"].dtype == bool and arrays["masks"].sum() == 12

    gt = Instances((20, 30))
    gt.gt_boxes = Boxes(torch.tensor([[0.0, 0.0, 10.0, 10.0], [5, 5, 15, 15]]))
    gt.gt_classes = torch.tensor([0, 1])
    gt.gt_masks = PolygonMasks([[np.array([0, 0, 10, 0, 10, 10, 0, 10], dtype=np.float64)],
                                [np.array([5, 5, 15, 5, 15, 15], dtype=np.float64)]])
    arrays = instances_to_arrays(gt)
    assert arrays["scores"] is None and arrays["classes"].tolist() == [0, 1]
    assert arrays["masks"].shape == (2, 20, 30)
    assert arrays["masks"][0, 5, 5] and not arrays["masks"][0, 15, 15]

    gt.gt_masks = BitMasks(torch.from_numpy(arrays["masks"]))
    np.testing.assert_array_equal(instances_to_arrays(gt)["masks"], arrays["masks"])
    gt.remove("gt_masks")
    assert instances_to_arrays(gt)["masks"] is None


def test_annotations_to_arrays_polygons_and_rle():
    square = np.zeros((20, 30), dtype=np.uint8, order="F")
    square[10:15, 20:25] = 1
    rle = mask_util.encode(square)
    rle["counts"] = rle["counts"].decode("ascii")
    anns = [
        {"bbox": [2.0, 2.0, 8.0, 8.0], "category_id": 1,
         "segmentation": [[2.0, 2.0, 8.0, 2.0, 8.0, 8.0, 2.0, 8.0]]},
        {"bbox": [20.0, 10.0, 25.0, 15.0], "category_id": 0, "segmentation": rle},
        {"bbox": [0.0, 0.0, 3.0, 3.0], "category_id": 2},
    ]
    arrays = annotations_to_arrays(anns, 20, 30)
    assert arrays["classes"].tolist() == [1, 0, 2] and arrays["boxes"].shape == (3, 4)
    assert arrays["masks"][0, 5, 5] and not arrays["masks"][0, 12, 22]
    np.testing.assert_array_equal(arrays["masks"][1], square.astype(bool))
    assert not arrays["masks"][2].any()
    assert annotations_to_arrays(anns[2:], 20, 30)["masks"] is None
    empty = annotations_to_arrays([], 20, 30)
    assert empty["boxes"].shape == (0, 4) and empty["classes"].shape == (0,)


@pytest.fixture
def tiny_shapes(tmp_path):
    json_file = generate_shapes_dataset(str(tmp_path / "data"), 4, seed=11, image_size=IMAGE_SIZE)
    register_coco_instances(DATASET, {"thing_classes": list(SHAPES_CLASSES)}, json_file,
                            str(tmp_path / "data" / "images"))
    yield
    DatasetCatalog.remove(DATASET)
    MetadataCatalog.remove(DATASET)


def _opts(out_dir, *extra):
    return [
        "MODEL.TINYNET.CHANNELS", "[8, 8, 16, 16, 16]", "MODEL.NECK.OUT_CHANNELS", "16",
        "MODEL.GN.NUM_GROUPS", "4", "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64",
        "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64", "DATALOADER.NUM_WORKERS", "0",
        "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "2", "SOLVER.WARMUP_ITERS", "0",
        "SOLVER.CHECKPOINT_PERIOD", "100", "DATASETS.TRAIN", f"('{DATASET}',)",
        "DATASETS.TEST", f"('{DATASET}',)", "SEED", "5", "OUTPUT_DIR", str(out_dir),
        *extra,
    ]


def _cfg(out_dir, *extra):
    return setup_cfg(default_argument_parser().parse_args(
        ["--config-file", CONFIG] + _opts(out_dir, *extra)))


def test_trainer_writes_eval_images_to_tensorboard(tiny_shapes, tmp_path):
    from tensorboard.backend.event_processing import event_accumulator

    out = tmp_path / "run"
    # an evaluation after iteration 0 and one after training
    trainer = DefaultTrainer(_cfg(out, "TEST.EVAL_PERIOD", "1", "TEST.VIS_NUM_IMAGES", "2"))
    names = [type(h).__name__ for h in trainer._hooks]
    assert names.index("EvalImages") == names.index("BestCheckpointer") + 1
    trainer.resume_or_load(resume=False)
    trainer.train()

    events = event_accumulator.EventAccumulator(
        str(out), size_guidance={event_accumulator.IMAGES: 0})
    events.Reload()
    dicts = DatasetCatalog.get(DATASET)[:2]
    expected_tags = {f"eval_images/{d['image_id']}" for d in dicts}
    assert expected_tags <= set(events.Tags()["images"])
    assert not any(t.startswith("eval_images/") and t not in expected_tags
                   for t in events.Tags()["images"])
    class_names = list(SHAPES_CLASSES)
    for d in dicts:
        records = events.Images(f"eval_images/{d['image_id']}")
        assert len(records) == 2 and records[0].step < records[1].step
        for record in records:
            assert (record.height, record.width) == (IMAGE_SIZE, 2 * IMAGE_SIZE + 4)
            picture = np.asarray(Image.open(io.BytesIO(record.encoded_image_string))
                                 .convert("RGB"))
            assert picture.shape == (IMAGE_SIZE, 2 * IMAGE_SIZE + 4, 3)
            # the left half is the ground truth drawn on the original image, pixel for pixel
            image = read_image(d["file_name"], "RGB")
            ground_truth = annotations_to_arrays(d["annotations"], IMAGE_SIZE, IMAGE_SIZE)
            assert len(ground_truth["boxes"]) > 0
            expected = draw_instances(image, class_names=class_names, **ground_truth)
            np.testing.assert_array_equal(picture[:, :IMAGE_SIZE], expected)


def test_zero_images_turns_the_hook_off(tiny_shapes, tmp_path):
    trainer = DefaultTrainer(_cfg(tmp_path / "off", "TEST.VIS_NUM_IMAGES", "0"))
    assert not any(isinstance(h, EvalImages) for h in trainer._hooks)
    with pytest.raises(ValueError, match="TEST.VIS_NUM_IMAGES"):
        EvalImages(None, model_fn=lambda: None, dataset_name=DATASET, mapper=lambda d: d,
                   num_images=-1)
