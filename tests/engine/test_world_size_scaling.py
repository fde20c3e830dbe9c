"""SOLVER.REFERENCE_WORLD_SIZE: the linear scaling rule for a run on another number of processes."""
import json
import os
import subprocess
import sys

import pytest

from detector.config import get_cfg
from detector.engine import scale_for_world_size
from log_capture import CollectLogs
from tool_loader import load_tool

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "configs", "demo", "retinanet_tiny_shapes.yaml")
SUBPROCESS_TIMEOUT_S = 240


def coco2014_like_cfg(reference=3):
    """The solver of the COCO2014 recipe: 4 images x 3 GPUs."""
    cfg = get_cfg()
    cfg.merge_from_list([
        "SOLVER.REFERENCE_WORLD_SIZE", str(reference), "SOLVER.IMS_PER_BATCH", "12",
        "SOLVER.BASE_LR", "0.02", "SOLVER.MAX_ITER", "120000", "SOLVER.WARMUP_ITERS", "1000",
        "SOLVER.STEPS", "(80000, 100000)", "SOLVER.CHECKPOINT_PERIOD", "5000",
        "TEST.EVAL_PERIOD", "10000",
    ])
    cfg.freeze()
    return cfg


def solver_values(cfg):
    s = cfg.SOLVER
    return (s.IMS_PER_BATCH, s.BASE_LR, s.MAX_ITER, s.WARMUP_ITERS, tuple(s.STEPS),
            s.CHECKPOINT_PERIOD, cfg.TEST.EVAL_PERIOD, s.REFERENCE_WORLD_SIZE)


def test_three_to_one_process():
    cfg = coco2014_like_cfg()
    scaled = scale_for_world_size(cfg, 1)
    batch, lr, max_iter, warmup, steps, ckpt, eval_period, reference = solver_values(scaled)
    assert (batch, max_iter, warmup, steps, ckpt, eval_period, reference) == (
        4, 360000, 3000, (240000, 300000), 15000, 30000, 1)
    assert lr == pytest.approx(0.02 / 3, rel=1e-12)
    assert scaled.is_frozen()
    # the input is not modified
    assert solver_values(cfg) == (12, 0.02, 120000, 1000, (80000, 100000), 5000, 10000, 3)


def test_three_to_two_processes():
    batch, lr, *rest = solver_values(scale_for_world_size(coco2014_like_cfg(), 2))
    assert batch == 8 and lr == pytest.approx(0.02 * 2 / 3, rel=1e-12)
    assert rest == [180000, 1500, (120000, 150000), 7500, 15000, 2]


def test_three_to_six_processes_and_idempotence():
    scaled = scale_for_world_size(coco2014_like_cfg(), 6)
    batch, lr, *rest = solver_values(scaled)
    assert batch == 24 and lr == pytest.approx(0.04, rel=1e-12)
    assert rest == [60000, 500, (40000, 50000), 2500, 5000, 6]
    # the scaled config states its own world size: scaling again changes nothing
    assert scale_for_world_size(scaled, 6) is scaled


def test_rounding_keeps_enabled_periods_positive():
    cfg = get_cfg()
    cfg.merge_from_list([
        "SOLVER.REFERENCE_WORLD_SIZE", "1", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "5",
        "SOLVER.WARMUP_ITERS", "3", "SOLVER.STEPS", "(3,)", "SOLVER.CHECKPOINT_PERIOD", "1",
        "TEST.EVAL_PERIOD", "0",
    ])
    scaled = scale_for_world_size(cfg, 2)
    assert not scaled.is_frozen()
    # 5/2 and 3/2 round half up; a period of 1 stays 1; 0 (only at the end) stays 0
    assert solver_values(scaled)[2:] == (3, 2, (2,), 1, 0, 2)


def test_key_zero_or_same_world_size_leaves_config_as_written():
    cfg = coco2014_like_cfg(reference=0)
    with CollectLogs("detector") as logs:
        assert scale_for_world_size(cfg, 5) is cfg
        same = coco2014_like_cfg(reference=3)
        assert scale_for_world_size(same, 3) is same
    assert logs.lines == []


def test_batch_that_does_not_scale_to_whole_images_is_one_line_error():
    cfg = get_cfg()
    cfg.merge_from_list(["SOLVER.REFERENCE_WORLD_SIZE", "3", "SOLVER.IMS_PER_BATCH", "4"])
    with pytest.raises(ValueError) as info:
        scale_for_world_size(cfg, 2)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("SOLVER.IMS_PER_BATCH=4 is not a positive multiple of "
                              "SOLVER.REFERENCE_WORLD_SIZE=3: scaled to world size 2 it would be "
                              "2.66667 images"), message
    cfg.merge_from_list(["SOLVER.REFERENCE_WORLD_SIZE", "-1"])
    with pytest.raises(ValueError, match=r"^SOLVER.REFERENCE_WORLD_SIZE must be >= 0"):
        scale_for_world_size(cfg, 2)


def test_scaling_is_logged_in_one_line():
    with CollectLogs("detector") as logs:
        scale_for_world_size(coco2014_like_cfg(), 6)
        scale_for_world_size(coco2014_like_cfg(), 6, log=False)
    assert logs.lines == [
        "Scaled SOLVER from REFERENCE_WORLD_SIZE 3 to world size 6 (linear rule, x2): "
        "IMS_PER_BATCH 12 -> 24, BASE_LR 0.02 -> 0.04, MAX_ITER 120000 -> 60000, "
        "WARMUP_ITERS 1000 -> 500, STEPS (80000, 100000) -> (40000, 50000), "
        "CHECKPOINT_PERIOD 5000 -> 2500, TEST.EVAL_PERIOD 10000 -> 5000"
    ]


@pytest.mark.parametrize("name,reference,batch", [
    ("Base-RetinaNet-COCO2014.yaml", 3, 12), ("Base-MaskRCNN-COCO2014.yaml", 3, 12),
    ("retinanet_R_50_FPN_GN.yaml", 3, 12), ("retinanet_R_50_FPN_BN.yaml", 2, 4),
    ("mask_rcnn_R_50_FPN_SyncBN.yaml", 3, 12), ("efficientdet_D0_EvoNormS0_giou_cosine.yaml", 3, 12),
])
def test_coco2014_configs_state_their_world_size(name, reference, batch):
    cfg = get_cfg()
    cfg.merge_from_file(os.path.join(ROOT, "configs", "coco2014", name))
    assert (cfg.SOLVER.REFERENCE_WORLD_SIZE, cfg.SOLVER.IMS_PER_BATCH) == (reference, batch)
    # on one GPU the images per GPU stay as in the table
    assert scale_for_world_size(cfg, 1, log=False).SOLVER.IMS_PER_BATCH == batch // reference


def test_cli_checks_the_scaled_batch_before_launching(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    argv = ["--num-gpus", "2", "--config-file", CONFIG, "SOLVER.IMS_PER_BATCH", "4",
            "SOLVER.REFERENCE_WORLD_SIZE", "3"]
    with pytest.raises(SystemExit) as info:
        load_tool("train_net").cli(argv)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("train_net.py: error: SOLVER.IMS_PER_BATCH=4 is not a positive "
                              "multiple of SOLVER.REFERENCE_WORLD_SIZE=3"), message


@pytest.mark.slow
def test_two_process_run_trains_with_the_scaled_solver(tmp_path):
    """train_net.py --num-gpus 2 on a config written for 1 process of 2 images x 4 iterations:
    every rank logs the scaling and trains 2 images per process for 2 iterations."""
    from detector.data.datasets import ensure_shapes_dataset

    ensure_shapes_dataset("train")  # once here, not concurrently in both ranks
    out = tmp_path / "out"
    opts = [
        "MODEL.TINYNET.CHANNELS", "[8, 16, 16, 32, 32]", "MODEL.NECK.OUT_CHANNELS", "32",
        "MODEL.GN.NUM_GROUPS", "8", "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64",
        "INPUT.RANDOM_FLIP", "none", "DATALOADER.NUM_WORKERS", "0", "DATASETS.TEST", "()",
        "DIST.TIMEOUT_MINUTES", "1", "LOG_PERIOD", "1", "SEED", "1", "OUTPUT_DIR", str(out),
        "SOLVER.REFERENCE_WORLD_SIZE", "1", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "4",
        "SOLVER.WARMUP_ITERS", "2", "SOLVER.STEPS", "(3,)", "SOLVER.BASE_LR", "0.01",
        "SOLVER.CHECKPOINT_PERIOD", "100", "SOLVER.WARMUP_FACTOR", "0.001",
        "SOLVER.LR_SCHEDULER_NAME", "WarmupCosineLR",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "train_net.py"), "--num-gpus", "2",
         "--config-file", CONFIG] + opts,
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=SUBPROCESS_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = ("Scaled SOLVER from REFERENCE_WORLD_SIZE 1 to world size 2 (linear rule, x2): "
                "IMS_PER_BATCH 2 -> 4, BASE_LR 0.01 -> 0.02, MAX_ITER 4 -> 2, WARMUP_ITERS 2 -> 1, "
                "STEPS (3) -> (2), CHECKPOINT_PERIOD 100 -> 50, TEST.EVAL_PERIOD 0 -> 0")
    for log_file in ("log.txt", "log.txt.rank1"):
        text = (out / log_file).read_text()
        assert text.count(expected) == 1, text
        assert "IMS_PER_BATCH=4 over 2 process(es): 2 image(s) per process" in text
    lr_by_iteration = {record["iteration"]: record["lr"] for record in map(
        json.loads, (out / "metrics.json").read_text().splitlines())}
    # MAX_ITER 2; the scaled BASE_LR 0.02 x WARMUP_FACTOR, then halfway down the cosine
    assert lr_by_iteration == pytest.approx({0: 0.02 * 0.001, 1: 0.01}, rel=1e-9)
