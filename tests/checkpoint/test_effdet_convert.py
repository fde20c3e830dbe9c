"""Converting effdet EfficientDet checkpoints (detector/checkpoint/effdet_convert.py and
tools/convert_effdet.py), checked on D0: one-line errors for another variant's or unknown keys,
redundant biases folded into the norms, the 80 COCO classes kept from effdet's 90 logits."""

import pytest
import torch

from detector.checkpoint.effdet_convert import (
    EffdetConversionError,
    convert_effdet_state_dict,
    select_classes,
)
from detector.data.datasets import EFFDET_COCO80_INDICES
from detector.modeling import build_model

pytest.importorskip("effdet")
from effdet_pair import (  # noqa: E402
    build_effdet_pair,
    effdet_model,
    efficientdet_cfg,
    efficientdet_config_path,
    normalized,
    per_level_errors,
)
from tool_loader import load_tool  # noqa: E402


@pytest.fixture(scope="module")
def pair():
    return build_effdet_pair(0)


@pytest.fixture(scope="module")
def d1_state():
    """A D1 checkpoint, which a D0 model must refuse."""
    return effdet_model(1).state_dict()


def test_other_variant_checkpoint_names_mismatched_keys(pair, d1_state):
    _, theirs, ours, _, _ = pair
    with pytest.raises(EffdetConversionError) as err:
        convert_effdet_state_dict(d1_state, ours.state_dict())
    message = str(err.value)
    assert "\n" not in message
    assert "BiFPN 88 channels x 4 cells" in message
    assert "shape mismatch: head.bbox_norms.0.0.bias (88,) vs ours (64,)" in message
    assert "not in our model: backbone.body.blocks.0.1." in message  # B1 is deeper

    state = dict(theirs.state_dict())
    state["fpn.cell.0.fnode.0.something.weight"] = torch.zeros(1)
    with pytest.raises(EffdetConversionError, match=r"fnode\.0\.something\.weight"):
        convert_effdet_state_dict(state, ours.state_dict())


def test_redundant_biases_fold_into_norms(pair):
    _, theirs, _, _, images = pair
    lean = build_model(efficientdet_cfg(0, "MODEL.EFFICIENTDET.REDUNDANT_BIAS", "False"))
    converted = convert_effdet_state_dict(theirs.state_dict(), lean.state_dict())
    assert "head.cls_subnet.0.conv_pw.bias" not in converted
    lean.load_state_dict(converted, strict=True)
    cls_err, box_err = per_level_errors(lean, theirs, normalized(lean, images))
    assert max(cls_err + box_err) <= 1e-4


def test_coco80_selection_keeps_those_logits(pair):
    _, _, ours, converted, images = pair
    assert len(EFFDET_COCO80_INDICES) == 80 and EFFDET_COCO80_INDICES[:3] == (0, 1, 2)
    ours80 = build_model(efficientdet_cfg(0, "MODEL.EFFICIENTDET.NUM_CLASSES", "80"))
    ours80.load_state_dict(select_classes(converted, EFFDET_COCO80_INDICES), strict=True)
    ours80.eval()
    ours.eval()  # BatchNorm with running statistics, whatever ran before
    x = normalized(ours, images[:1])
    with torch.no_grad():
        logits80 = ours80.forward_features(x)[0][-1]
        logits90 = ours.forward_features(x)[0][-1]
    n, _, h, w = logits90.shape
    expected = logits90.reshape(n, 9, 90, h, w)[:, :, list(EFFDET_COCO80_INDICES)]
    assert torch.equal(logits80, expected.reshape(n, 9 * 80, h, w))


def test_convert_tool(pair, d1_state, tmp_path):
    _, theirs, _, converted, _ = pair
    tool = load_tool("convert_effdet")
    src, dst = tmp_path / "effdet_d0.pth", tmp_path / "out" / "ours.pth"
    torch.save({"state_dict": theirs.state_dict()}, src)
    config = efficientdet_config_path(0)
    assert tool.main(["--input", str(src), "--output", str(dst), "--config-file", str(config)]) == 0
    saved = torch.load(dst, weights_only=True)
    assert set(saved) == {"model"} and saved["model"].keys() == converted.keys()
    assert all(torch.equal(saved["model"][k], converted[k]) for k in converted)

    dst80 = tmp_path / "ours80.pth"
    assert tool.main(["--input", str(src), "--output", str(dst80), "--config-file", str(config),
                      "--coco80"]) == 0
    assert torch.load(dst80, weights_only=True)["model"]["head.cls_score.conv_pw.bias"].numel() \
        == 9 * 80

    wrong = tmp_path / "d1.pth"
    torch.save(d1_state, wrong)
    assert tool.main(["--input", str(wrong), "--output", str(tmp_path / "x.pth"),
                      "--config-file", str(config)]) == 1
    junk = tmp_path / "junk.pth"
    junk.write_text("not a checkpoint")
    assert tool.main(["--input", str(junk), "--output", str(tmp_path / "x.pth"),
                      "--config-file", str(config)]) == 1
    assert not (tmp_path / "x.pth").exists()
