"""RoI heads, poolers and the Fast / Mask R-CNN losses, against torchvision's modules with the
same weights and inputs."""
from functools import partial

import numpy as np
import pytest
import torch
from torch import nn
from torchvision.models.detection.faster_rcnn import (
    FastRCNNConvFCHead,
    FastRCNNPredictor,
    TwoMLPHead,
)
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.ops import MultiScaleRoIAlign

from detector.config import get_cfg
from detector.layers import ShapeSpec
from detector.modeling import ROIPooler, build_roi_heads
from detector.modeling.roi_heads import MaskRCNNConvUpsampleHead, assign_boxes_to_levels
from detector.structures import BitMasks, Boxes, Instances, PolygonMasks
from detector.utils import comm

CHANNELS, NUM_CLASSES, FC_DIM = 64, 3, 128
IMAGE_SIZE = (128, 192)  # (h, w)
STRIDES = (4, 8, 16, 32)
# a smaller canonical box than 224 px spreads boxes of a 128 x 192 image over P2-P5
CANONICAL_BOX_SIZE = 48


@pytest.fixture(autouse=True)
def _one_thread(single_thread):
    yield


def _cfg(**overrides):
    cfg = get_cfg()
    cfg.merge_from_list([
        "MODEL.MASK_ON", "True",
        "MODEL.ROI_HEADS.NUM_CLASSES", str(NUM_CLASSES),
        "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "100000",
        "MODEL.ROI_HEADS.POSITIVE_FRACTION", "1.0",
        "MODEL.ROI_HEADS.MIN_BOX_SIZE_TEST", "0.01",
        "MODEL.ROI_BOX_HEAD.FC_DIM", str(FC_DIM),
        "MODEL.ROI_BOX_HEAD.SMOOTH_L1_BETA", str(1 / 9),
        "MODEL.ROI_BOX_HEAD.POOLER_TYPE", "ROIAlign",
        "MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO", "2",
        "MODEL.ROI_MASK_HEAD.CONV_DIM", str(CHANNELS),
        "MODEL.ROI_MASK_HEAD.POOLER_TYPE", "ROIAlign",
        "MODEL.ROI_MASK_HEAD.POOLER_SAMPLING_RATIO", "2",
        "MODEL.ROI_MASK_HEAD.TARGET_TYPE", "soft",
        "MODEL.GN.NUM_GROUPS", "8",
    ])
    for key, value in overrides.items():
        cfg.merge_from_list([key, value])
    return cfg


def _input_shapes():
    return {f"p{i}": ShapeSpec(CHANNELS, 2 ** i) for i in range(2, 7)}


def _ours(cfg=None):
    torch.manual_seed(0)
    heads = build_roi_heads(cfg or _cfg(), _input_shapes())
    for name in ("box_pooler", "mask_pooler"):
        old = getattr(heads, name)
        setattr(heads, name, ROIPooler(output_size=old.output_size[0], strides=STRIDES,
                                       sampling_ratio=2, aligned=False,
                                       canonical_box_size=CANONICAL_BOX_SIZE))
    return heads


def _torchvision_pair():
    """torchvision's RoIHeads and ours with the same weights (background row moved last,
    torchvision's background box deltas and mask channel dropped)."""
    torch.manual_seed(0)
    pool = partial(MultiScaleRoIAlign, ["0", "1", "2", "3"], sampling_ratio=2,
                   canonical_scale=CANONICAL_BOX_SIZE)
    tv = RoIHeads(
        box_roi_pool=pool(output_size=7), box_head=TwoMLPHead(CHANNELS * 49, FC_DIM),
        box_predictor=FastRCNNPredictor(FC_DIM, NUM_CLASSES + 1), fg_iou_thresh=0.5,
        bg_iou_thresh=0.5, batch_size_per_image=100000, positive_fraction=1.0,
        bbox_reg_weights=None, score_thresh=0.05, nms_thresh=0.5, detections_per_img=100,
        mask_roi_pool=pool(output_size=14), mask_head=MaskRCNNHeads(CHANNELS, [CHANNELS] * 4, 1),
        mask_predictor=MaskRCNNPredictor(CHANNELS, CHANNELS, NUM_CLASSES + 1))
    with torch.no_grad():
        # wider logits so that the classes and scores differ clearly between proposals
        tv.box_predictor.cls_score.weight.mul_(20.0)
        tv.box_predictor.bbox_pred.weight.mul_(5.0)
    ours = _ours()
    class_order = list(range(1, NUM_CLASSES + 1)) + [0]
    state = {
        "box_head.fc1.weight": tv.box_head.fc6.weight, "box_head.fc1.bias": tv.box_head.fc6.bias,
        "box_head.fc2.weight": tv.box_head.fc7.weight, "box_head.fc2.bias": tv.box_head.fc7.bias,
        "box_predictor.cls_score.weight": tv.box_predictor.cls_score.weight[class_order],
        "box_predictor.cls_score.bias": tv.box_predictor.cls_score.bias[class_order],
        "box_predictor.bbox_pred.weight": tv.box_predictor.bbox_pred.weight[4:],
        "box_predictor.bbox_pred.bias": tv.box_predictor.bbox_pred.bias[4:],
        "mask_head.deconv.weight": tv.mask_predictor.conv5_mask.weight,
        "mask_head.deconv.bias": tv.mask_predictor.conv5_mask.bias,
        "mask_head.predictor.weight": tv.mask_predictor.mask_fcn_logits.weight[1:],
        "mask_head.predictor.bias": tv.mask_predictor.mask_fcn_logits.bias[1:],
    }
    for i in range(4):
        state[f"mask_head.mask_fcn{i + 1}.0.weight"] = tv.mask_head[i][0].weight
        state[f"mask_head.mask_fcn{i + 1}.0.bias"] = tv.mask_head[i][0].bias
    ours.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=True)
    return tv, ours


def _random_boxes(g, n, min_side, max_side, size=IMAGE_SIZE):
    h, w = size
    wh = min_side + torch.rand(n, 2, generator=g) * (max_side - min_side)
    xy = torch.rand(n, 2, generator=g) * (torch.tensor([w, h]) - wh)
    return torch.cat([xy, xy + wh], dim=1)


def _inputs(seed=0, num_images=2, num_gt=3, num_proposals=40):
    """Features, proposals (random and jittered ground truth) and ground truth with masks."""
    g = torch.Generator().manual_seed(seed)
    h, w = IMAGE_SIZE
    features = {f"p{i}": torch.randn(num_images, CHANNELS, h // 2 ** i, w // 2 ** i,
                                     generator=g) for i in range(2, 7)}
    proposals, gts = [], []
    for _ in range(num_images):
        gt_boxes = _random_boxes(g, num_gt, 16, 100)
        jittered = gt_boxes.repeat(4, 1) + torch.randn(4 * num_gt, 4, generator=g) * 4
        boxes = torch.cat([_random_boxes(g, num_proposals - 4 * num_gt, 4, 120), jittered])
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
        proposals.append(Instances(IMAGE_SIZE, proposal_boxes=Boxes(boxes),
                                   objectness_logits=torch.zeros(len(boxes))))
        ys, xs = torch.arange(h)[:, None] + 0.5, torch.arange(w)[None, :] + 0.5
        inside = ((xs >= gt_boxes[:, 0, None, None]) & (xs <= gt_boxes[:, 2, None, None])
                  & (ys >= gt_boxes[:, 1, None, None]) & (ys <= gt_boxes[:, 3, None, None]))
        masks = inside & (torch.rand(num_gt, h, w, generator=g) < 0.7)
        classes = torch.randint(0, NUM_CLASSES, (num_gt,), generator=g)
        gts.append(Instances(IMAGE_SIZE, gt_boxes=Boxes(gt_boxes), gt_classes=classes,
                             gt_masks=BitMasks(masks)))
    return features, proposals, gts


def _tv_call(tv, features, proposals, gts):
    tv_features = {str(i): features[f"p{i + 2}"] for i in range(4)}
    targets = None
    if gts is not None:
        targets = [{"boxes": g.gt_boxes.tensor, "labels": g.gt_classes + 1,
                    "masks": g.gt_masks.tensor.to(torch.uint8)} for g in gts]
    return tv(tv_features, [p.proposal_boxes.tensor for p in proposals],
              [IMAGE_SIZE] * len(proposals), targets)


def test_pooler_matches_multiscale_roi_align():
    g = torch.Generator().manual_seed(1)
    size = (576, 576)
    features = [torch.randn(2, 8, size[0] // s, size[1] // s, generator=g) for s in STRIDES]
    boxes = [_random_boxes(g, 30, 4, 570, size), _random_boxes(g, 25, 4, 570, size)]
    boxes[1][-3:] = torch.tensor([[3.5, 10.25, 560, 570], [20, 0, 575, 500], [0, 0, 440, 460]])
    tv_pool = MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)
    expected = tv_pool({str(i): f for i, f in enumerate(features)}, boxes, [size, size])
    pooler = ROIPooler(output_size=7, strides=STRIDES, sampling_ratio=2, aligned=False)
    levels = assign_boxes_to_levels(boxes, 2, 5)
    assert set(levels.tolist()) == {0, 1, 2, 3}
    torch.testing.assert_close(pooler(features, boxes), expected, rtol=0, atol=1e-6)
    # the canonical rule: a 224 x 224 box is pooled from P4, 112 from P3, 448 from P5
    square = [torch.tensor([[0.0, 0, 224, 224], [0, 0, 112, 112], [0, 0, 448, 448]])]
    assert assign_boxes_to_levels(square, 2, 5).tolist() == [2, 1, 3]


def test_pooler_rejects_non_pyramid_strides():
    with pytest.raises(ValueError, match="consecutive powers of two"):
        ROIPooler(output_size=7, strides=[4, 16])


def test_eval_matches_torchvision():
    tv, ours = _torchvision_pair()
    tv.eval(), ours.eval()
    features, proposals, _ = _inputs()
    with torch.no_grad():
        expected, _ = _tv_call(tv, features, proposals, None)
        results, losses = ours(features=features, proposals=proposals,
                               image_sizes=[IMAGE_SIZE] * 2)
    assert losses == {}
    for exp, res in zip(expected, results):
        assert len(exp["boxes"]) > 5 and len(res) == len(exp["boxes"])
        assert len(set(exp["labels"].tolist())) > 1
        torch.testing.assert_close(res.pred_boxes.tensor, exp["boxes"], rtol=0, atol=1e-3)
        torch.testing.assert_close(res.scores, exp["scores"], rtol=0, atol=1e-4)
        assert torch.equal(res.pred_classes + 1, exp["labels"])
        assert res.pred_masks.shape == (len(res), 1, 28, 28)
        torch.testing.assert_close(res.pred_masks, exp["masks"], rtol=0, atol=1e-4)


def test_eval_without_proposals_gives_empty_detections():
    heads = _ours().eval()
    features, proposals, _ = _inputs()
    proposals[1] = proposals[1][torch.zeros(len(proposals[1]), dtype=torch.bool)]
    with torch.no_grad():
        results, _ = heads([IMAGE_SIZE] * 2, features, proposals)
    assert len(results[0]) > 0 and len(results[1]) == 0
    assert results[1].pred_masks.shape == (0, 1, 28, 28)
    assert results[1].pred_boxes.tensor.shape == (0, 4)


def test_train_losses_match_torchvision():
    tv, ours = _torchvision_pair()
    tv.train(), ours.train()
    features, proposals, gts = _inputs()
    _, expected = _tv_call(tv, features, proposals, gts)
    results, losses = ours([IMAGE_SIZE] * 2, features, proposals, gts)
    assert results == []
    assert set(losses) == {"loss_cls", "loss_box_reg", "loss_mask"}
    for ours_key, tv_key in [("loss_cls", "loss_classifier"), ("loss_box_reg", "loss_box_reg"),
                             ("loss_mask", "loss_mask")]:
        assert expected[tv_key] > 0
        torch.testing.assert_close(losses[ours_key], expected[tv_key], rtol=1e-4, atol=0)
    sum(losses.values()).backward()
    assert ours.mask_head.mask_fcn1[0].weight.grad.abs().sum() > 0


def test_polygon_masks_give_the_same_targets_as_their_bitmasks():
    features, proposals, gts = _inputs(seed=3)
    heads = _ours(_cfg(**{"MODEL.ROI_MASK_HEAD.TARGET_TYPE": "binary"})).train()
    polygons = PolygonMasks([[np.array([10.0, 10, 60, 12, 50, 70, 12, 40])],
                             [np.array([100.0, 30, 150, 30, 150, 90, 100, 90])],
                             [np.array([30.0, 80, 90, 80, 60, 120])]])
    as_polygons, as_bitmasks = [], []
    for gt in gts:
        boxes = polygons.get_bounding_boxes()
        as_polygons.append(Instances(IMAGE_SIZE, gt_boxes=boxes, gt_classes=gt.gt_classes,
                                     gt_masks=polygons))
        as_bitmasks.append(Instances(IMAGE_SIZE, gt_boxes=boxes, gt_classes=gt.gt_classes,
                                     gt_masks=polygons.to_bitmasks(*IMAGE_SIZE)))
    g = torch.Generator().manual_seed(0)
    loss_polygons = heads([IMAGE_SIZE] * 2, features, proposals, as_polygons,
                          generator=g)[1]["loss_mask"]
    loss_bitmasks = heads([IMAGE_SIZE] * 2, features, proposals, as_bitmasks)[1]["loss_mask"]
    torch.testing.assert_close(loss_polygons, loss_bitmasks, rtol=1e-6, atol=0)


def test_crowd_ground_truth_is_left_out():
    features, proposals, gts = _inputs(seed=4)
    heads = _ours().train()
    with_crowd = []
    for gt in gts:
        crowd = Instances(IMAGE_SIZE, gt_boxes=Boxes(torch.tensor([[0.0, 0, 190, 126]])),
                          gt_classes=torch.tensor([0]),
                          gt_masks=BitMasks(torch.ones(1, *IMAGE_SIZE, dtype=torch.bool)))
        crowd.gt_is_crowd = torch.tensor([True])
        gt = Instances(IMAGE_SIZE, **gt.get_fields())
        gt.gt_is_crowd = torch.zeros(len(gt), dtype=torch.bool)
        with_crowd.append(Instances.cat([gt, crowd]))
    expected = heads([IMAGE_SIZE] * 2, features, proposals, gts)[1]
    losses = heads([IMAGE_SIZE] * 2, features, proposals, with_crowd)[1]
    for key in expected:
        torch.testing.assert_close(losses[key], expected[key], rtol=1e-6, atol=0)


def test_images_without_objects_and_sampling_generator():
    features, proposals, gts = _inputs(seed=5)
    heads = _ours(_cfg(**{"MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE": "16",
                          "MODEL.ROI_HEADS.POSITIVE_FRACTION": "0.25"})).train()
    empty = Instances(IMAGE_SIZE, gt_boxes=Boxes(torch.zeros(0, 4)),
                      gt_classes=torch.zeros(0, dtype=torch.int64),
                      gt_masks=BitMasks(torch.zeros(0, *IMAGE_SIZE, dtype=torch.bool)))
    losses = heads([IMAGE_SIZE] * 2, features, proposals, [empty, empty])[1]
    assert losses["loss_box_reg"] == 0 and losses["loss_mask"] == 0 and losses["loss_cls"] > 0
    sum(losses.values()).backward()  # every branch stays in the graph

    def run(seed):
        return heads([IMAGE_SIZE] * 2, features, proposals, gts,
                      generator=torch.Generator().manual_seed(seed))[1]
    first, again, other = run(0), run(0), run(1)
    for key in first:
        assert torch.equal(first[key], again[key])
    assert any(not torch.equal(first[k], other[k]) for k in first)
    sample = heads.label_and_sample_proposals(proposals[0].proposal_boxes.tensor, gts[0],
                                              torch.Generator().manual_seed(0))
    assert len(sample.boxes) == 16
    assert int((sample.gt_classes < NUM_CLASSES).sum()) == 4


def test_conv_fc_box_head_with_group_norm_matches_torchvision():
    cfg = _cfg(**{"MODEL.ROI_BOX_HEAD.NUM_CONV": "4", "MODEL.ROI_BOX_HEAD.CONV_DIM": "32",
                  "MODEL.ROI_BOX_HEAD.NUM_FC": "1", "MODEL.ROI_BOX_HEAD.NORM": "GN"})
    heads = build_roi_heads(cfg, _input_shapes())
    ours = heads.box_head
    torch.manual_seed(0)
    tv = FastRCNNConvFCHead((CHANNELS, 7, 7), [32] * 4, [FC_DIM],
                            norm_layer=partial(nn.GroupNorm, 8))
    state = {"fc1.weight": tv[5].weight, "fc1.bias": tv[5].bias}
    for i in range(4):
        state[f"conv{i + 1}.0.weight"] = tv[i][0].weight
        state[f"conv{i + 1}.1.weight"] = tv[i][1].weight
        state[f"conv{i + 1}.1.bias"] = tv[i][1].bias
    ours.load_state_dict(state, strict=True)
    x = torch.randn(5, CHANNELS, 7, 7)
    assert ours.output_size == FC_DIM
    torch.testing.assert_close(ours(x), tv(x), rtol=1e-5, atol=1e-5)


def test_class_agnostic_heads_with_giou_loss():
    cfg = _cfg(**{"MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG": "True",
                  "MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE": "giou",
                  "MODEL.ROI_MASK_HEAD.CLS_AGNOSTIC_MASK": "True"})
    heads = _ours(cfg)
    assert heads.box_predictor.bbox_pred.out_features == 4
    assert heads.mask_head.predictor.out_channels == 1
    features, proposals, gts = _inputs(seed=6)
    losses = heads.train()([IMAGE_SIZE] * 2, features, proposals, gts)[1]
    assert all(torch.isfinite(v) and v > 0 for v in losses.values())
    with torch.no_grad():
        results = heads.eval()([IMAGE_SIZE] * 2, features, proposals)[0]
    assert len(results[0]) > 0 and results[0].pred_masks.shape[1:] == (1, 28, 28)
    # one regressed box per proposal, shared by its classes
    boxes = results[0].pred_boxes.tensor
    assert len(torch.unique(boxes, dim=0)) <= len(proposals[0])


def test_bad_pooler_type_names_the_key():
    with pytest.raises(ValueError, match="MODEL.ROI_MASK_HEAD.POOLER_TYPE"):
        build_roi_heads(_cfg(**{"MODEL.ROI_MASK_HEAD.POOLER_TYPE": "ROIPool"}), _input_shapes())


def test_bad_iou_thresholds_name_the_key():
    with pytest.raises(ValueError, match="MODEL.ROI_HEADS.IOU_THRESHOLDS"):
        build_roi_heads(_cfg(**{"MODEL.ROI_HEADS.IOU_THRESHOLDS": "[0.5, 0.4]",
                                "MODEL.ROI_HEADS.IOU_LABELS": "[0, -1, 1]"}), _input_shapes())


def _losses_and_grads(heads, image_idxs, features, proposals, gts):
    heads.zero_grad(set_to_none=True)
    losses = heads([IMAGE_SIZE] * len(image_idxs), {k: v[image_idxs] for k, v in features.items()},
                   [proposals[i] for i in image_idxs], [gts[i] for i in image_idxs])[1]
    sum(losses.values()).backward()
    grads = {n: p.grad.clone() for n, p in heads.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in losses.items()}, grads


@pytest.mark.parametrize("all_ranks", [True, False])
def test_normalizers_summed_over_ranks_give_the_whole_batch_step(monkeypatch, all_ranks):
    """Two simulated ranks of two images each: with the divisors summed over ranks, the mean
    of their losses and gradients (what DDP averages) is the four-image batch's."""
    heads = _ours(_cfg(**{"MODEL.ROI_HEADS.LOSS_NORMALIZER_ALL_RANKS": str(all_ranks)})).train()
    features, proposals, gts = _inputs(seed=2, num_images=4)
    proposals[0] = proposals[0][:20]  # the ranks sample unequal numbers of proposals
    whole, whole_grads = _losses_and_grads(heads, [0, 1, 2, 3], features, proposals, gts)
    with torch.no_grad():
        samples = [heads.label_and_sample_proposals(p.proposal_boxes.tensor, g)
                   for p, g in zip(proposals, gts)]
        counts = torch.stack(heads.loss_normalizers(samples))
    halves = [[0, 1], [2, 3]]
    local = [torch.stack(heads.loss_normalizers([samples[i] for i in h])) for h in halves]
    assert not torch.equal(local[0], local[1]), "unequal shards make the check meaningful"

    monkeypatch.setattr(comm, "get_world_size", lambda: 2)
    monkeypatch.setattr(comm, "all_reduce_sum", lambda t: counts.to(t.dtype).clone())
    ranks = [_losses_and_grads(heads, h, features, proposals, gts) for h in halves]
    grads_match = all(torch.allclose((ranks[0][1][n] + ranks[1][1][n]) / 2, g, rtol=1e-4,
                                     atol=1e-7) for n, g in whole_grads.items())
    if all_ranks:
        for key, value in whole.items():
            torch.testing.assert_close((ranks[0][0][key] + ranks[1][0][key]) / 2, value,
                                       rtol=1e-5, atol=0)
        assert grads_match
    else:
        assert not grads_match  # each rank dividing by its own counts is another step


def test_mask_head_channels_last_gives_the_contiguous_results():
    """The mask head runs channels-last internally; outputs and gradients equal the same
    layers applied to contiguous tensors."""
    torch.manual_seed(0)
    head = MaskRCNNConvUpsampleHead(in_channels=8, num_classes=3, conv_dims=[8, 8, 8])
    x = torch.randn(5, 8, 7, 7, requires_grad=True)
    out = head(x)
    assert out.shape == (5, 3, 14, 14) and out.is_contiguous(memory_format=torch.channels_last)
    weight = torch.randn(out.shape)
    (out * weight).sum().backward()
    grads = [p.grad.clone() for p in head.parameters()]
    x_grad = x.grad.clone()

    head.zero_grad()
    x.grad = None
    y = x
    for i in range(1, head.num_convs + 1):
        y = getattr(head, f"mask_fcn{i}")(y.contiguous())
    y = head.predictor(torch.relu(head.deconv(y.contiguous())).contiguous())
    assert y.is_contiguous()
    (y * weight).sum().backward()
    torch.testing.assert_close(out, y, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, x_grad, rtol=1e-5, atol=1e-6)
    for p, g in zip(head.parameters(), grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-5)
