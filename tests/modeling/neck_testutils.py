"""A tiny RetinaNet trained for a few steps on the built-in shapes data, for the neck tests."""
import torch

from detector.config import get_cfg
from detector.data.datasets import generate_shapes_dataset

from modeling_testutils import CONFIGS
from training_testutils import dense_losses_per_step, mapped_batches


def falling_loss_on_shapes(tmp_path, overrides: dict, steps: int = 60):
    """Train the demo RetinaNet at 64 px (narrowed, with ``overrides``) for ``steps`` steps on 16
    shapes images; returns (mean loss of the first 5 steps, of the last 5, every loss)."""
    json_file = generate_shapes_dataset(str(tmp_path), num_images=16, seed=1, image_size=128)
    cfg = get_cfg()
    cfg.merge_from_file(str(CONFIGS / "demo" / "retinanet_tiny_shapes.yaml"))
    cfg.merge_from_list([
        "MODEL.DEVICE", "cpu", "MODEL.TINYNET.CHANNELS", "[8, 16, 24, 32, 48]",
        "MODEL.NECK.OUT_CHANNELS", "32", "MODEL.RETINANET.NORM", "",
        "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64",
        "SOLVER.OPTIMIZER", "AdamW", "SOLVER.BASE_LR", "0.003", "SOLVER.WEIGHT_DECAY", "0.0",
        "SEED", "0"])
    for key, value in overrides.items():
        cfg.merge_from_list([key, value])
    mapped, batches = mapped_batches(cfg, json_file, str(tmp_path / "images"))
    assert sum(len(x["instances"]) for x in mapped) >= 16
    losses = dense_losses_per_step(cfg, batches, steps)
    assert len(losses) == steps and all(torch.isfinite(torch.tensor(losses)))
    return sum(losses[:5]) / 5, sum(losses[-5:]) / 5, losses
