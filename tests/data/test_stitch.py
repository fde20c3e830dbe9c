"""Stitch: two mapped samples become one, every box stays on its object and every mask with its
box; batches are stitched with the batch's own generator (probability 0 changes nothing, a seed
and a stream position fix the result, a resumed loader stitches alike); and a tiny RetinaNet's
loss falls with Stitch or AutoAugment on."""
import numpy as np
import pytest
import torch

from detector.config import get_cfg
from detector.data import build_detection_train_loader
from detector.data.datasets import generate_shapes_dataset, load_coco_json
from detector.data.stitch import stitch_batch, stitch_pair, stitched_layout
from detector.structures import BitMasks, Boxes, Instances, PolygonMasks
from detector.utils import seeding

from training_testutils import dense_losses_per_step

BACKGROUND = 30
COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255), (0, 255, 255)]


def _sample(h, w, rects, colours, image_id, bitmasks=False):
    """A mapped training sample: filled rectangles (x0, y0, x1, y1) of the given colours."""
    image = torch.full((3, h, w), BACKGROUND, dtype=torch.uint8)
    for (x0, y0, x1, y1), colour in zip(rects, colours):
        image[:, y0:y1, x0:x1] = torch.tensor(colour, dtype=torch.uint8)[:, None, None]
    instances = Instances((h, w), gt_boxes=Boxes(torch.tensor(rects, dtype=torch.float32)),
                          gt_classes=torch.arange(len(rects)),
                          gt_is_crowd=torch.zeros(len(rects), dtype=torch.bool))
    polygons = PolygonMasks([[np.array([x0, y0, x1, y0, x1, y1, x0, y1], dtype=np.float64)]
                             for x0, y0, x1, y1 in rects])
    instances.gt_masks = polygons.to_bitmasks(h, w) if bitmasks else polygons
    return {"image": image, "height": h, "width": w, "image_id": image_id,
            "file_name": f"{image_id}.png", "instances": instances}


def _pair(bitmasks_a=False, bitmasks_b=False, size_b=(90, 150)):
    a = _sample(120, 160, [(10, 10, 60, 50), (80, 40, 150, 110)], COLOURS[:2], 1, bitmasks_a)
    b = _sample(*size_b, [(5, 20, 45, 80), (55, 10, 95, 50), (60, 60, 95, 85)],
                COLOURS[2:5], 2, bitmasks_b)
    return a, b


def _colour_pixels(image, colour, tolerance=40):
    diff = (image.int() - torch.tensor(colour)[:, None, None]).abs().amax(dim=0)
    ys, xs = torch.nonzero(diff <= tolerance, as_tuple=True)
    return xs.numpy(), ys.numpy()


def _check_boxes_on_objects(out, colours):
    boxes = out["instances"].gt_boxes.tensor.numpy()
    assert len(boxes) == len(colours)
    for box, colour in zip(boxes, colours):
        xs, ys = _colour_pixels(out["image"], colour)
        assert len(xs) > 20, colour
        assert (xs + 0.5 >= box[0]).all() and (xs + 0.5 <= box[2]).all(), (colour, box)
        assert (ys + 0.5 >= box[1]).all() and (ys + 0.5 <= box[3]).all(), (colour, box)
        extent = (xs.max() + 1 - xs.min()) * (ys.max() + 1 - ys.min())
        assert extent > 0.7 * (box[2] - box[0]) * (box[3] - box[1]), (colour, box)


@pytest.mark.parametrize("horizontal", [True, False])
@pytest.mark.parametrize("size_b", [(90, 150), (200, 100)])
def test_every_box_stays_on_its_object(horizontal, size_b):
    a, b = _pair(size_b=size_b)
    out = stitch_pair(a, b, horizontal=horizontal)
    height, width = max(120, size_b[0]), max(160, size_b[1])
    assert out["image"].shape == (3, height, width) and out["image"].dtype == torch.uint8
    assert (out["height"], out["width"]) == (height, width)
    assert out["instances"].image_size == (height, width)
    assert out["stitched_from"] == (1, 2) and out["image_id"] == 1
    _check_boxes_on_objects(out, COLOURS[:5])
    assert out["instances"].gt_classes.tolist() == [0, 1, 0, 1, 2]
    assert out["instances"].gt_is_crowd.tolist() == [False] * 5
    # b sits in the second half, a in the first; neither is enlarged
    boxes = out["instances"].gt_boxes.tensor
    axis = 0 if horizontal else 1
    half = (width if horizontal else height) // 2
    assert (boxes[:2, axis + 2] <= half + 1e-4).all() and (boxes[2:, axis] >= half - 1e-4).all()
    assert ((boxes[:, 2:] - boxes[:, :2]) <= torch.tensor([70.0, 70.0]) + 1e-4).all()
    # the inputs are left as they were
    assert a["image"].shape == (3, 120, 160) and len(a["instances"]) == 2


@pytest.mark.parametrize("bitmasks", [(False, False), (True, True), (False, True)])
def test_masks_move_with_their_boxes(bitmasks):
    a, b = _pair(*bitmasks)
    out = stitch_pair(a, b, horizontal=False)
    inst = out["instances"]
    boxes = inst.gt_boxes.tensor
    if bitmasks == (False, False):
        assert isinstance(inst.gt_masks, PolygonMasks)
        torch.testing.assert_close(inst.gt_masks.get_bounding_boxes().tensor, boxes)
    else:  # mixed kinds are rasterised onto the stitched canvas
        assert isinstance(inst.gt_masks, BitMasks)
        assert inst.gt_masks.image_size == inst.image_size
        mask_boxes = inst.gt_masks.get_bounding_boxes().tensor
        assert (mask_boxes - boxes).abs().max() <= 1.0
        # and the mask covers its object's pixels
        for mask, colour in zip(inst.gt_masks.tensor, COLOURS[:5]):
            xs, ys = _colour_pixels(out["image"], colour, tolerance=0)
            assert mask[ys, xs].all()


def test_layout_rule_leaves_less_empty_canvas():
    # two landscape images: top and bottom keeps the flatter one whole
    assert stitched_layout((100, 200), (50, 200)) == (5000 + 2500, 5000 + 10000)
    side_by_side, top_bottom = stitched_layout((200, 100), (200, 50))  # portrait pair
    assert side_by_side > top_bottom
    # equal sizes halve both images either way: a tie, broken at random
    assert len(set(stitched_layout((100, 200), (100, 200)))) == 1
    a, b = _sample(60, 160, [(10, 10, 50, 50)], COLOURS[:1], 1), _sample(
        60, 160, [(20, 5, 60, 45)], COLOURS[1:2], 2)
    out = stitch_batch([a, b], np.random.default_rng(0), 1.0)
    stitched = next(d for d in out if "stitched_from" in d)
    assert stitched["image"].shape == (3, 60, 160)
    ys = stitched["instances"].gt_boxes.tensor[:, 1::2]
    assert ys.max() <= 60 and ys.min() >= 0 and len(stitched["instances"]) == 2


def test_probability_zero_and_single_images_leave_batches_unchanged():
    a, b = _pair()
    out = stitch_batch([a, b], np.random.default_rng(1), 0.0)
    assert out[0] is a and out[1] is b
    assert stitch_batch([a], np.random.default_rng(1), 1.0)[0] is a
    with pytest.raises(ValueError, match="INPUT.STITCH"):
        stitch_batch([a, b], np.random.default_rng(1), 1.5)


def test_stitch_batch_is_deterministic_for_a_seed_and_position():
    a, b = _pair()
    c = _sample(100, 100, [(10, 10, 60, 60)], COLOURS[5:], 3)
    stitched = 0
    for position in range(0, 200, 4):
        first = stitch_batch([a, b, c], seeding.batch_rng(7, position), 0.5)
        second = stitch_batch([a, b, c], seeding.batch_rng(7, position), 0.5)
        for x, y in zip(first, second):
            assert torch.equal(x["image"], y["image"])
            assert torch.equal(x["instances"].gt_boxes.tensor, y["instances"].gt_boxes.tensor)
        changed = [x is not d for x, d in zip(first, [a, b, c])]
        assert sum(changed) in (0, 1)  # one image of the batch becomes the stitched pair
        stitched += sum(changed)
    assert 15 <= stitched <= 35  # about half of 50 batches


@pytest.fixture
def shapes_train(tmp_path, temp_catalog):
    json_file = generate_shapes_dataset(str(tmp_path), num_images=8, seed=5, image_size=128)
    root = str(tmp_path / "images")
    return temp_catalog("stitch_shapes_train", lambda: load_coco_json(json_file, root),
                        thing_classes=["circle", "square", "triangle"])


def _loader_cfg(name, *opts):
    cfg = get_cfg()
    cfg.merge_from_list([
        "DATASETS.TRAIN", f"('{name}',)", "INPUT.MIN_SIZE_TRAIN", "(96, 128)",
        "INPUT.MAX_SIZE_TRAIN", "160", "DATALOADER.NUM_WORKERS", "0",
        "SOLVER.IMS_PER_BATCH", "4", "SEED", "3", *opts])
    return cfg


def test_loader_stitches_alike_after_a_resume(shapes_train):
    cfg = _loader_cfg(shapes_train, "INPUT.STITCH", "1.0", "INPUT.AUTOAUGMENT.POLICY", "v1")
    loader = build_detection_train_loader(cfg)
    stream = iter(loader)
    next(stream)
    state = loader.state_dict()
    expected = [next(stream) for _ in range(3)]
    assert all(sum("stitched_from" in d for d in batch) == 1 for batch in expected)

    resumed = build_detection_train_loader(cfg)
    resumed.load_state_dict(state)
    for want, batch in zip(expected, iter(resumed)):  # expected first: it ends the zip
        assert [d.get("stitched_from") for d in batch] == [d.get("stitched_from") for d in want]
        for x, y in zip(batch, want):
            assert torch.equal(x["image"], y["image"])
            assert torch.equal(x["instances"].gt_boxes.tensor, y["instances"].gt_boxes.tensor)


@pytest.fixture
def one_thread():
    """Tiny convs run faster on one thread and do not stall when other processes share the CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("opts", [("INPUT.STITCH", "0.5"), ("INPUT.AUTOAUGMENT.POLICY", "v0")],
                         ids=["stitch", "autoaugment"])
def test_retinanet_loss_falls_with_the_augmentation(shapes_train, one_thread, opts):
    cfg = _loader_cfg(shapes_train, *opts)
    cfg.merge_from_list([
        "INPUT.MIN_SIZE_TRAIN", "(64,)", "SOLVER.WARMUP_ITERS", "0",
        "MODEL.DEVICE", "cpu", "MODEL.BACKBONE.NAME", "TinyNet", "MODEL.BACKBONE.NORM", "BN",
        "MODEL.BACKBONE.FREEZE_AT", "0", "MODEL.TINYNET.CHANNELS", "[8, 16, 24, 32, 48]",
        "MODEL.NECK.OUT_CHANNELS", "32", "MODEL.NECK.MIN_LEVEL", "3",
        "MODEL.NECK.MAX_LEVEL", "5", "MODEL.GN.NUM_GROUPS", "8",
        "MODEL.ANCHOR_GENERATOR.SIZES", "[[16], [32], [64]]",
        "MODEL.ANCHOR_GENERATOR.STRIDES", "[8, 16, 32]", "MODEL.RETINANET.NUM_CLASSES", "3",
        "MODEL.RETINANET.NUM_CONVS", "2", "MODEL.PIXEL_MEAN", "[127.5, 127.5, 127.5]",
        "MODEL.PIXEL_STD", "[64.0, 64.0, 64.0]", "SOLVER.OPTIMIZER", "AdamW",
        "SOLVER.BASE_LR", "0.003", "SOLVER.WEIGHT_DECAY", "0.0"])
    losses = dense_losses_per_step(cfg, iter(build_detection_train_loader(cfg)), 60)
    assert len(losses) == 60 and np.isfinite(losses).all()
    first, last = np.mean(losses[:10]), np.mean(losses[-10:])
    assert last < 0.7 * first, (first, last, losses)


def test_unknown_instance_fields_are_an_error():
    a, b = _pair()
    a["instances"].gt_keypoints = torch.zeros(2, 3, 3)
    b["instances"].gt_keypoints = torch.zeros(3, 3, 3)
    with pytest.raises(ValueError, match="gt_keypoints"):
        stitch_pair(a, b, horizontal=True)
