"""Every YAML under configs/ builds at tiny size and runs one training step."""
import pathlib

import pytest
import torch

from detector.config import get_cfg
from detector.engine.train_loop import SimpleTrainer
from detector.modeling import build_model
from detector.solver import build_optimizer
from detector.structures import BitMasks, Boxes, Instances

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))

TINY = [
    "MODEL.DEVICE", "cpu",
    "MODEL.RETINANET.NUM_CLASSES", "3",
    "MODEL.ROI_HEADS.NUM_CLASSES", "3",
    "MODEL.ROI_BOX_HEAD.FC_DIM", "32",
    "MODEL.ROI_MASK_HEAD.CONV_DIM", "16",
    "MODEL.NECK.OUT_CHANNELS", "16",
    "MODEL.GN.NUM_GROUPS", "4",
    "MODEL.EVONORM.NUM_GROUPS", "4",
    "MODEL.WEIGHTS", "",
    "SOLVER.IMS_PER_BATCH", "2",
]


def _batch(num_images=2, size=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    batch = []
    for i in range(num_images):
        image = torch.randint(0, 256, (3, size, size), generator=g, dtype=torch.uint8)
        xy = torch.rand(3, 2, generator=g) * (size / 2)
        wh = 12 + torch.rand(3, 2, generator=g) * (size / 2 - 12)
        boxes = torch.cat([xy, xy + wh], dim=1)
        masks = torch.zeros(3, size, size, dtype=torch.bool)
        for k, (x1, y1, x2, y2) in enumerate(boxes.round().int().tolist()):
            masks[k, y1:y2, x1:x2] = True
        inst = Instances((size, size), gt_boxes=Boxes(boxes),
                         gt_classes=torch.tensor([0, 1, 2], dtype=torch.int64),
                         gt_masks=BitMasks(masks))
        batch.append({"image": image, "height": size, "width": size, "image_id": i,
                      "instances": inst})
    return batch


# every shipped config; a config added or removed must be added or removed here as well
EXPECTED_CONFIGS = [
    "Base-RCNN-FPN.yaml",
    "Base-RetinaNet.yaml",
    "coco2014/Base-MaskRCNN-COCO2014.yaml",
    "coco2014/Base-RetinaNet-COCO2014.yaml",
    "coco2014/efficientdet_D0_EvoNormS0_giou_cosine.yaml",
    "coco2014/efficientdet_D0_R50_EvoNormS0_giou_cosine.yaml",
    "coco2014/mask_rcnn_R_50_FPN_BN.yaml",
    "coco2014/mask_rcnn_R_50_FPN_EvoNormS0.yaml",
    "coco2014/mask_rcnn_R_50_FPN_GN.yaml",
    "coco2014/mask_rcnn_R_50_FPN_SyncBN.yaml",
    "coco2014/retinanet_MobileNetV3_FPN_EvoNormS0_giou.yaml",
    "coco2014/retinanet_R_50_FPN_BN.yaml",
    "coco2014/retinanet_R_50_FPN_EvoNormS0.yaml",
    "coco2014/retinanet_R_50_FPN_EvoNormS0_2x2.yaml",
    "coco2014/retinanet_R_50_FPN_EvoNormS0_4x1.yaml",
    "coco2014/retinanet_R_50_FPN_EvoNormS0_giou.yaml",
    "coco2014/retinanet_R_50_FPN_EvoNormS0_giou_AA.yaml",
    "coco2014/retinanet_R_50_FPN_EvoNormS0_giou_cosine.yaml",
    "coco2014/retinanet_R_50_FPN_EvoNormS0_giou_stitch.yaml",
    "coco2014/retinanet_R_50_FPN_EvoNormS0_giou_stitch_eval640.yaml",
    "coco2014/retinanet_R_50_FPN_GN.yaml",
    "coco2014/retinanet_R_50_FPN_GN_head_BN.yaml",
    "coco2014/retinanet_R_50_FPN_GN_head_BN_4x1.yaml",
    "coco2014/retinanet_R_50_FPN_SN.yaml",
    "coco2014/retinanet_R_50_FPN_SN_4x1.yaml",
    "coco2014/retinanet_R_50_FPN_SN_giou.yaml",
    "coco2014/retinanet_R_50_PConv_EvoNormS0_giou.yaml",
    "coco2014/retinanet_R_50_TwoWayFPN_EvoNormS0_giou.yaml",
    "demo/mask_rcnn_tiny_shapes.yaml",
    "demo/retinanet_tiny_shapes.yaml",
    "efficientdet/Base-EfficientDet.yaml",
    "efficientdet/EfficientDet-D0-EvoNormS0.yaml",
    "efficientdet/EfficientDet-D0-R50.yaml",
    "efficientdet/EfficientDet-D0.yaml",
    "efficientdet/EfficientDet-D1.yaml",
    "efficientdet/EfficientDet-D2.yaml",
    "efficientdet/EfficientDet-D3.yaml",
    "efficientdet/EfficientDet-D4.yaml",
    "efficientdet/EfficientDet-D5.yaml",
    "efficientdet/EfficientDet-D6.yaml",
    "efficientdet/EfficientDet-D7.yaml",
    "efficientdet/EfficientDet-tiny-shapes.yaml",
    "mask_rcnn/mask_rcnn_R_50_FPN_1x.yaml",
    "mask_rcnn/mask_rcnn_R_50_FPN_torchvision.yaml",
    "pyramid/retinanet_P2-P5_a8.yaml",
    "pyramid/retinanet_P2-P5_high.yaml",
    "pyramid/retinanet_P2-P5_low.yaml",
    "pyramid/retinanet_P2-P6.yaml",
    "pyramid/retinanet_base.yaml",
    "retinanet/retinanet_R_101_FPN_1x.yaml",
    "retinanet/retinanet_R_50_FPN_1x.yaml",
    "retinanet/retinanet_R_50_FPN_giou_cosine.yaml",
    "retinanet/retinanet_R_50_FPN_torchvision.yaml",
]


def test_the_shipped_configs_are_exactly_the_expected_ones():
    found = sorted(p.relative_to(ROOT / "configs").as_posix() for p in CONFIGS)
    assert found == EXPECTED_CONFIGS


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_config_builds_and_trains_one_step(path):
    torch.manual_seed(0)
    cfg = get_cfg()
    cfg.merge_from_file(str(path))
    cfg.merge_from_list(TINY)
    model = build_model(cfg)
    model.train()
    optimizer = build_optimizer(cfg, model)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    batch = _batch()
    trainer = SimpleTrainer(model, [batch] * 2, optimizer)
    trainer.train(0, 1)

    changed = [n for n, p in model.named_parameters()
               if p.requires_grad and not torch.equal(before[n], p.detach())]
    assert changed, f"{path.name}: no parameter changed after one step"
    model.eval()
    with torch.no_grad():
        outputs = model(batch[:1])
    assert len(outputs) == 1 and outputs[0]["instances"].image_size == (128, 128)


def test_every_row_of_the_coco2014_table_has_its_config():
    """configs/coco2014/README.md lists one config per row of the results table; each exists
    and names its row's reference in its header."""
    readme = (ROOT / "configs" / "coco2014" / "README.md").read_text()
    rows = [line for line in readme.splitlines() if line.startswith("| ") and ".yaml`" in line]
    assert len(rows) == 19
    for row in rows:
        name = row.split("`")[1]
        path = ROOT / "configs" / "coco2014" / name
        assert path.is_file(), f"{name} (row: {row.split('|')[1].strip()}) does not exist"
        header = path.read_text().split("_BASE_")[0]
        assert header.startswith("# Results-table row") and "Reference:" in header, name
