"""A tiny RetinaNet trained for a few steps on the built-in shapes data, for the neck tests."""
import itertools

import torch

from detector.config import get_cfg
from detector.data.dataset_mapper import DatasetMapper
from detector.data.datasets import generate_shapes_dataset, load_coco_json
from detector.engine.hooks import CallbackHook
from detector.engine.train_loop import SimpleTrainer
from detector.modeling import build_model
from detector.solver import build_optimizer

from modeling_testutils import CONFIGS


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
    dataset = load_coco_json(json_file, str(tmp_path / "images"))
    mapper = DatasetMapper(**DatasetMapper.from_config(cfg, is_train=True))
    mapped = [mapper(d) for d in dataset]
    assert sum(len(x["instances"]) for x in mapped) >= 16
    batches = [mapped[i:i + 8] for i in (0, 8)]

    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()
    losses = []

    def record(trainer):
        latest = trainer.storage.latest()
        losses.append(latest["loss_cls"][0] + latest["loss_box_reg"][0])

    trainer = SimpleTrainer(model, itertools.cycle(batches), build_optimizer(cfg, model))
    trainer.register_hooks([CallbackHook(after_step=record)])
    trainer.train(0, steps)
    assert len(losses) == steps and all(torch.isfinite(torch.tensor(losses)))
    return sum(losses[:5]) / 5, sum(losses[-5:]) / 5, losses
