"""MODEL.BACKBONE.WEIGHTS: torchvision / timm / detectron2 / MSRA files into our backbones."""
import logging
import os
import pickle
import re

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from detector.checkpoint import (
    BackboneWeightsError,
    load_backbone_weights,
    load_backbone_weights_from_config,
    read_numpy_pickle,
)
from detector.config import get_cfg
from detector.modeling import build_backbone
from tests.log_capture import CollectLogs

LOGGER = "detector.checkpoint.backbone_weights"
CAFFE_MEAN, CAFFE_STD = [103.530, 116.280, 123.675], [1.0, 1.0, 1.0]


def _resnet_cfg(*opts):
    cfg = get_cfg()
    cfg.merge_from_list(["MODEL.BACKBONE.NAME", "ResNet", "MODEL.RESNETS.DEPTH", "50",
                         "MODEL.BACKBONE.NORM", "FrozenBN", "MODEL.BACKBONE.FREEZE_AT", "2",
                         "MODEL.BACKBONE.OUT_FEATURES", '["c3", "c4", "c5"]', *opts])
    return cfg


class _Detector(nn.Module):
    """The one attribute load_backbone_weights_from_config uses."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone


@pytest.fixture(scope="module")
def torchvision_state():
    """A torchvision ResNet-50 state dict holding known (seeded random) values."""
    g = torch.Generator().manual_seed(0)
    state = torchvision.models.resnet50(weights=None).state_dict()
    for name, tensor in state.items():
        if tensor.is_floating_point():
            values = torch.randn(tensor.shape, generator=g) * 0.1
            state[name] = values.abs() + 0.5 if name.endswith("running_var") else values
    return state


def _own_weights(backbone):
    return {k: v for k, v in backbone.state_dict().items()
            if not k.endswith("num_batches_tracked")}


def _to_detectron2(name):
    """torchvision ResNet name -> detectron2's (as detectron2's converter writes them)."""
    if not name.startswith("layer"):
        return "stem." + name.replace("bn1", "conv1.norm")
    m = re.fullmatch(r"layer(\d)\.(\d+)\.(.+)", name)
    rest = m.group(3).replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")
    rest = re.sub(r"bn(\d)", r"conv\1.norm", rest)
    return f"res{int(m.group(1)) + 1}.{m.group(2)}.{rest}"


def _to_caffe2(name):
    """torchvision ResNet name -> MSRA/Caffe2 blob name; None for BN running statistics, which
    the affine-only MSRA norms do not have."""
    kind = {"weight": "s", "bias": "b"}
    if name.startswith("fc."):
        return "fc1000_" + name[3:4]
    if name == "conv1.weight":
        return "conv1_w"
    if name.startswith("bn1."):
        return f"res_conv1_bn_{kind[name[4:]]}" if name[4:] in kind else None
    m = re.fullmatch(r"layer(\d)\.(\d+)\.(conv|bn|downsample\.)(\d)\.(\w+)", name)
    stage, block, module, index, param = m.groups()
    prefix = f"res{int(stage) + 1}_{block}_"
    branch = "branch1" if module == "downsample." else "branch2" + "abc"[int(index) - 1]
    if module == "conv" or (module == "downsample." and index == "0"):
        return prefix + branch + "_w"
    return prefix + branch + f"_bn_{kind[param]}" if param in kind else None


def _write_pickle(obj, path):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)  # protocol 2: as the Python 2-era model-zoo files
    return str(path)


def test_torchvision_resnet50_file_loads_every_tensor(tmp_path, torchvision_state):
    path = tmp_path / "resnet50.pth"
    torch.save(torchvision_state, path)
    cfg = _resnet_cfg("MODEL.BACKBONE.WEIGHTS", str(path))
    detector = _Detector(build_backbone(cfg))
    report = load_backbone_weights_from_config(cfg, detector)
    backbone = detector.backbone

    own = _own_weights(backbone)
    for key, value in own.items():
        assert torch.equal(value, torchvision_state[key]), key
    assert report.source == "pytorch" and sorted(report.loaded) == sorted(own)
    assert report.missing == [] and report.unused == [] and report.filled == []
    assert report.dropped == ["fc.bias", "fc.weight"]
    assert len(own) == 265 and "loaded 265 tensors" in report.summary()

    # frozen (FrozenBN) and trainable stages compute torchvision's function
    reference = torchvision.models.resnet50(weights=None).eval()
    reference.load_state_dict(torchvision_state)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference.layer4(reference.layer3(reference.layer2(reference.layer1(
            reference.maxpool(reference.relu(reference.bn1(reference.conv1(x))))))))
        ours = backbone.eval()(x)["c5"]
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)


def _up_to_c3(state):
    """The stem, res2, res3 and classifier of a ResNet state dict (keeps the files small)."""
    return {k: v for k, v in state.items() if not k.startswith(("layer3", "layer4"))}


def test_detectron2_pickle_loads_and_warns_about_its_convention(tmp_path, torchvision_state):
    model = {_to_detectron2(k): v.numpy() for k, v in _up_to_c3(torchvision_state).items()}
    assert "res2.0.shortcut.norm.running_var" in model and "stem.conv1.norm.bias" in model
    path = _write_pickle({"model": model, "__author__": "MSRA", "matching_heuristics": True},
                         tmp_path / "R-50.pkl")

    cfg = _resnet_cfg("MODEL.BACKBONE.WEIGHTS", path, "MODEL.BACKBONE.OUT_FEATURES", '["c3"]')
    detector = _Detector(build_backbone(cfg))
    with CollectLogs(LOGGER) as logs:
        report = load_backbone_weights_from_config(cfg, detector)
    own = _own_weights(detector.backbone)
    assert report.source == "detectron2" and report.author == "MSRA" and report.missing == []
    assert sorted(report.loaded) == sorted(own) and report.dropped == ["fc.bias", "fc.weight"]
    for key, value in own.items():
        assert torch.equal(value, torchvision_state[key]), key
    # RGB / ImageNet std / stride in the 3x3 conv do not match MSRA weights
    assert "expect INPUT.FORMAT BGR" in logs.text and "STRIDE_IN_1X1" in logs.text

    cfg = _resnet_cfg("MODEL.BACKBONE.WEIGHTS", path, "MODEL.BACKBONE.OUT_FEATURES", '["c3"]',
                      "INPUT.FORMAT", "BGR",
                      "MODEL.PIXEL_MEAN", str(CAFFE_MEAN), "MODEL.PIXEL_STD", str(CAFFE_STD),
                      "MODEL.RESNETS.STRIDE_IN_1X1", "True")
    with CollectLogs(LOGGER) as logs:
        load_backbone_weights_from_config(cfg, _Detector(build_backbone(cfg)))
    assert "expect INPUT.FORMAT" not in logs.text and "STRIDE_IN_1X1" not in logs.text
    assert f"loaded {len(report.loaded)} tensors" in logs.text


def test_msra_caffe2_pickle_gets_identity_statistics(tmp_path, torchvision_state):
    blobs = {}
    for name, value in _up_to_c3(torchvision_state).items():
        c2_name = _to_caffe2(name)
        if c2_name is not None:
            blobs[c2_name] = value.numpy()
    blobs["conv1_w_momentum"] = np.zeros((64, 3, 7, 7), np.float32)  # solver state in the file
    assert "res2_0_branch1_bn_s" in blobs and "res3_3_branch2c_w" in blobs
    path = _write_pickle(blobs, tmp_path / "R-50.pkl")

    backbone = build_backbone(_resnet_cfg("MODEL.BACKBONE.OUT_FEATURES", '["c3"]'))
    report = load_backbone_weights(backbone, path)
    assert report.source == "caffe2" and report.missing == [] and report.unused == []
    assert sorted(report.dropped) == ["conv1_w_momentum", "fc.bias", "fc.weight"]
    own = _own_weights(backbone)
    for key in own:
        if not key.endswith(("running_mean", "running_var")):
            assert torch.equal(own[key], torchvision_state[key]), key
    num_norms = 1 + 7 * 3 + 2  # stem, 7 blocks x 3, 2 shortcuts
    assert len(report.filled) == 2 * num_norms and len(report.loaded) == len(own) - 2 * num_norms
    bn1 = backbone.bn1
    assert torch.equal(bn1.running_mean, torch.zeros(64))
    assert torch.equal(bn1.running_var, torch.full((64,), 1 - bn1.eps))
    # each frozen norm is the file's affine map y = x * s + b
    x = torch.randn(2, 256, 4, 4, generator=torch.Generator().manual_seed(2))
    norm = backbone.layer1[0].downsample[1]
    expected = x * torchvision_state["layer1.0.downsample.1.weight"].view(1, -1, 1, 1) \
        + torchvision_state["layer1.0.downsample.1.bias"].view(1, -1, 1, 1)
    torch.testing.assert_close(norm(x), expected)


def test_batchnorm_tensors_stay_out_of_group_norms(tmp_path, torchvision_state):
    path = tmp_path / "resnet50.pth"
    torch.save(_up_to_c3(torchvision_state), path)
    backbone = build_backbone(_resnet_cfg("MODEL.BACKBONE.NORM", "GN", "MODEL.BACKBONE.FREEZE_AT",
                                          "0", "MODEL.BACKBONE.OUT_FEATURES", '["c3"]'))
    report = load_backbone_weights(backbone, str(path))
    assert "bn1" in report.other_norms and "layer1.0.downsample.1" in report.other_norms
    assert {"bn1.weight", "bn1.running_var"} <= set(report.unused)
    assert torch.equal(backbone.layer1[0].conv2.weight, torchvision_state["layer1.0.conv2.weight"])
    assert torch.equal(backbone.bn1.weight, torch.ones(64))  # GroupNorm keeps its own init
    assert "bn1.weight" in report.missing and "BatchNorms kept out" in report.summary()


def _python2_pickle(name, values):
    """``{name: float32 array, "__author__": "py2"}`` as Python 2's cPickle (protocol 2) writes it:
    byte strings are py2 ``str`` (BINSTRING), numpy lives in ``numpy.core``."""
    def text(b):
        return b"U" + bytes([len(b)]) + b

    data = np.asarray(values, dtype="<f4").tobytes()
    array = (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + text(b"b")
             + b"\x87R(K\x01K" + bytes([len(values)]) + b"\x85cnumpy\ndtype\n" + text(b"f4")
             + b"K\x00K\x01\x87R(K\x03" + text(b"<")
             + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89T"
             + len(data).to_bytes(4, "little") + data + b"tb")
    return b"\x80\x02}(" + text(name.encode()) + array + text(b"__author__") + text(b"py2") + b"u."


def test_python2_pickle_of_numpy_arrays_is_read(tmp_path):
    path = tmp_path / "py2.pkl"
    path.write_bytes(_python2_pickle("conv1_w", [1.5, -2.0, 3.25]))
    data = read_numpy_pickle(str(path))
    assert data["__author__"] == "py2"
    np.testing.assert_array_equal(data["conv1_w"], np.array([1.5, -2.0, 3.25], np.float32))


@pytest.mark.parametrize("func", [os.system, eval], ids=["os.system", "eval"])
def test_pickle_that_would_run_code_is_refused(tmp_path, func):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            if func is os.system:
                return os.system, (f"touch {marker}",)
            return eval, (f"open({str(marker)!r}, 'w').close()",)

    path = _write_pickle({"model": {"conv1.weight": Payload()}, "__author__": "x"},
                         tmp_path / "evil.pkl")
    with pytest.raises(BackboneWeightsError) as err:
        load_backbone_weights(build_backbone(_resnet_cfg()), path)
    message = str(err.value)
    assert "\n" not in message and path in message
    assert f".{func.__name__}'" in message and "Refusing" in message
    assert not marker.exists()


def test_shape_mismatch_names_both_shapes(tmp_path, torchvision_state):
    state = dict(torchvision_state)
    state["layer1.0.conv2.weight"] = torch.zeros(64, 64, 1, 1)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(BackboneWeightsError, match=r"layer1\.0\.conv2\.weight file \(64, 64, 1, "
                                                   r"1\) vs ours \(64, 64, 3, 3\)"):
        load_backbone_weights(build_backbone(_resnet_cfg()), str(path))


def test_file_of_another_network_is_refused(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"encoder.weight": torch.zeros(3)}, path)
    with pytest.raises(BackboneWeightsError, match="No tensor of .*other.pth"):
        load_backbone_weights(build_backbone(_resnet_cfg()), str(path))


def test_relative_name_is_looked_up_in_detector_pretrained(tmp_path, monkeypatch):
    cfg = get_cfg()
    cfg.merge_from_list(["MODEL.BACKBONE.NAME", "TinyNet", "MODEL.BACKBONE.FREEZE_AT", "1",
                         "MODEL.BACKBONE.WEIGHTS", "tiny.pth"])
    source = build_backbone(cfg)
    monkeypatch.setenv("DETECTOR_PRETRAINED", str(tmp_path / "zoo"))
    monkeypatch.chdir(tmp_path)

    with pytest.raises(FileNotFoundError) as err:
        load_backbone_weights_from_config(cfg, _Detector(build_backbone(cfg)))
    message = str(err.value)
    assert message.startswith("MODEL.BACKBONE.WEIGHTS: file 'tiny.pth' not found")
    assert "\n" not in message and str(tmp_path / "zoo" / "tiny.pth") in message

    (tmp_path / "zoo").mkdir()
    torch.save(source.state_dict(), tmp_path / "zoo" / "tiny.pth")
    target = _Detector(build_backbone(cfg))
    report = load_backbone_weights_from_config(cfg, target)
    assert report.missing == [] and report.unused == []
    for key, value in _own_weights(target.backbone).items():
        assert torch.equal(value, source.state_dict()[key]), key


@pytest.mark.parametrize("ext", [".pth", ".safetensors"])
def test_timm_efficientnet_file(tmp_path, ext):
    import timm

    cfg = get_cfg()
    cfg.merge_from_list(["MODEL.BACKBONE.NAME", "EfficientNet", "MODEL.EFFICIENTNET.VARIANT",
                         "b0", "MODEL.BACKBONE.NORM", "FrozenBN", "MODEL.BACKBONE.FREEZE_AT", "2",
                         "MODEL.BN.EPS", "0.001"])
    classifier = timm.create_model("tf_efficientnet_b0", pretrained=False)
    g = torch.Generator().manual_seed(3)
    state = {k: (torch.rand(v.shape, generator=g) + 0.5 if v.is_floating_point() else v)
             for k, v in classifier.state_dict().items()}
    path = str(tmp_path / f"tf_efficientnet_b0{ext}")
    if ext == ".pth":
        torch.save(state, path)
    else:
        from safetensors.torch import save_file

        save_file(state, path)

    cfg.MODEL.BACKBONE.WEIGHTS = path
    detector = _Detector(build_backbone(cfg))
    with CollectLogs(LOGGER) as logs:
        report = load_backbone_weights_from_config(cfg, detector)
    own = _own_weights(detector.backbone)
    assert own and report.missing == [] and report.unused == []
    for key, value in own.items():
        assert key.startswith("body.") and torch.equal(value, state[key[len("body."):]]), key
    assert {"classifier.weight", "conv_head.weight", "bn2.running_var"} <= set(report.dropped)
    assert "expect INPUT.FORMAT" not in logs.text  # RGB ImageNet mean/std: timm's convention


def test_warning_and_precedence_in_the_trainer(tmp_path, monkeypatch):
    from detector.engine import DefaultTrainer

    monkeypatch.setattr(DefaultTrainer, "build_train_loader", classmethod(lambda cls, cfg: []))
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

    def trainer(*opts, resume=False):
        cfg = get_cfg()
        cfg.merge_from_file(os.path.join(root, "configs", "demo", "retinanet_tiny_shapes.yaml"))
        cfg.merge_from_list(["MODEL.BACKBONE.FREEZE_AT", "1", "DATASETS.TEST", "()",
                             "OUTPUT_DIR", str(tmp_path / "out"), *opts])
        t = DefaultTrainer(cfg)
        t.resume_or_load(resume=resume)
        return t

    with CollectLogs(LOGGER, level=logging.WARNING) as logs:
        trainer()
    assert "MODEL.BACKBONE.FREEZE_AT=1" in logs.text and "RANDOM" in logs.text

    torch.manual_seed(5)
    source = trainer().model.backbone.state_dict()
    torch.save(source, tmp_path / "tiny.pth")
    torch.manual_seed(6)
    with CollectLogs(LOGGER) as logs:
        loaded = trainer("MODEL.BACKBONE.WEIGHTS", str(tmp_path / "tiny.pth"))
    assert "RANDOM" not in logs.text and "loaded" in logs.text
    for key, value in loaded.model.backbone.state_dict().items():
        assert torch.equal(value, source[key]), key

    # MODEL.WEIGHTS initializes the whole model: the backbone file is not read
    torch.manual_seed(7)
    whole = trainer().model.state_dict()
    torch.save({"model": whole}, tmp_path / "model.pth")
    torch.manual_seed(6)
    with CollectLogs(LOGGER) as logs:
        skipped = trainer("MODEL.BACKBONE.WEIGHTS", str(tmp_path / "missing.pth"),
                          "MODEL.WEIGHTS", str(tmp_path / "model.pth"))
    assert "is not loaded" in logs.text and "RANDOM" not in logs.text
    assert torch.equal(skipped.model.backbone.state_dict()["stages.0.0.weight"],
                       whole["backbone.stages.0.0.weight"])

    # a resumed run takes everything from its checkpoint and never needs the backbone file
    skipped.checkpointer.save("model_0000004", iteration=4)
    with CollectLogs(LOGGER) as logs:
        resumed = trainer("MODEL.BACKBONE.WEIGHTS", str(tmp_path / "missing.pth"), resume=True)
    assert resumed.start_iter == 5 and "RANDOM" not in logs.text
    assert torch.equal(resumed.model.backbone.state_dict()["stages.0.0.weight"],
                       whole["backbone.stages.0.0.weight"])
