"""Shared pieces of the neck tests: backbone shapes and features, the checks every pyramid neck
must pass, and a tiny RetinaNet trained for a few steps on the built-in shapes data."""
import pytest
import torch

from detector.config import get_cfg
from detector.data.datasets import generate_shapes_dataset
from detector.layers import ShapeSpec

from modeling_testutils import CONFIGS
from training_testutils import dense_losses_per_step, mapped_batches

# c2..c5 with 8..20 channels
BACKBONE_SHAPES = {f"c{k}": ShapeSpec(channels=4 * k, stride=2 ** k) for k in range(2, 6)}


def backbone_features(size=128, names=("c2", "c3", "c4", "c5")):
    """Random (2, C, size / stride, size / stride) features of BACKBONE_SHAPES."""
    g = torch.Generator().manual_seed(0)
    return {n: torch.randn(2, BACKBONE_SHAPES[n].channels, size // BACKBONE_SHAPES[n].stride,
                           size // BACKBONE_SHAPES[n].stride, generator=g) for n in names}


def assert_levels_and_shapes(neck, out, min_level, max_level, channels):
    """``out`` (the neck's output on 128 px ``backbone_features``) and ``output_shape()`` list
    p<min_level>..p<max_level> with ``channels`` channels at stride 2**k."""
    names = [f"p{k}" for k in range(min_level, max_level + 1)]
    assert list(out) == names and list(neck.output_shape()) == names
    for k in range(min_level, max_level + 1):
        assert out[f"p{k}"].shape == (2, channels, 128 // 2 ** k, 128 // 2 ** k)
        assert neck.output_shape()[f"p{k}"] == ShapeSpec(channels=channels, stride=2 ** k)


def assert_odd_sizes_round_up(neck, mismatch_message):
    """A P3-P7 neck on odd-sized c3-c5 gives levels halving with rounding up; a c4 that does not
    halve c3 that way is a ValueError matching ``mismatch_message``."""
    feats = {"c3": torch.randn(1, 12, 13, 9), "c4": torch.randn(1, 16, 7, 5),
             "c5": torch.randn(1, 20, 4, 3)}
    out = neck(feats)
    assert [tuple(out[f"p{k}"].shape[-2:]) for k in range(3, 8)] == [
        (13, 9), (7, 5), (4, 3), (2, 2), (1, 1)]
    feats["c4"] = torch.randn(1, 16, 6, 5)
    with pytest.raises(ValueError, match=mismatch_message):
        neck(feats)


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
    mapped, batches = mapped_batches(cfg, json_file, str(tmp_path / "images"))
    assert sum(len(x["instances"]) for x in mapped) >= 16
    losses = dense_losses_per_step(cfg, batches, steps)
    assert len(losses) == steps and all(torch.isfinite(torch.tensor(losses)))
    return sum(losses[:5]) / 5, sum(losses[-5:]) / 5, losses
