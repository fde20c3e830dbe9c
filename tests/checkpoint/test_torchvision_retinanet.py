"""Converting torchvision RetinaNet checkpoints (detector/checkpoint/torchvision_retinanet.py and
tools/convert_torchvision_retinanet.py): both key layouts, one-line errors naming the keys, and the
80 COCO classes kept from torchvision's 91 logits."""

import pytest
import torch
from torchvision.models._meta import _COCO_CATEGORIES

from detector.checkpoint.torchvision_retinanet import (
    TorchvisionConversionError,
    convert_torchvision_retinanet_state_dict,
    select_classes,
)
from detector.data.datasets import TORCHVISION_COCO80_INDICES
from detector.modeling import build_model
from detector.modeling.dense_heads import permute_to_N_HWA_K

from tool_loader import load_tool
from torchvision_retinanet_pair import build_torchvision_pair, torchvision_cfg


@pytest.fixture(scope="module")
def models():
    return build_torchvision_pair()


def _to_legacy_layout(state_dict):
    """torchvision's pre-0.13 key layout, that of the released COCO checkpoint file."""
    legacy = {}
    for k, v in state_dict.items():
        parts = k.split(".")
        if k.startswith("backbone.fpn.") and parts[2] in ("inner_blocks", "layer_blocks"):
            k = ".".join(parts[:4] + parts[5:])  # drop the ".0"
        elif ".conv." in k and k.startswith("head."):
            i = parts.index("conv")
            k = ".".join(parts[: i + 1] + [str(2 * int(parts[i + 1]))] + parts[i + 3:])
        legacy[k] = v
    return legacy


def test_legacy_torchvision_layout_converts_identically(models):
    tv, ours, converted, _ = models
    legacy = _to_legacy_layout(tv.state_dict())
    assert "head.classification_head.conv.6.weight" in legacy
    assert "backbone.fpn.inner_blocks.2.weight" in legacy
    again = convert_torchvision_retinanet_state_dict(legacy, ours.state_dict())
    assert again.keys() == converted.keys()
    assert all(torch.equal(again[k], converted[k]) for k in converted)


def test_conversion_errors_name_the_keys(models):
    tv, ours, _, _ = models
    state = dict(tv.state_dict())
    state["head.classification_head.conv.0.1.weight"] = torch.ones(256)  # a GN head (v2)
    with pytest.raises(TorchvisionConversionError, match=r"conv\.0\.1\.weight"):
        convert_torchvision_retinanet_state_dict(state)

    state = dict(tv.state_dict())
    state["backbone.fpn.extra_blocks.p6.weight"] = torch.zeros(256, 2048, 3, 3)  # P6 from C5 (v2)
    del state["head.regression_head.bbox_reg.bias"]
    with pytest.raises(TorchvisionConversionError) as err:
        convert_torchvision_retinanet_state_dict(state, ours.state_dict())
    message = str(err.value)
    assert "\n" not in message
    assert "neck.top_block.p6.weight (256, 2048, 3, 3) vs ours (256, 256, 3, 3)" in message
    assert "head.bbox_pred.bias" in message


def test_select_coco_classes_keeps_those_logits(models):
    tv, _, converted, images = models
    expected_ids = [i for i, name in enumerate(_COCO_CATEGORIES)
                    if name not in ("__background__", "N/A")]
    assert list(TORCHVISION_COCO80_INDICES) == expected_ids
    ours80 = build_model(torchvision_cfg("MODEL.RETINANET.NUM_CLASSES", "80"))
    ours80.load_state_dict(select_classes(converted, TORCHVISION_COCO80_INDICES), strict=True)
    ours80.eval()
    tv.eval()
    x = (images[1][None] - ours80.pixel_mean) / ours80.pixel_std
    with torch.no_grad():
        p7 = ours80.neck(ours80.backbone(x))["p7"]
        logits80 = permute_to_N_HWA_K(ours80.head([p7])[0][0], 80)
        logits91 = permute_to_N_HWA_K(tv.head.classification_head.cls_logits(
            tv.head.classification_head.conv(p7)), 91)
    assert torch.equal(logits80, logits91[..., list(TORCHVISION_COCO80_INDICES)])


def test_convert_tool_writes_checkpoint(models, tmp_path):
    tv, _, converted, _ = models
    tool = load_tool("convert_torchvision_retinanet")
    src, dst = tmp_path / "tv.pth", tmp_path / "out" / "ours.pth"
    torch.save(_to_legacy_layout(tv.state_dict()), src)
    assert tool.main(["--input", str(src), "--output", str(dst)]) == 0
    saved = torch.load(dst, weights_only=True)
    assert set(saved) == {"model"} and saved["model"].keys() == converted.keys()
    assert all(torch.equal(saved["model"][k], converted[k]) for k in converted)
    assert not (tmp_path / "out" / "ours.pth.tmp").exists()

    dst80 = tmp_path / "ours80.pth"
    assert tool.main(["--input", str(src), "--output", str(dst80), "--coco-contiguous"]) == 0
    saved80 = torch.load(dst80, weights_only=True)["model"]
    expected80 = select_classes(converted, TORCHVISION_COCO80_INDICES)
    assert saved80["head.cls_score.bias"].numel() == 9 * 80
    assert all(torch.equal(saved80[k], expected80[k]) for k in expected80)

    bad = tmp_path / "bad.pth"
    torch.save({"something.else": torch.zeros(1)}, bad)
    assert tool.main(["--input", str(bad), "--output", str(tmp_path / "x.pth")]) == 1
    junk = tmp_path / "junk.pth"
    junk.write_text("not a checkpoint")
    assert tool.main(["--input", str(junk), "--output", str(tmp_path / "x.pth")]) == 1
    assert not (tmp_path / "x.pth").exists()
