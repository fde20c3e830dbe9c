"""A random effdet ``tf_efficientdet_d0`` / ``d1`` and our EfficientDet loaded with its converted
weights, shared by the equivalence tests (tests/modeling) and the converter tests
(tests/checkpoint). Needs effdet: test modules call ``pytest.importorskip("effdet")`` before
importing this one."""
import pathlib

import effdet
import torch
from torch import nn

from detector.checkpoint.effdet_convert import convert_effdet_state_dict
from detector.config import get_cfg
from detector.modeling import build_model

from random_statistics import randomize_batchnorms

ROOT = pathlib.Path(__file__).resolve().parents[1]
SIZE = 256  # effdet's BiFPN resamples to the sizes of config.image_size, so both run at 256
NUM_CLASSES = 90


def efficientdet_config_path(variant):
    """configs/efficientdet/EfficientDet-D<variant>.yaml."""
    return ROOT / "configs" / "efficientdet" / f"EfficientDet-D{variant}.yaml"


def efficientdet_cfg(variant, *opts):
    """Our EfficientDet-D<variant> config on CPU with effdet's 90 classes, then KEY, VALUE
    overrides."""
    cfg = get_cfg()
    cfg.merge_from_file(str(efficientdet_config_path(variant)))
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", "MODEL.EFFICIENTDET.NUM_CLASSES", str(NUM_CLASSES),
                         *opts])
    return cfg


def _randomize(model, generator):
    """Random norm parameters and statistics, biases and fusion weights, then BiFPN and head
    statistics of a random batch, so their features vary over space as in a trained model: every
    converted tensor matters and the scores spread over (0, 1) without ties."""
    randomize_batchnorms(model.modules(), generator)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("backbone"):
                continue
            if name.endswith("bias"):
                p.add_(torch.randn(p.shape, generator=generator) * 0.05)
            if name.endswith("edge_weights"):
                p.copy_(torch.rand(p.shape, generator=generator) + 0.5)
        heads = [m for name, m in model.named_modules()
                 if isinstance(m, nn.BatchNorm2d) and not name.startswith("backbone")]
        momenta = [m.momentum for m in heads]
        for m in heads:
            m.momentum = 1.0
        model.train()
        model.backbone.eval()
        model(torch.randn(2, 3, SIZE, SIZE, generator=generator))
        model.eval()
        for m, momentum in zip(heads, momenta):
            m.momentum = momentum


def effdet_model(variant):
    """A seeded effdet ``tf_efficientdet_d<variant>`` at SIZE x SIZE with randomised statistics,
    in eval mode."""
    torch.manual_seed(variant)
    model = effdet.create_model(f"tf_efficientdet_d{variant}", pretrained=False,
                                pretrained_backbone=False, image_size=(SIZE, SIZE))
    _randomize(model, torch.Generator().manual_seed(10 + variant))
    return model


def build_effdet_pair(variant):
    """Returns ``(variant, theirs, ours, converted, images)``: effdet_model(variant), our model
    loaded strictly with ``converted`` (its converted state dict, not sharing effdet's tensors) and
    two float 0-255 SIZE x SIZE images."""
    theirs = effdet_model(variant)
    ours = build_model(efficientdet_cfg(variant))
    converted = convert_effdet_state_dict(theirs.state_dict(), ours.state_dict())
    converted = {k: v.clone() for k, v in converted.items()}  # not views of effdet's tensors
    ours.load_state_dict(converted, strict=True)
    g = torch.Generator().manual_seed(3)
    images = [torch.randint(0, 256, (3, SIZE, SIZE), generator=g).float() for _ in range(2)]
    return variant, theirs, ours, converted, images


def normalized(model, images):
    """The images as one batch normalised with the model's pixel mean and std."""
    return torch.stack([(im - model.pixel_mean) / model.pixel_std for im in images])


def _yx_to_xy(box_out):
    n, c, h, w = box_out.shape
    return box_out.reshape(n, c // 4, 4, h, w)[:, :, [1, 0, 3, 2]].reshape(n, c, h, w)


def relative_error(a, b):
    """max |a - b| over max |b|."""
    return float((a - b).abs().max() / b.abs().max())


def per_level_errors(ours, theirs, x):
    """Relative errors of our per-level class and box outputs against effdet's on the batch x (both
    models are put in eval mode); effdet's (y, x) box deltas are reordered to our (x, y)."""
    ours.eval()
    theirs.eval()
    with torch.no_grad():
        their_cls, their_box = theirs(x)
        our_cls, our_box, _ = ours.forward_features(x)
    assert len(our_cls) == len(their_cls) == 5
    cls_err = [relative_error(o, t) for o, t in zip(our_cls, their_cls)]
    box_err = [relative_error(o, _yx_to_xy(t)) for o, t in zip(our_box, their_box)]
    return cls_err, box_err
