"""Mask R-CNN under data parallelism: 2 processes x 2 images follow 1 process x 4 images, and
the sampling generator the checkpoint stores makes a resumed run sample as an uninterrupted one.

The tiny model: TinyNet with FrozenBN, GN in the FPN and in the box (conv + fc) and mask heads,
64 px shapes images, no flip. For the equivalence every candidate is taken (RPN and RoI batch
sizes per image above the number of candidates), so sampling draws nothing at random and the
loss divisors summed over ranks are the only thing that makes the split not matter.
"""
import itertools
import json
import math
import os
import shutil

import pytest
import torch

from detector.engine import DefaultTrainer, default_argument_parser, launch
from detector.engine import setup_cfg
from detector.structures import BitMasks, Boxes, Instances
from detector.utils import comm

# the shared launch helpers of the RetinaNet distributed tests (same folder)
from test_distributed import (  # noqa: F401  (shapes_data is a fixture)
    max_relative_difference,
    one_thread,
    shapes_data,
    train_and_record,
    watchdog,
)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "configs", "demo", "mask_rcnn_tiny_shapes.yaml")
REL_TOL = 1e-4
LOSS_KEYS = ("loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg", "loss_mask")


def tiny_opts(out_dir, *extra):
    return [
        "MODEL.TINYNET.CHANNELS", "[8, 16, 16, 32, 32]", "MODEL.NECK.OUT_CHANNELS", "32",
        "MODEL.GN.NUM_GROUPS", "8", "MODEL.BACKBONE.NORM", "FrozenBN", "MODEL.NECK.NORM", "GN",
        "MODEL.ROI_BOX_HEAD.NUM_CONV", "1", "MODEL.ROI_BOX_HEAD.CONV_DIM", "32",
        "MODEL.ROI_BOX_HEAD.NORM", "GN", "MODEL.ROI_BOX_HEAD.NUM_FC", "1",
        "MODEL.ROI_BOX_HEAD.FC_DIM", "64", "MODEL.ROI_MASK_HEAD.NUM_CONV", "2",
        "MODEL.ROI_MASK_HEAD.CONV_DIM", "32", "MODEL.ROI_MASK_HEAD.NORM", "GN",
        "MODEL.RPN.LOSS_NORMALIZATION", "num_sampled", "MODEL.RPN.PRE_NMS_TOPK_TRAIN", "200",
        "MODEL.RPN.POST_NMS_TOPK_TRAIN", "64",
        "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64", "INPUT.MIN_SIZE_TEST", "64",
        "INPUT.MAX_SIZE_TEST", "64", "INPUT.RANDOM_FLIP", "none", "DATALOADER.NUM_WORKERS", "0",
        "SOLVER.IMS_PER_BATCH", "4", "SOLVER.MAX_ITER", "10", "SOLVER.BASE_LR", "0.02",
        "SOLVER.WARMUP_ITERS", "0", "SOLVER.CHECKPOINT_PERIOD", "1000", "DATASETS.TEST", "()",
        "DIST.TIMEOUT_MINUTES", "2", "SEED", "7", "LOG_PERIOD", "100", "OUTPUT_DIR", str(out_dir),
    ] + [str(x) for x in extra]


# every candidate taken: more anchors / RoIs per image than a 64 px image has
TAKE_ALL = ("MODEL.RPN.BATCH_SIZE_PER_IMAGE", "100000",
            "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "100000")


def parse_args(out_dir, *extra):
    return default_argument_parser().parse_args(
        ["--config-file", CONFIG] + tiny_opts(out_dir, *extra))


def _ddp_versus_single(tmp_path, iterations):
    extra = TAKE_ALL + ("SOLVER.MAX_ITER", iterations)
    with watchdog(), one_thread():
        for world in (1, 2):
            launch(train_and_record, world, timeout_minutes=2,
                   args=(parse_args(tmp_path / f"world{world}", *extra),
                         str(tmp_path / f"losses_{world}.json"), LOSS_KEYS))
    single = json.loads((tmp_path / "losses_1.json").read_text())
    ddp = json.loads((tmp_path / "losses_2.json").read_text())
    assert len(single) == len(ddp) == iterations
    diffs = {k: max_relative_difference([s[k] for s in single], [d[k] for d in ddp])
             for k in LOSS_KEYS}
    print(f"2 x 2 vs 1 x 4 images, {iterations} iterations: max relative loss differences "
          + ", ".join(f"{k} {v:.3g}" for k, v in diffs.items()))
    assert all(math.isfinite(s[k]) and s[k] > 0 for s in single for k in LOSS_KEYS)
    totals = [sum(s.values()) for s in single]
    assert max(totals) - min(totals) > 1e-3, "the loss must move for the comparison to mean much"
    assert max(diffs.values()) <= REL_TOL, list(zip(single, ddp))
    return tmp_path / "world1", tmp_path / "world2"


@pytest.mark.usefixtures("shapes_data")
def test_two_processes_follow_one_process_for_three_iterations(tmp_path):
    _ddp_versus_single(tmp_path, 3)


@pytest.mark.slow
@pytest.mark.usefixtures("shapes_data")
def test_two_processes_follow_one_process_for_ten_iterations(tmp_path):
    single, ddp = _ddp_versus_single(tmp_path, 10)
    w1 = torch.load(single / "model_final.pth", weights_only=True)
    w2 = torch.load(ddp / "model_final.pth", weights_only=True)
    for k, v in w1["model"].items():
        if v.is_floating_point():
            assert torch.allclose(v, w2["model"][k], rtol=1e-3, atol=1e-5), k
    # rank 0's checkpoint holds the sampling state that resumes both ranks
    assert w2["sampling_rng"]["shared_generator_state"].dtype == torch.uint8


# --------------------------------------------------------------------------------------------
# resuming restores the sampling generator
# --------------------------------------------------------------------------------------------
def _fixed_batch(num_images=2, size=64, seed=0):
    """Random images with two boxes each (masks filling them), the same every iteration."""
    g = torch.Generator().manual_seed(seed)
    batch = []
    for i in range(num_images):
        xy = torch.rand(2, 2, generator=g) * 24
        boxes = torch.cat([xy, xy + 16 + torch.rand(2, 2, generator=g) * 20], dim=1)
        ys, xs = torch.arange(size)[:, None] + 0.5, torch.arange(size)[None] + 0.5
        masks = ((xs >= boxes[:, 0, None, None]) & (xs <= boxes[:, 2, None, None])
                 & (ys >= boxes[:, 1, None, None]) & (ys <= boxes[:, 3, None, None]))
        instances = Instances((size, size), gt_boxes=Boxes(boxes),
                              gt_classes=torch.tensor([0, 2]), gt_masks=BitMasks(masks))
        image = torch.randint(0, 256, (3, size, size), generator=g, dtype=torch.uint8)
        batch.append({"image": image, "height": size, "width": size, "image_id": i,
                      "instances": instances})
    return batch


class FixedBatchTrainer(DefaultTrainer):
    """Trains on one fixed batch, so that after a resume only the sampling could differ."""

    @classmethod
    def build_train_loader(cls, cfg):
        return itertools.repeat(_fixed_batch())


def _train_recording_samples(out_dir, resume):
    """Runs (or resumes) the short run; returns per iteration the sampled anchor labels of the
    RPN and the sampled proposal boxes of the RoI heads."""
    args = parse_args(out_dir, "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "4",
                      "SOLVER.CHECKPOINT_PERIOD", "2", "MODEL.RPN.BATCH_SIZE_PER_IMAGE", "32",
                      "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "16")
    trainer = FixedBatchTrainer(setup_cfg(args))
    model = comm.unwrap_model(trainer.model)
    samples = {}

    def record(module, name, extract):
        original = getattr(module, name)

        def wrapper(*a, **k):
            out = original(*a, **k)
            samples.setdefault(trainer.iter, []).append(extract(out))
            return out
        setattr(module, name, wrapper)

    record(model.proposal_generator, "label_and_sample_anchors", lambda out: out[0].clone())
    record(model.roi_heads, "label_and_sample_proposals", lambda out: out.boxes.clone())
    trainer.resume_or_load(resume=resume)
    with one_thread():
        trainer.train()
    return trainer.start_iter, samples


def _same(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def test_resume_draws_the_same_samples_as_an_uninterrupted_run(tmp_path):
    start, uninterrupted = _train_recording_samples(tmp_path / "full", resume=False)
    assert start == 0 and sorted(uninterrupted) == [0, 1, 2, 3]
    # the RPN and the RoI heads did subsample (fewer than all candidates)
    assert int((uninterrupted[0][0] >= 0).sum()) == 2 * 32
    assert all(len(boxes) == 16 for boxes in uninterrupted[0][1:])
    assert not _same(uninterrupted[2], uninterrupted[3])

    checkpoint = torch.load(tmp_path / "full" / "model_0000001.pth", weights_only=True)
    assert set(checkpoint["sampling_rng"]) == {"shared_generator_state"}
    for name, keep_sampling_state in (("resumed", True), ("without_state", False)):
        os.makedirs(tmp_path / name)
        shutil.copy(tmp_path / "full" / "model_0000001.pth", tmp_path / name)
        if not keep_sampling_state:
            stripped = {k: v for k, v in checkpoint.items() if k != "sampling_rng"}
            torch.save(stripped, tmp_path / name / "model_0000001.pth")
        start, resumed = _train_recording_samples(tmp_path / name, resume=True)
        assert start == 2 and sorted(resumed) == [2, 3]
        same = [_same(resumed[i], uninterrupted[i]) for i in (2, 3)]
        # the control shows the comparison can fail: the fresh generator samples otherwise
        assert all(same) if keep_sampling_state else not any(same), (name, same)
