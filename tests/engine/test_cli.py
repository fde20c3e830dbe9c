"""The command line: flags anywhere, checks before any process starts, one-line errors as the last
line of the tools' output, no warnings on start, and evaluation reading its annotations once."""
import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from detector.data import DatasetCatalog, MetadataCatalog, register_coco_instances
from detector.data.datasets import COCO_CATEGORIES
from detector.engine import (
    DefaultTrainer,
    default_argument_parser,
    expected_world_size,
    launch_from_args,
    setup_cfg,
)
from log_capture import CollectLogs
from tool_loader import load_tool

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "configs", "demo", "retinanet_tiny_shapes.yaml")
TINY_MODEL = [
    "MODEL.TINYNET.CHANNELS", "[8, 8, 16, 16, 16]", "MODEL.NECK.OUT_CHANNELS", "16",
    "MODEL.GN.NUM_GROUPS", "4", "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64",
    "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64", "INPUT.RANDOM_FLIP", "none",
    "SEED", "1", "LOG_PERIOD", "100",
]
SUBPROCESS_TIMEOUT_S = 120


def write_tiny_coco(folder, categories, sizes, declared_sizes=None):
    """Random 64x64-ish images with one box each; ``declared_sizes`` (default: the real ones)
    go into the json. Returns (json path, image folder)."""
    image_dir = os.path.join(folder, "images")
    os.makedirs(image_dir, exist_ok=True)
    rng = np.random.RandomState(0)
    images, annotations = [], []
    for i, (h, w) in enumerate(sizes, start=1):
        name = f"{i}.jpg"
        pixels = rng.randint(0, 255, size=(h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(os.path.join(image_dir, name))
        dh, dw = declared_sizes[i - 1] if declared_sizes else (h, w)
        images.append({"id": i, "file_name": name, "height": dh, "width": dw})
        annotations.append({"id": i, "image_id": i, "category_id": categories[i % len(categories)]
                            ["id"], "bbox": [4.0, 4.0, 24.0, 20.0], "area": 480.0, "iscrowd": 0})
    json_file = os.path.join(folder, "instances.json")
    with open(json_file, "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)
    return json_file, image_dir


def fake_coco128(root, declared_sizes=None):
    """$DETECTOR_DATASETS/coco128 with the 80 COCO categories and two small images."""
    folder = os.path.join(root, "coco128")
    categories = [{"id": cid, "name": name} for cid, name in COCO_CATEGORIES]
    json_file, image_dir = write_tiny_coco(folder, categories, [(48, 64), (64, 48)],
                                           declared_sizes)
    os.makedirs(os.path.join(folder, "annotations"), exist_ok=True)
    os.replace(json_file, os.path.join(folder, "annotations", "instances_train2017.json"))
    os.replace(image_dir, os.path.join(folder, "train2017"))
    return os.path.join(folder, "train2017")


def run_tool(tool, argv, datasets_root):
    """Run ``tools/<tool>`` with -W default; returns (process, last line of stderr)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", DETECTOR_DATASETS=str(datasets_root))
    proc = subprocess.run([sys.executable, "-W", "default", os.path.join(ROOT, "tools", tool)]
                          + argv,
                          capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=SUBPROCESS_TIMEOUT_S)
    return proc, proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ""


# --------------------------------------------------------------------------------------------
# parsing
# --------------------------------------------------------------------------------------------
def test_flags_after_the_overrides_are_flags(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    parser = default_argument_parser()
    args = parser.parse_args(["--config-file", "a.yaml", "OUTPUT_DIR", "out", "--resume",
                              "SEED", "-1", "--num-gpus", "2", "--dist-url=tcp://h:1"])
    assert args.resume and args.num_gpus == 2 and args.dist_url == "tcp://h:1"
    assert args.config_file == "a.yaml"
    assert args.opts == ["OUTPUT_DIR", "out", "SEED", "-1"]  # -1 is a value, not a flag
    assert parser.parse_args(["SOLVER.BASE_LR", "0.1"]).opts == ["SOLVER.BASE_LR", "0.1"]
    assert expected_world_size(args) == 2


def test_unknown_flag_among_the_overrides_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as info:
        default_argument_parser().parse_args(["OUTPUT_DIR", "out", "--resum"])
    assert info.value.code == 2
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert last_line.endswith("error: unrecognized argument --resum among the KEY VALUE overrides")


# --------------------------------------------------------------------------------------------
# checks before any process starts
# --------------------------------------------------------------------------------------------
def _never_called(args):
    raise AssertionError("the run must not start")


@pytest.mark.parametrize("opts, expected", [
    (["SOLVER.IMS_PER_BATCH", "0"], "SOLVER.IMS_PER_BATCH must be positive, got 0"),
    (["SOLVER.IMS_PER_BATCH", "-2"], "SOLVER.IMS_PER_BATCH must be positive, got -2"),
    (["SOLVER.BASE_LR", "1e400"], "SOLVER.BASE_LR is inf; it must be a finite number"),
    (["TEST.COCO_EVAL_BACKEND", "detectron"], "Unknown COCO evaluation backend 'detectron'"),
])
def test_bad_values_stop_the_run_before_it_starts(monkeypatch, opts, expected):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    args = default_argument_parser().parse_args(["--config-file", CONFIG] + opts)
    with pytest.raises(SystemExit) as info:
        launch_from_args(_never_called, args, prog="train_net.py")
    message = str(info.value)
    assert "\n" not in message and message.startswith("train_net.py: error: "), message
    assert expected in message, message


def test_nan_learning_rate_in_yaml_names_file_and_key(tmp_path, monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    config = tmp_path / "nan_lr.yaml"
    config.write_text(f'_BASE_: "{CONFIG}"\nSOLVER:\n  BASE_LR: .nan\n')
    args = default_argument_parser().parse_args(["--config-file", str(config)])
    with pytest.raises(SystemExit) as info:
        launch_from_args(_never_called, args, prog="train_net.py")
    assert str(info.value) == (f"train_net.py: error: {config}: SOLVER.BASE_LR is nan; it must "
                               f"be a finite number")


# --------------------------------------------------------------------------------------------
# the tools' output
# --------------------------------------------------------------------------------------------
def test_worker_error_is_the_last_line_and_no_warning_is_shown(tmp_path):
    """An image whose size differs from its annotation, read in a DataLoader worker: the last
    line names the file and image id, not just "Caught ... in DataLoader worker process 0".
    Run with -W default: starting the tool shows no FutureWarning (e.g. fvcore.nn's
    torch.jit.script at import time)."""
    image_dir = fake_coco128(tmp_path / "datasets", declared_sizes=[(40, 40), (40, 40)])
    proc, last_line = run_tool("train_net.py", [
        "--config-file", CONFIG, *TINY_MODEL, "DATASETS.TRAIN", "('coco128',)",
        "DATASETS.TEST", "()", "MODEL.RETINANET.NUM_CLASSES", "80",
        "DATALOADER.NUM_WORKERS", "1", "DATALOADER.ASPECT_RATIO_GROUPING", "False",
        "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "2", "OUTPUT_DIR", str(tmp_path / "out"),
    ], tmp_path / "datasets")
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert last_line.startswith("train_net.py: error: failed with ImageSizeMismatchError: "
                                f"{image_dir}{os.sep}"), last_line
    assert "(image_id " in last_line and "but the annotations say 40x40" in last_line, last_line
    assert "Warning" not in proc.stderr, proc.stderr[:3000]


@pytest.fixture
def restore_detector_logger():
    """The tools set up the "detector" logger (handlers, no propagation); undo it afterwards."""
    logger = logging.getLogger("detector")
    saved = (list(logger.handlers), logger.propagate, logger.level)
    yield
    for handler in list(logger.handlers):
        if handler not in saved[0]:
            logger.removeHandler(handler)
            handler.close()
    logger.propagate, logger.level = saved[1], saved[2]


def test_test_net_refuses_a_model_with_other_classes(tmp_path, monkeypatch,
                                                     restore_detector_logger):
    """A 3-class model evaluated on an 80-class dataset would label every detection as one of
    the first three categories; test_net.py ends with one line naming both numbers."""
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    fake_coco128(tmp_path / "datasets")
    monkeypatch.setenv("DETECTOR_DATASETS", str(tmp_path / "datasets"))
    with pytest.raises(SystemExit) as info:
        load_tool("test_net").cli([
            "--config-file", CONFIG, *TINY_MODEL, "DATASETS.TEST", "('coco128',)",
            "DATALOADER.NUM_WORKERS", "0", "OUTPUT_DIR", str(tmp_path / "out"),
        ])
    assert str(info.value) == (
        "test_net.py: error: failed with ValueError: The model predicts 3 classes "
        "(MODEL.RETINANET.NUM_CLASSES) but dataset 'coco128' has 80; set "
        "MODEL.RETINANET.NUM_CLASSES 80 for this dataset, or evaluate on a dataset with 3 "
        "classes")
    assert not os.path.exists(tmp_path / "out" / "inference" / "coco128")


# --------------------------------------------------------------------------------------------
# DefaultTrainer.test
# --------------------------------------------------------------------------------------------
@pytest.fixture
def tiny_test_dataset(tmp_path):
    name = "_test_cli_tiny_val"
    categories = [{"id": 5, "name": "a"}, {"id": 9, "name": "b"}, {"id": 2, "name": "c"}]
    json_file, image_dir = write_tiny_coco(str(tmp_path / "val"), categories,
                                           [(48, 64), (64, 48), (64, 64)])
    register_coco_instances(name, {}, json_file, image_dir)
    yield name
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)


def _tiny_cfg(out_dir, dataset, *extra):
    args = default_argument_parser().parse_args(
        ["--config-file", CONFIG, *TINY_MODEL, "DATASETS.TEST", f"('{dataset}',)",
         "DATALOADER.NUM_WORKERS", "0", "OUTPUT_DIR", str(out_dir), *extra])
    return setup_cfg(args)


def test_evaluation_reads_the_annotations_once(tmp_path, tiny_test_dataset):
    cfg = _tiny_cfg(tmp_path / "out", tiny_test_dataset)
    model = DefaultTrainer.build_model(cfg)
    with CollectLogs("detector.data") as logs:
        results = DefaultTrainer.test(cfg, model)
    loaded = [line for line in logs.lines if line.startswith("Loaded 3 images")]
    assert len(loaded) == 1, logs.text
    assert set(results["bbox"]) >= {"AP", "AP50", "AP-a", "AP-b", "AP-c"}


def test_evaluation_refuses_a_class_count_mismatch(tmp_path, tiny_test_dataset):
    cfg = _tiny_cfg(tmp_path / "out", tiny_test_dataset, "MODEL.RETINANET.NUM_CLASSES", "2")
    model = DefaultTrainer.build_model(cfg)
    with pytest.raises(ValueError, match=r"^The model predicts 2 classes "
                                         r"\(MODEL.RETINANET.NUM_CLASSES\) but dataset "
                                         rf"'{tiny_test_dataset}' has 3; "):
        DefaultTrainer.test(cfg, model)
