"""Our Mask R-CNN built from configs/mask_rcnn/mask_rcnn_R_50_FPN_torchvision.yaml, loaded with
converted torchvision maskrcnn_resnet50_fpn weights (random, with spread-out statistics and scores),
gives torchvision's proposals, detections, masks and losses at sizes torchvision keeps at scale 1,
one of them not a multiple of 64."""
import pytest
import torch
from torch import nn
from torchvision.models.detection import maskrcnn_resnet50_fpn
from torchvision.models.detection._utils import overwrite_eps
from torchvision.models.detection.image_list import ImageList as TvImageList

from detector.checkpoint.torchvision_maskrcnn import convert_torchvision_maskrcnn_state_dict
from detector.config import get_cfg
from detector.layers import convert_frozen_batchnorm
from detector.modeling import build_model
from detector.structures import BitMasks, Boxes, Instances

from modeling_testutils import CONFIGS
from random_statistics import randomize_batchnorms

TV_CONFIG = CONFIGS / "mask_rcnn" / "mask_rcnn_R_50_FPN_torchvision.yaml"
IMAGE_SIZES = [(256, 320), (256, 288)]  # 288 is not a multiple of 64; both kept at scale 1
EVERY_CANDIDATE = 100000  # per-image sample sizes above the candidates: sampling takes all


def _cfg(*opts):
    cfg = get_cfg()
    cfg.merge_from_file(str(TV_CONFIG))
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", "MODEL.BACKBONE.WEIGHTS", "", *opts])
    return cfg


def _randomize(tv, g):
    """Spread-out statistics, biases and class scores, so every converted tensor matters and many
    detections pass the 0.05 score threshold."""
    randomize_batchnorms(tv.backbone.body.modules(), g)
    with torch.no_grad():
        for m in tv.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear, nn.ConvTranspose2d)) and m.bias is not None:
                m.bias.add_(torch.randn(m.bias.shape, generator=g) * 0.05)
        tv.rpn.head.cls_logits.weight.normal_(0, 0.002, generator=g)
        tv.roi_heads.box_predictor.cls_score.weight.normal_(0, 0.3, generator=g)
        tv.roi_heads.box_predictor.bbox_pred.weight.normal_(0, 0.01, generator=g)
        # mask logits far from 0, so that thresholding at 0.5 is not decided by rounding
        tv.roi_heads.mask_predictor.mask_fcn_logits.weight.normal_(0, 0.5, generator=g)


@pytest.fixture(scope="module")
def models():
    return build_pair()


def build_pair():
    """(torchvision model, ours with its converted weights, images)."""
    cfg = _cfg()
    torch.manual_seed(0)
    min_size = min(min(s) for s in IMAGE_SIZES)
    tv = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91,
                               min_size=min_size, max_size=1000,
                               # our normalisation on 0-255 input: both see the same pixels
                               image_mean=list(cfg.MODEL.PIXEL_MEAN),
                               image_std=list(cfg.MODEL.PIXEL_STD))
    _randomize(tv, torch.Generator().manual_seed(1))
    # as torchvision builds it for its released COCO weights: FrozenBatchNorm with eps 0
    tv.backbone.body = convert_frozen_batchnorm(tv.backbone.body)
    overwrite_eps(tv, 0.0)
    ours = build_model(cfg)
    ours.load_state_dict(convert_torchvision_maskrcnn_state_dict(tv.state_dict(),
                                                                 ours.state_dict()))
    g = torch.Generator().manual_seed(2)
    images = [torch.randint(0, 256, (3, h, w), generator=g).float() for h, w in IMAGE_SIZES]
    return tv, ours, images


def _ours_inputs(images, targets=None):
    inputs = []
    for i, image in enumerate(images):
        item = {"image": image.clone(), "height": image.shape[1], "width": image.shape[2],
                "image_id": i}
        if targets is not None:
            t = targets[i]
            item["instances"] = Instances(image.shape[1:], gt_boxes=Boxes(t["boxes"]),
                                          gt_classes=t["labels"] - 1,  # background moved last
                                          gt_masks=BitMasks(t["masks"].bool()))
        inputs.append(item)
    return inputs


def _order(boxes, scores, labels):
    return sorted(range(len(scores)), key=lambda i: (-round(float(scores[i]), 4), int(labels[i]),
                                                     *[round(float(v), 2) for v in boxes[i]]))


def test_proposals_match_torchvision(models):
    tv, ours, images = models
    tv.eval()
    ours.eval()
    with torch.no_grad():
        tv_images, _ = tv.transform([im.clone() for im in images])
        tv_features = tv.backbone(tv_images.tensors)
        tv_proposals, _ = tv.rpn(TvImageList(tv_images.tensors, tv_images.image_sizes),
                                 tv_features)
        batch = ours.preprocess_image(_ours_inputs(images))
        features = ours.neck(ours.backbone(batch.tensor))
        proposals, _ = ours.proposal_generator(batch.image_sizes, features, None,
                                               padded_size=tuple(batch.tensor.shape[-2:]))
    assert tuple(batch.tensor.shape[-2:]) == tuple(tv_images.tensors.shape[-2:])
    for theirs, mine in zip(tv_proposals, proposals):
        assert len(theirs) == len(mine) > 100
        logits = mine.objectness_logits
        # ordered by score in both; torchvision ranks sigmoid probabilities, which must not tie
        assert float(logits.abs().max()) < 12, float(logits.abs().max())
        diff = (mine.proposal_boxes.tensor - theirs).abs().max()
        print(f"{len(mine)} proposals: max |box diff| {diff:.1e} px")
        assert diff <= 1e-3


def test_detections_and_masks_match_torchvision(models):
    tv, ours, images = models
    tv.eval()
    ours.eval()
    with torch.no_grad():
        expected = tv([im.clone() for im in images])
        got = ours(_ours_inputs(images))
    for (h, w), exp, out in zip(IMAGE_SIZES, expected, got):
        inst = out["instances"]
        assert inst.image_size == (h, w) and inst.pred_masks.shape[1:] == (h, w)
        assert 20 <= len(exp["scores"]) and len(inst) == len(exp["scores"])
        e_order = _order(exp["boxes"], exp["scores"], exp["labels"])
        o_order = _order(inst.pred_boxes.tensor, inst.scores, inst.pred_classes + 1)
        e_labels = exp["labels"][e_order]
        o_labels = inst.pred_classes[o_order] + 1
        assert torch.equal(o_labels, e_labels)
        score_diff = (inst.scores[o_order] - exp["scores"][e_order]).abs().max()
        box_diff = (inst.pred_boxes.tensor[o_order] - exp["boxes"][e_order]).abs().max()
        e_masks = exp["masks"][e_order, 0] > 0.5
        o_masks = inst.pred_masks[o_order]
        inter = (e_masks & o_masks).flatten(1).sum(1).float()
        union = (e_masks | o_masks).flatten(1).sum(1).float()
        iou = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
        print(f"{len(inst)} detections on {h}x{w}: max |score diff| {score_diff:.1e}, max |box "
              f"diff| {box_diff:.1e} px, min mask IoU {float(iou.min()):.4f}")
        assert score_diff <= 1e-4 and box_diff <= 1e-3
        assert float(iou.min()) >= 0.99


def test_training_losses_match_torchvision(models):
    tv, ours, images = models
    g = torch.Generator().manual_seed(3)
    targets = []
    for h, w in IMAGE_SIZES:
        boxes = torch.tensor([[10.0, 20.0, 120.0, 150.0], [150.0, 30.0, 280.0, 250.0],
                              [40.0, 60.0, 90.0, 100.0]])
        masks = torch.zeros(3, h, w, dtype=torch.uint8)
        for k, (x1, y1, x2, y2) in enumerate(boxes.int().tolist()):
            masks[k, y1:y2, x1:x2] = (torch.rand(y2 - y1, x2 - x1, generator=g) > 0.3)
        targets.append({"boxes": boxes, "labels": torch.tensor([1, 18, 90]), "masks": masks})
    # every candidate taken on both sides: no randomness left in the sampling
    tv.rpn.fg_bg_sampler.batch_size_per_image = EVERY_CANDIDATE
    tv.rpn.fg_bg_sampler.positive_fraction = 1.0
    tv.roi_heads.fg_bg_sampler.batch_size_per_image = EVERY_CANDIDATE
    tv.roi_heads.fg_bg_sampler.positive_fraction = 1.0
    ours.proposal_generator.batch_size_per_image = EVERY_CANDIDATE
    ours.proposal_generator.positive_fraction = 1.0
    ours.roi_heads.batch_size_per_image = EVERY_CANDIDATE
    ours.roi_heads.positive_fraction = 1.0
    tv.train()
    ours.train()
    with torch.no_grad():
        expected = tv([im.clone() for im in images],
                      [{k: v.clone() for k, v in t.items()} for t in targets])
        got = ours(_ours_inputs(images, targets))
    pairs = {"loss_rpn_cls": "loss_objectness", "loss_rpn_loc": "loss_rpn_box_reg",
             "loss_cls": "loss_classifier", "loss_box_reg": "loss_box_reg",
             "loss_mask": "loss_mask"}
    assert set(got) == set(pairs)
    for ours_key, tv_key in pairs.items():
        rel = abs(float(got[ours_key]) - float(expected[tv_key])) / float(expected[tv_key])
        print(f"{ours_key}: ours {float(got[ours_key]):.6f}, torchvision "
              f"{float(expected[tv_key]):.6f}, relative difference {rel:.1e}")
    for ours_key, tv_key in pairs.items():
        torch.testing.assert_close(got[ours_key], expected[tv_key], rtol=1e-4, atol=0)
