"""Helpers shared by the modeling tests (imported by name; tests/modeling is on sys.path)."""
import pathlib

import torch

from detector.config import get_cfg
from detector.structures import Boxes, Instances

ROOT = pathlib.Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"


def tiny_cfg(**overrides):
    """A small TinyNet RetinaNet (3 classes, P3-P5, 32-channel FPN) for CPU tests."""
    cfg = get_cfg()
    cfg.merge_from_list([
        "MODEL.DEVICE", "cpu",
        "MODEL.BACKBONE.NAME", "TinyNet",
        "MODEL.BACKBONE.NORM", "BN",
        "MODEL.BACKBONE.FREEZE_AT", "0",
        "MODEL.TINYNET.CHANNELS", "[8, 16, 24, 32, 48]",
        "MODEL.NECK.OUT_CHANNELS", "32",
        "MODEL.NECK.MIN_LEVEL", "3",
        "MODEL.NECK.MAX_LEVEL", "5",
        "MODEL.GN.NUM_GROUPS", "8",
        "MODEL.ANCHOR_GENERATOR.SIZES", "[[16], [32], [64]]",
        "MODEL.ANCHOR_GENERATOR.STRIDES", "[8, 16, 32]",
        "MODEL.RETINANET.NUM_CLASSES", "3",
        "MODEL.RETINANET.NUM_CONVS", "2",
    ])
    for k, v in overrides.items():
        cfg.merge_from_list([k, v])
    return cfg


def make_batch(num_images=2, size=(64, 64), boxes_per_image=3, num_classes=3, seed=0,
               with_instances=True):
    """Random uint8 images with a few random gt boxes each."""
    g = torch.Generator().manual_seed(seed)
    h, w = size
    batch = []
    for i in range(num_images):
        image = torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)
        item = {"image": image, "height": h, "width": w, "image_id": i}
        if with_instances:
            xy = torch.rand(boxes_per_image, 2, generator=g) * torch.tensor([w / 2, h / 2])
            wh = 8 + torch.rand(boxes_per_image, 2, generator=g) * torch.tensor(
                [w / 2 - 8, h / 2 - 8])
            boxes = torch.cat([xy, xy + wh], dim=1)
            classes = torch.randint(0, num_classes, (boxes_per_image,), generator=g)
            item["instances"] = Instances((h, w), gt_boxes=Boxes(boxes), gt_classes=classes)
        batch.append(item)
    return batch
