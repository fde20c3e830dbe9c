"""Short training runs shared by the "the loss falls" tests (imported by name; tests/ is on
sys.path)."""
import itertools

import torch

from detector.data.dataset_mapper import DatasetMapper
from detector.data.datasets import load_coco_json
from detector.engine.hooks import CallbackHook
from detector.engine.train_loop import SimpleTrainer
from detector.modeling import build_model
from detector.solver import build_optimizer


def mapped_batches(cfg, json_file, image_root, batch_size=8):
    """The images of a COCO json mapped once by the training mapper of ``cfg``, in batches of
    ``batch_size``."""
    mapper = DatasetMapper(**DatasetMapper.from_config(cfg, is_train=True))
    mapped = [mapper(d) for d in load_coco_json(json_file, image_root)]
    return mapped, [mapped[i:i + batch_size] for i in range(0, len(mapped), batch_size)]


def dense_losses_per_step(cfg, batches, steps):
    """Build the model of ``cfg`` (seed 0) and train it ``steps`` steps on ``batches`` (a list,
    cycled, or an iterator of batches); returns loss_cls + loss_box_reg of every step."""
    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()
    losses = []

    def record(trainer):
        latest = trainer.storage.latest()
        losses.append(latest["loss_cls"][0] + latest["loss_box_reg"][0])

    data = itertools.cycle(batches) if isinstance(batches, list) else batches
    trainer = SimpleTrainer(model, data, build_optimizer(cfg, model))
    trainer.register_hooks([CallbackHook(after_step=record)])
    trainer.train(0, steps)
    return losses
