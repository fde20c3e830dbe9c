"""tools/convert_torchvision_maskrcnn.py and its converter: torchvision's current and legacy key
layouts, the background row moved last, the 80 COCO classes kept in order."""
import pytest
import torch
from torchvision.models.detection import maskrcnn_resnet50_fpn

from detector.checkpoint.torchvision_maskrcnn import (
    convert_torchvision_maskrcnn_state_dict,
    select_classes,
)
from detector.checkpoint.torchvision_retinanet import TorchvisionConversionError
from detector.data.datasets import TORCHVISION_COCO80_INDICES
from tool_loader import load_tool


@pytest.fixture(scope="module")
def tv_state():
    torch.manual_seed(0)
    model = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91)
    return {k: v for k, v in model.state_dict().items()}


def _legacy(state):
    """torchvision's pre-0.13 layout, that of the released COCO checkpoint file."""
    legacy = {}
    for k, v in state.items():
        k = k.replace("rpn.head.conv.0.0.", "rpn.head.conv.")
        for i in range(4):
            k = k.replace(f"roi_heads.mask_head.{i}.0.", f"roi_heads.mask_head.mask_fcn{i + 1}.")
        if k.startswith("backbone.fpn.") and ("inner_blocks" in k or "layer_blocks" in k):
            parts = k.split(".")
            k = ".".join(parts[:4] + parts[5:])
        legacy[k] = v
    return legacy


def test_layouts_and_class_rows(tv_state):
    converted = convert_torchvision_maskrcnn_state_dict(tv_state)
    legacy = _legacy(tv_state)
    assert "rpn.head.conv.weight" in legacy and "roi_heads.mask_head.mask_fcn4.bias" in legacy
    again = convert_torchvision_maskrcnn_state_dict(legacy)
    assert again.keys() == converted.keys()
    assert all(torch.equal(again[k], converted[k]) for k in converted)
    cls = tv_state["roi_heads.box_predictor.cls_score.weight"]
    ours_cls = converted["roi_heads.box_predictor.cls_score.weight"]
    assert torch.equal(ours_cls[:90], cls[1:]) and torch.equal(ours_cls[90], cls[0])
    assert torch.equal(converted["roi_heads.box_predictor.bbox_pred.bias"],
                       tv_state["roi_heads.box_predictor.bbox_pred.bias"][4:])
    assert torch.equal(converted["roi_heads.mask_head.predictor.weight"],
                       tv_state["roi_heads.mask_predictor.mask_fcn_logits.weight"][1:])
    # ours c = torchvision's c + 1; the 80 real categories keep their rows, background last
    keep = [i - 1 for i in TORCHVISION_COCO80_INDICES]
    eighty = select_classes(converted, keep)
    assert eighty["roi_heads.box_predictor.cls_score.bias"].numel() == 81
    assert torch.equal(eighty["roi_heads.box_predictor.cls_score.weight"][:80],
                       cls[list(TORCHVISION_COCO80_INDICES)])
    assert torch.equal(eighty["roi_heads.box_predictor.cls_score.weight"][80], cls[0])
    box = tv_state["roi_heads.box_predictor.bbox_pred.weight"].reshape(91, 4, -1)
    assert torch.equal(eighty["roi_heads.box_predictor.bbox_pred.weight"].reshape(80, 4, -1),
                       box[list(TORCHVISION_COCO80_INDICES)])


def test_unknown_keys_are_one_line(tv_state):
    state = dict(tv_state)
    state["roi_heads.keypoint_head.0.weight"] = torch.zeros(1)
    with pytest.raises(TorchvisionConversionError, match=r"keypoint_head\.0\.weight") as err:
        convert_torchvision_maskrcnn_state_dict(state)
    assert "\n" not in str(err.value)


def test_convert_tool(tv_state, tmp_path):
    tool = load_tool("convert_torchvision_maskrcnn")
    src = tmp_path / "tv.pth"
    torch.save(_legacy(tv_state), src)
    out = tmp_path / "ours80.pth"
    assert tool.main(["--input", str(src), "--output", str(out), "--coco-contiguous"]) == 0
    saved = torch.load(out, weights_only=True)["model"]
    expected = select_classes(convert_torchvision_maskrcnn_state_dict(tv_state),
                              [i - 1 for i in TORCHVISION_COCO80_INDICES])
    assert saved.keys() == expected.keys()
    assert all(torch.equal(saved[k], expected[k]) for k in expected)
    junk = tmp_path / "junk.pth"
    junk.write_text("not a checkpoint")
    assert tool.main(["--input", str(junk), "--output", str(tmp_path / "x.pth")]) == 1
    assert not (tmp_path / "x.pth").exists()
