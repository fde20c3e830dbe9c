"""A tiny EfficientDet (configs/efficientdet/EfficientDet-tiny-shapes.yaml, narrowed) learns the
synthetic shapes: its loss halves within 30 steps."""
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


def test_tiny_efficientdet_loss_falls_on_shapes(tmp_path):
    json_file = generate_shapes_dataset(str(tmp_path), num_images=16, seed=1, image_size=128)
    cfg = get_cfg()
    cfg.merge_from_file(str(CONFIGS / "efficientdet" / "EfficientDet-tiny-shapes.yaml"))
    cfg.merge_from_list([
        "MODEL.DEVICE", "cpu", "MODEL.BIFPN.CHANNELS", "32", "MODEL.BIFPN.NUM_REPEATS", "2",
        "MODEL.EFFICIENTDET.NUM_HEAD_CONVS", "2", "MODEL.TINYNET.CHANNELS", "[8, 16, 32, 48, 64]",
        "SOLVER.OPTIMIZER", "AdamW", "SOLVER.BASE_LR", "0.003", "SOLVER.WEIGHT_DECAY", "0.0",
        "SEED", "0"])
    dataset = load_coco_json(json_file, str(tmp_path / "images"))
    mapper = DatasetMapper(**DatasetMapper.from_config(cfg, is_train=True))
    mapped = [mapper(d) for d in dataset]
    batches = [mapped[i:i + 8] for i in (0, 8)]
    assert sum(len(x["instances"]) for x in mapped) >= 16

    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()
    losses = []

    def record(trainer):
        latest = trainer.storage.latest()
        losses.append(latest["loss_cls"][0] + latest["loss_box_reg"][0])

    trainer = SimpleTrainer(model, itertools.cycle(batches), build_optimizer(cfg, model))
    trainer.register_hooks([CallbackHook(after_step=record)])
    trainer.train(0, 30)
    assert len(losses) == 30 and all(torch.isfinite(torch.tensor(losses)))
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.5 * first, (first, last, losses)
