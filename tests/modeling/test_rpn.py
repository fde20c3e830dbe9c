"""The RPN: its head, losses, labelling and proposal selection, and equality with torchvision's
RegionProposalNetwork (same weights, same features)."""
import logging
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torchvision.models.detection.anchor_utils import AnchorGenerator as TVAnchorGenerator
from torchvision.models.detection.image_list import ImageList as TVImageList
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead

from detector.config import get_cfg
from detector.layers import ShapeSpec
from detector.modeling import (
    PROPOSAL_GENERATOR_REGISTRY,
    RPN,
    AnchorGenerator,
    BoxCoder,
    Matcher,
    StandardRPNHead,
    build_proposal_generator,
    rpn_losses,
)
from detector.modeling.losses import rpn_loss_count
from detector.structures import Boxes, Instances
from log_capture import CollectLogs

LEVELS = ["p2", "p3", "p4", "p5", "p6"]
SHAPES = {f"p{k}": ShapeSpec(channels=64, stride=2 ** k) for k in range(2, 7)}
PADDED = (128, 192)
IMAGE_SIZES = [(128, 192), (120, 170)]


def torchvision_cfg(*overrides):
    """Our config with torchvision's Mask R-CNN RPN settings, on a 64-channel pyramid."""
    cfg = get_cfg()
    cfg.merge_from_list([
        "MODEL.ANCHOR_GENERATOR.SIZES", "[[32], [64], [128], [256], [512]]",
        "MODEL.ANCHOR_GENERATOR.SCALES", "[1.0]",
        "MODEL.ANCHOR_GENERATOR.RATIOS", "[0.5, 1.0, 2.0]",
        "MODEL.ANCHOR_GENERATOR.STRIDES", "[4, 8, 16, 32, 64]",
        "MODEL.ANCHOR_GENERATOR.ROUND_BASE_ANCHORS", "True",
        "MODEL.PROPOSAL_GENERATOR.MIN_SIZE", "1e-3",
        "MODEL.RPN.SMOOTH_L1_BETA", str(1 / 9),
        "MODEL.RPN.LOSS_NORMALIZATION", "num_sampled",
        "MODEL.RPN.POST_NMS_TOPK_TRAIN", "2000",
        *overrides,
    ])
    return cfg


def build_pair(batch_size_per_image=256, positive_fraction=0.5, seed=0):
    """torchvision's RPN and ours from the config, with the same (copied) head weights."""
    torch.manual_seed(seed)
    tv_head = RPNHead(64, 3)
    for conv in (tv_head.conv[0][0], tv_head.cls_logits, tv_head.bbox_pred):
        # larger than the 0.01 init, so scores and boxes vary enough to exercise NMS and top-k
        torch.nn.init.normal_(conv.weight, std=0.1)
        torch.nn.init.normal_(conv.bias, std=0.1)
    tv_anchors = TVAnchorGenerator(sizes=((32,), (64,), (128,), (256,), (512,)),
                                   aspect_ratios=((0.5, 1.0, 2.0),) * 5)
    tv_rpn = RegionProposalNetwork(
        tv_anchors, tv_head, fg_iou_thresh=0.7, bg_iou_thresh=0.3,
        batch_size_per_image=batch_size_per_image, positive_fraction=positive_fraction,
        pre_nms_top_n={"training": 2000, "testing": 1000},
        post_nms_top_n={"training": 2000, "testing": 1000}, nms_thresh=0.7)
    cfg = torchvision_cfg("MODEL.RPN.BATCH_SIZE_PER_IMAGE", str(batch_size_per_image),
                          "MODEL.RPN.POSITIVE_FRACTION", str(positive_fraction))
    ours = build_proposal_generator(cfg, SHAPES)
    with torch.no_grad():
        ours.head.convs[0].weight.copy_(tv_head.conv[0][0].weight)
        ours.head.convs[0].bias.copy_(tv_head.conv[0][0].bias)
        ours.head.objectness_logits.weight.copy_(tv_head.cls_logits.weight)
        ours.head.objectness_logits.bias.copy_(tv_head.cls_logits.bias)
        ours.head.anchor_deltas.weight.copy_(tv_head.bbox_pred.weight)
        ours.head.anchor_deltas.bias.copy_(tv_head.bbox_pred.bias)
    return tv_rpn, ours


def random_features(seed=1, num_images=2):
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(num_images, 64, PADDED[0] // s.stride, PADDED[1] // s.stride,
                              generator=g) for name, s in SHAPES.items()}


def random_gt(seed=2):
    """2-4 boxes of 20-90 px per image, inside the image."""
    g = torch.Generator().manual_seed(seed)
    gt = []
    for i, (h, w) in enumerate(IMAGE_SIZES):
        n = 2 + i * 2
        wh = 20 + torch.rand(n, 2, generator=g) * 70
        xy = torch.rand(n, 2, generator=g) * (torch.tensor([w, h]) - wh)
        gt.append(Instances((h, w), gt_boxes=Boxes(torch.cat([xy, xy + wh], dim=1)),
                            gt_classes=torch.zeros(n, dtype=torch.int64)))
    return gt


def tv_image_list(num_images=2):
    return TVImageList(torch.zeros(num_images, 3, *PADDED), IMAGE_SIZES[:num_images])


# --------------------------------------------------------------------------------------------
# equality with torchvision
# --------------------------------------------------------------------------------------------
def test_eval_proposals_equal_torchvision(single_thread):
    tv_rpn, ours = build_pair()
    tv_rpn.eval(), ours.eval()
    features = random_features()
    with torch.no_grad():
        tv_boxes, tv_losses = tv_rpn(tv_image_list(), dict(features))
        proposals, losses = ours(IMAGE_SIZES, features)
    assert tv_losses == {} and losses == {}
    for tv_b, prop, size in zip(tv_boxes, proposals, IMAGE_SIZES):
        # enough NMS and clipping happen for the comparison to mean something
        assert 100 < len(prop) <= 1000 and prop.image_size == size
        assert len(prop) == len(tv_b)
        assert torch.allclose(prop.proposal_boxes.tensor, tv_b, rtol=0, atol=1e-3)
        scores = prop.objectness_logits
        assert torch.all(scores[:-1] >= scores[1:])
        assert not prop.proposal_boxes.tensor.requires_grad and not scores.requires_grad


def test_train_losses_gradients_and_proposals_equal_torchvision(single_thread):
    # every anchor sampled by both (6138 anchors < 10000), so the sampling is deterministic
    tv_rpn, ours = build_pair(batch_size_per_image=10000, positive_fraction=0.5)
    tv_rpn.train(), ours.train()
    features = random_features()
    gt = random_gt()
    targets = [{"boxes": inst.gt_boxes.tensor} for inst in gt]
    tv_boxes, tv_losses = tv_rpn(tv_image_list(), dict(features), targets)
    proposals, losses = ours(IMAGE_SIZES, features, gt)
    assert set(losses) == {"loss_rpn_cls", "loss_rpn_loc"}
    assert losses["loss_rpn_cls"].item() == pytest.approx(tv_losses["loss_objectness"].item(),
                                                          rel=1e-4)
    assert losses["loss_rpn_loc"].item() == pytest.approx(tv_losses["loss_rpn_box_reg"].item(),
                                                          rel=1e-4)
    assert losses["loss_rpn_loc"].item() > 0
    sum(tv_losses.values()).backward()
    sum(losses.values()).backward()
    for tv_param, param in [(tv_rpn.head.conv[0][0].weight, ours.head.convs[0].weight),
                            (tv_rpn.head.cls_logits.weight, ours.head.objectness_logits.weight),
                            (tv_rpn.head.bbox_pred.bias, ours.head.anchor_deltas.bias)]:
        scale = tv_param.grad.abs().max()
        assert torch.allclose(param.grad, tv_param.grad, rtol=1e-4, atol=1e-4 * scale)
    for tv_b, prop in zip(tv_boxes, proposals):
        assert len(prop) == len(tv_b) > 1000  # the training top-k (2000 pre-NMS per level)
        assert torch.allclose(prop.proposal_boxes.tensor, tv_b, rtol=0, atol=1e-3)


# --------------------------------------------------------------------------------------------
# parts
# --------------------------------------------------------------------------------------------
def test_head_shapes_conv_dims_and_registry():
    head = StandardRPNHead(in_channels=8, num_anchors=3, conv_dims=[16, -1])
    assert [c.out_channels for c in head.convs] == [16, 8] and head.num_classes == 1
    logits, deltas = head([torch.randn(2, 8, 6, 5), torch.randn(2, 8, 3, 2)])
    assert [tuple(x.shape) for x in logits] == [(2, 3, 6, 5), (2, 3, 3, 2)]
    assert [tuple(x.shape) for x in deltas] == [(2, 12, 6, 5), (2, 12, 3, 2)]
    with pytest.raises(ValueError, match=r"MODEL.RPN.CONV_DIMS=\[0\]"):
        StandardRPNHead(in_channels=8, num_anchors=3, conv_dims=[0])
    assert "RPN" in PROPOSAL_GENERATOR_REGISTRY


def test_losses_hand_computed():
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [10.0, 10.0, 30.0, 20.0],
                            [0.0, 0.0, 4.0, 4.0]])
    gt_box = torch.tensor([1.0, 2.0, 13.0, 10.0])
    logits = torch.tensor([[0.5, -1.0, 3.0]])
    deltas = torch.tensor([[[0.1, 0.0, 0.2, -0.05], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]]])
    labels = torch.tensor([[1, 0, -1]])  # positive, negative, not sampled
    matched = gt_box.expand(1, 3, 4)
    beta = 1 / 9
    # anchor 0 -> gt: centre (5, 5) -> (7, 6), size 10x10 -> 12x8
    target = [0.2, 0.1, math.log(1.2), math.log(0.8)]
    pred = [0.1, 0.0, 0.2, -0.05]

    def smooth_l1(x):
        return 0.5 * x * x / beta if abs(x) < beta else abs(x) - 0.5 * beta

    box_sum = sum(smooth_l1(p - t) for p, t in zip(pred, target))
    bce_sum = math.log(1 + math.exp(-0.5)) + math.log(1 + math.exp(-1.0))
    losses = rpn_losses(logits, deltas, anchors, labels, matched, box_coder=BoxCoder(),
                        normalizer=2.0, smooth_l1_beta=beta)
    assert losses["loss_rpn_cls"].item() == pytest.approx(bce_sum / 2, rel=1e-6)
    assert losses["loss_rpn_loc"].item() == pytest.approx(box_sum / 2, rel=1e-6)
    weighted = rpn_losses(logits, deltas, anchors, labels, matched, box_coder=BoxCoder(),
                          normalizer=2.0, smooth_l1_beta=beta, loss_weight=2.0,
                          bbox_reg_loss_weight=3.0)
    assert weighted["loss_rpn_cls"].item() == pytest.approx(bce_sum, rel=1e-6)
    assert weighted["loss_rpn_loc"].item() == pytest.approx(3 * box_sum, rel=1e-6)
    # the two normalisers: sampled anchors (torchvision) or images x batch size (detectron2)
    assert rpn_loss_count(labels, normalization="num_sampled", batch_size_per_image=256) == 2
    assert rpn_loss_count(labels, normalization="batch_size", batch_size_per_image=256) == 256
    with pytest.raises(ValueError, match="MODEL.RPN.LOSS_NORMALIZATION='mean'"):
        rpn_loss_count(labels, normalization="mean", batch_size_per_image=256)


def _tiny_rpn(**kwargs):
    """Two levels, one 8x8 anchor per location, strides 8 and 16."""
    anchor_generator = AnchorGenerator(sizes=[[8], [16]], scales=[1.0], ratios=[1.0],
                                       strides=[8, 16])
    defaults = dict(in_features=["p3", "p4"],
                    head=StandardRPNHead(in_channels=4, num_anchors=1),
                    anchor_generator=anchor_generator,
                    anchor_matcher=Matcher([0.3, 0.7], [0, -1, 1]), box_coder=BoxCoder())
    defaults.update(kwargs)
    return RPN(**defaults)


def test_find_top_proposals_clip_size_filter_per_level_nms_and_topk():
    rpn = _tiny_rpn(nms_thresh=0.5, min_box_size=2.0, pre_nms_topk=(3, 3),
                    post_nms_topk=(2, 3)).eval()
    # level 0: three anchors; level 1: one anchor overlapping level 0's first
    anchors = [torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 0.0, 11.0, 10.0],
                             [20.0, 20.0, 21.0, 30.0], [40.0, 0.0, 50.0, 10.0]]),
               torch.tensor([[0.0, 0.0, 10.0, 10.0]])]
    logits = [torch.tensor([[2.0, 1.0, 3.0, -5.0]]), torch.tensor([[0.5]])]
    deltas = [torch.zeros(1, 4, 4), torch.zeros(1, 1, 4)]
    (props,) = rpn.find_top_proposals(anchors, logits, deltas, [(32, 45)])
    # anchor 2 is 1 px wide (< 2), anchor 3 is outside the pre-NMS top-3; anchor 1 is
    # suppressed by anchor 0 on its level; level 1's identical box survives (NMS per level)
    assert props.objectness_logits.tolist() == [2.0, 0.5]
    assert props.proposal_boxes.tensor.tolist() == [[0, 0, 10, 10], [0, 0, 10, 10]]
    # a non-finite score is dropped (logged), so anchor 1 is no longer suppressed
    nan_logits = [torch.tensor([[float("nan"), 1.0, 3.0, -5.0]]), logits[1]]
    with CollectLogs("detector.modeling.proposal_generator.rpn", logging.WARNING) as logs:
        (props,) = rpn.find_top_proposals(anchors, nan_logits, deltas, [(32, 45)])
    assert props.objectness_logits.tolist() == [1.0, 0.5]
    assert "dropped 1 non-finite proposal candidates" in logs.text
    # the objectness probability threshold: sigmoid(0.5) = 0.62 < 0.7 <= sigmoid(2) = 0.88
    rpn.score_thresh = 0.7
    (props,) = rpn.find_top_proposals(anchors, logits, deltas, [(32, 45)])
    assert props.objectness_logits.tolist() == [2.0]
    rpn.score_thresh = 0.0
    # clipping to the image, then the post-NMS top-k of training
    rpn.train()
    logits = [torch.tensor([[2.0, 1.0, 3.0, 4.0]]), torch.tensor([[0.5]])]
    rpn.pre_nms_topk = (4, 4)
    (props,) = rpn.find_top_proposals(anchors, logits, deltas, [(32, 45)])
    assert props.objectness_logits.tolist() == [4.0, 2.0]
    assert props.proposal_boxes.tensor[0].tolist() == [40, 0, 45, 10]


def test_label_and_sample_anchors_generator_crowd_and_fractions():
    rpn = _tiny_rpn(batch_size_per_image=4, positive_fraction=0.25)
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 9.0, 10.0], [0.0, 0.0, 8.0, 10.0],
                            [50.0, 50.0, 60.0, 60.0], [52.0, 50.0, 62.0, 60.0],
                            [80.0, 0.0, 90.0, 10.0], [0.0, 80.0, 10.0, 90.0],
                            [30.0, 30.0, 40.0, 40.0]])
    gt = Instances((100, 100), gt_boxes=Boxes(torch.tensor([[0.0, 0.0, 10.0, 10.0],
                                                             [50.0, 50.0, 62.0, 60.0]])),
                   gt_classes=torch.tensor([0, 1]),
                   gt_is_crowd=torch.tensor([False, True]))
    runs = [rpn.label_and_sample_anchors(anchors, [gt], torch.Generator().manual_seed(3))
            for _ in range(2)]
    labels, matched = runs[0]
    assert torch.equal(labels, runs[1][0])
    # 3 candidate positives (IoU 1, 0.9, 0.8 >= 0.7), one kept; anchors 3 and 4 lie in the
    # crowd box, so they are neither positive nor background; 3 of the 3 negatives fill the rest
    assert (labels[0, :3] == 1).sum() == 1 and (labels[0, :3] == -1).sum() == 2
    assert labels[0, 3:].tolist() == [-1, -1, 0, 0, 0]
    assert torch.equal(matched[0, labels[0] == 1][0], torch.tensor([0.0, 0.0, 10.0, 10.0]))
    # an image without ground truth: only negatives, zeros as matched boxes
    empty = Instances((100, 100), gt_boxes=Boxes(torch.zeros(0, 4)),
                      gt_classes=torch.zeros(0, dtype=torch.int64))
    labels, matched = rpn.label_and_sample_anchors(anchors, [empty])
    assert (labels == 0).sum() == 4 and (labels == 1).sum() == 0 and not matched.any()


def test_training_needs_ground_truth_and_proposals_carry_no_gradient():
    rpn = _tiny_rpn().train()
    features = {"p3": torch.randn(1, 4, 4, 4), "p4": torch.randn(1, 4, 2, 2)}
    with pytest.raises(ValueError, match="needs gt_instances"):
        rpn([(32, 32)], features)
    gt = Instances((32, 32), gt_boxes=Boxes(torch.tensor([[4.0, 4.0, 14.0, 12.0]])),
                   gt_classes=torch.tensor([0]))
    proposals, losses = rpn([(32, 32)], features, [gt])
    assert not proposals[0].proposal_boxes.tensor.requires_grad
    assert losses["loss_rpn_cls"].requires_grad and losses["loss_rpn_loc"].item() > 0
    with pytest.raises(KeyError, match=r"MODEL.RPN.IN_FEATURES"):
        rpn([(32, 32)], {"p3": features["p3"]}, [gt])


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match=r"MODEL.RPN.IN_FEATURES=\['p2', 'p7'\]"):
        build_proposal_generator(torchvision_cfg("MODEL.RPN.IN_FEATURES", "['p2', 'p7']"),
                                 SHAPES)
    with pytest.raises(KeyError, match="MODEL.PROPOSAL_GENERATOR.NAME='RRPN'"):
        build_proposal_generator(torchvision_cfg("MODEL.PROPOSAL_GENERATOR.NAME", "RRPN"), SHAPES)
    with pytest.raises(ValueError, match="MODEL.RPN.IOU_THRESHOLDS"):
        build_proposal_generator(torchvision_cfg("MODEL.RPN.IOU_THRESHOLDS", "[0.7, 0.3]"),
                                 SHAPES)
    with pytest.raises(ValueError, match="MODEL.RPN.BBOX_REG_LOSS_TYPE='l2'"):
        build_proposal_generator(torchvision_cfg("MODEL.RPN.BBOX_REG_LOSS_TYPE", "l2"), SHAPES)
    with pytest.raises(ValueError, match="MODEL.RPN.POST_NMS_TOPK_TRAIN/TEST"):
        build_proposal_generator(torchvision_cfg("MODEL.RPN.POST_NMS_TOPK_TEST", "0"), SHAPES)


# --------------------------------------------------------------------------------------------
# data parallelism: the normaliser summed over ranks makes DDP's average the one-process step
# --------------------------------------------------------------------------------------------
def _two_rank_worker(rank, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        _, rpn = build_pair(batch_size_per_image=10000)
        rpn.train()
        features = {k: v[rank:rank + 1] for k, v in random_features().items()}
        _, losses = rpn(IMAGE_SIZES[rank:rank + 1], features, random_gt()[rank:rank + 1])
        sum(losses.values()).backward()
        torch.save(rpn.head.convs[0].weight.grad, os.path.join(out_dir, f"grad{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_rank_normalizer_gives_the_one_process_gradient(tmp_path, single_thread):
    mp.spawn(_two_rank_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    _, rpn = build_pair(batch_size_per_image=10000)
    rpn.train()
    _, losses = rpn(IMAGE_SIZES, random_features(), random_gt())
    sum(losses.values()).backward()
    expected = rpn.head.convs[0].weight.grad
    grads = [torch.load(tmp_path / f"grad{r}.pt", weights_only=True) for r in range(2)]
    average = (grads[0] + grads[1]) / 2  # what DDP does
    scale = expected.abs().max()
    assert torch.allclose(average, expected, rtol=1e-4, atol=1e-5 * scale)
    # each process dividing by its own sample count would be a different step
    naive = []
    for i in range(2):
        rpn.zero_grad()
        features = {k: v[i:i + 1] for k, v in random_features().items()}
        _, losses = rpn(IMAGE_SIZES[i:i + 1], features, random_gt()[i:i + 1])
        sum(losses.values()).backward()
        naive.append(rpn.head.convs[0].weight.grad.clone())
    assert not torch.allclose((naive[0] + naive[1]) / 2, expected, rtol=1e-2)
