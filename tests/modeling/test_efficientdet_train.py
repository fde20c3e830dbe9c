"""A tiny EfficientDet (configs/efficientdet/EfficientDet-tiny-shapes.yaml, narrowed) learns the
synthetic shapes: its loss halves within 30 steps."""

import torch

from detector.config import get_cfg
from detector.data.datasets import generate_shapes_dataset

from modeling_testutils import CONFIGS
from training_testutils import dense_losses_per_step, mapped_batches


def test_tiny_efficientdet_loss_falls_on_shapes(tmp_path):
    json_file = generate_shapes_dataset(str(tmp_path), num_images=16, seed=1, image_size=128)
    cfg = get_cfg()
    cfg.merge_from_file(str(CONFIGS / "efficientdet" / "EfficientDet-tiny-shapes.yaml"))
    cfg.merge_from_list([
        "MODEL.DEVICE", "cpu", "MODEL.BIFPN.CHANNELS", "32", "MODEL.BIFPN.NUM_REPEATS", "2",
        "MODEL.EFFICIENTDET.NUM_HEAD_CONVS", "2", "MODEL.TINYNET.CHANNELS", "[8, 16, 32, 48, 64]",
        "SOLVER.OPTIMIZER", "AdamW", "SOLVER.BASE_LR", "0.003", "SOLVER.WEIGHT_DECAY", "0.0",
        "SEED", "0"])
    mapped, batches = mapped_batches(cfg, json_file, str(tmp_path / "images"))
    assert sum(len(x["instances"]) for x in mapped) >= 16
    losses = dense_losses_per_step(cfg, batches, 30)
    assert len(losses) == 30 and all(torch.isfinite(torch.tensor(losses)))
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.5 * first, (first, last, losses)
