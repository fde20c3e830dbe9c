"""configs/efficientdet: effdet's parameter counts, one training step each, compound-coefficient
errors, the ResNet-50 and EvoNorm-S0 variants, and the weight EMA."""
import pytest
import torch

from detector.config import get_cfg
from detector.engine.train_loop import SimpleTrainer
from detector.modeling import build_model
from detector.modeling.meta_arch.efficientdet import EfficientDet
from detector.solver import build_optimizer
from detector.solver.ema import ModelEMA

from modeling_testutils import CONFIGS, make_batch

EFFDET_CONFIGS = CONFIGS / "efficientdet"
# effdet.create_model(f"tf_efficientdet_d{k}").parameters() with 90 classes, effdet 0.4.1
INPUT_SIZES = {0: 512, 1: 640, 2: 768, 3: 896, 4: 1024, 5: 1280, 6: 1280, 7: 1536}


def _cfg(name, *opts):
    cfg = get_cfg()
    cfg.merge_from_file(str(EFFDET_CONFIGS / name))
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", *opts])
    return cfg


def _num_params(cfg):
    with torch.device("meta"):  # shapes only: D7 builds in a fraction of a second
        model = EfficientDet(**EfficientDet.from_config(cfg))
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("k", range(8))
def test_parameter_count_equals_effdet(k):
    cfg = _cfg(f"EfficientDet-D{k}.yaml", "MODEL.EFFICIENTDET.NUM_CLASSES", "90")
    assert cfg.INPUT.MIN_SIZE_TEST == cfg.INPUT.MAX_SIZE_TEST == INPUT_SIZES[k]
    effdet = pytest.importorskip("effdet")
    with torch.device("meta"):
        theirs = effdet.create_model(f"tf_efficientdet_d{k}", pretrained=False,
                                     pretrained_backbone=False)
    expected = sum(p.numel() for p in theirs.parameters())
    got = _num_params(cfg)
    print(f"EfficientDet-D{k}: {got} parameters, effdet tf_efficientdet_d{k}: {expected}")
    assert abs(got - expected) <= 0.005 * expected, (got, expected)


def _train_one_step(cfg, size=128):
    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()
    optimizer = build_optimizer(cfg, model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batch = make_batch(2, size=(size, size), num_classes=3)
    trainer = SimpleTrainer(model, [batch], optimizer)
    trainer.train(0, 1)
    changed = [n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())]
    assert any(n.startswith("head.cls_score") for n in changed)
    assert any(n.startswith("backbone.") for n in changed)
    model.eval()
    with torch.no_grad():
        out = model(batch[:1])
    assert out[0]["instances"].image_size == (size, size)
    return model


@pytest.mark.parametrize("k", [0] + [pytest.param(k, marks=pytest.mark.slow) for k in range(1, 8)])
def test_config_trains_one_step_at_128_pixels(k):
    _train_one_step(_cfg(f"EfficientDet-D{k}.yaml"))


def test_unknown_compound_coefficient_is_a_one_line_error():
    with pytest.raises(ValueError) as err:
        build_model(_cfg("EfficientDet-D0.yaml", "MODEL.EFFICIENTDET.COMPOUND_COEF", "9"))
    assert "MODEL.EFFICIENTDET.COMPOUND_COEF=9" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ValueError, match="COMPOUND_COEF=-1 .* needs MODEL.EFFICIENTNET.VARIANT"):
        build_model(_cfg("EfficientDet-D0.yaml", "MODEL.EFFICIENTDET.COMPOUND_COEF", "-1"))
    # -1 with every size given explicitly is a valid custom model
    model = build_model(_cfg(
        "EfficientDet-D0.yaml", "MODEL.EFFICIENTDET.COMPOUND_COEF", "-1",
        "MODEL.EFFICIENTNET.VARIANT", "b0", "MODEL.BIFPN.CHANNELS", "32",
        "MODEL.BIFPN.NUM_REPEATS", "1", "MODEL.BIFPN.FUSION", "attn",
        "MODEL.EFFICIENTDET.NUM_HEAD_CONVS", "1", "MODEL.EFFICIENTDET.ANCHOR_SCALE", "3.0"))
    assert model.neck.channels == 32 and len(model.neck.cells) == 1
    assert model.anchor_generator.sizes[0] == [24.0]


def test_d7_sizes_follow_effdet():
    cfg = _cfg("EfficientDet-D7.yaml")
    with torch.device("meta"):
        model = EfficientDet(**EfficientDet.from_config(cfg))
    assert model.backbone.variant == "b6"  # effdet's D7 keeps D6's backbone
    assert model.neck.channels == 384 and len(model.neck.cells) == 8
    assert model.anchor_generator.sizes[0] == [40.0]  # anchor scale 5 x stride 8
    assert model.neck.cells[0].nodes["p6_td"].fusion.method == "sum"
    assert len(model.head.cls_subnet) == 5


def test_resnet50_variant():
    cfg = _cfg("EfficientDet-D0-R50.yaml")
    with torch.device("meta"):
        model = EfficientDet(**EfficientDet.from_config(cfg))
    assert type(model.backbone).__name__ == "ResNetBackbone"
    assert model.neck.channels == 96 and len(model.neck.cells) == 3
    assert len(model.head.cls_subnet) == 3
    assert model.neck.cells[0].nodes["p5_td"].input_convs["p5_in"].conv.in_channels == 2048


def test_evonorm_head_variant():
    model = _train_one_step(_cfg("EfficientDet-D0-EvoNormS0.yaml"))
    norm = model.head.cls_norms[0][0]
    assert type(norm).__name__ == "EvoNormS0" and norm.applies_activation
    assert isinstance(model.head.act, torch.nn.Identity)  # EvoNorm-S0 is norm + activation
    assert type(model.neck.cells[0].nodes["p6_td"].norm).__name__ == "BatchNorm2d"


def test_model_ema_follows_the_weights():
    cfg = _cfg("EfficientDet-D0.yaml")
    torch.manual_seed(0)
    model = build_model(cfg)
    ema = ModelEMA(model, decay=0.9)
    assert all(not p.requires_grad for p in ema.module.parameters())
    start = ema.module.head.cls_score.conv_pw.bias.clone()
    with torch.no_grad():
        model.head.cls_score.conv_pw.bias.add_(1.0)
    ema.update(model)  # warm-up decay min(0.9, 1/10) = 0.1
    torch.testing.assert_close(ema.module.head.cls_score.conv_pw.bias, start + 0.9)
    ema.update(model)  # min(0.9, 2/11)
    torch.testing.assert_close(ema.module.head.cls_score.conv_pw.bias,
                               start + 1.0 - 0.1 * 2 / 11, rtol=0, atol=1e-6)
    restored = ModelEMA(model, decay=0.9)
    restored.load_state_dict(ema.state_dict())
    assert restored.num_updates == 2 and restored.current_decay() == pytest.approx(3 / 12)
    torch.testing.assert_close(restored.module.head.cls_score.conv_pw.bias,
                               ema.module.head.cls_score.conv_pw.bias)
    with pytest.raises(ValueError, match="SOLVER.EMA.DECAY=1.0"):
        ModelEMA(model, decay=1.0)
