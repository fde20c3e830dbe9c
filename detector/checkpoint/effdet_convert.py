"""Convert effdet (rwightman/efficientdet-pytorch) ``EfficientDet`` weights to this project's names.

Mapping (effdet -> ours), for the model built from configs/efficientdet/EfficientDet-D<k>.yaml
(F = ``fpn.cell.<r>.fnode.<n>``, N = ``neck.cells.<r>.nodes.<node n>``):

- ``backbone.<timm name>``              -> ``backbone.body.<timm name>``
- ``fpn.resample.<i>.conv.{conv,bn}``   -> ``neck.extra_levels.p<min+i>.proj.{conv,norm}``
- ``F.combine.resample.<o>.conv.{conv,bn}`` -> ``N.input_convs.<input o>.{conv,norm}``
- ``F.combine.edge_weights``            -> ``N.fusion.edge_weights``
- ``F.after_combine.conv.{conv_dw,conv_pw,bn}`` -> ``N.{conv.conv_dw,conv.conv_pw,norm}``
- ``class_net|box_net.conv_rep.<i>``    -> ``head.cls_subnet|bbox_subnet.<i>``
- ``class_net|box_net.bn_rep.<i>.<level>[.bn]`` (also level-first)
                                        -> ``head.cls_norms|bbox_norms.<i>.<level>``
- ``class_net|box_net.predict``         -> ``head.cls_score|bbox_pred``

Node n is the n-th node of :func:`detector.modeling.neck.bifpn.bifpn_graph` (effdet's order); input
offset o < L is ``p<min+o>_in``, otherwise node ``o - L``. effdet predicts box deltas per anchor as
(dy, dx, dh, dw); the box predictor's output channels are reordered to our (dx, dy, dw, dh).
The classifier's K outputs per anchor are effdet's classes (COCO: category id - 1, 90 of them);
:func:`select_classes` keeps the subset its caller lists, e.g. the 80 contiguous COCO classes
(``detector.data.datasets.EFFDET_COCO80_INDICES``). Biases before a BatchNorm (``redundant_bias``)
that our model lacks are folded into the norm's running mean, which leaves train- and eval-mode
outputs unchanged.
"""
import re
from typing import Dict, Mapping, Optional, Sequence

import torch

from detector.modeling.neck.bifpn import bifpn_graph

from .conversion import ConversionError, select_classifier_outputs, short_list, state_dict_problems

__all__ = ["EffdetConversionError", "convert_effdet_state_dict", "check_against",
           "select_classes", "describe_effdet_state_dict"]

_NORM = r"(weight|bias|running_mean|running_var|num_batches_tracked)"


class EffdetConversionError(ConversionError):
    """An effdet state dict that does not map one-to-one onto our EfficientDet."""


def _bifpn_names(min_level: int, max_level: int):
    graph = bifpn_graph(min_level, max_level)
    inputs = [f"p{k}_in" for k in range(min_level, max_level + 1)]
    node_names = [name for name, _, _ in graph]
    return node_names, inputs + node_names


def _map_key(key: str, min_level: int, max_level: int) -> Optional[str]:
    """Our name for an effdet key, or None if unknown."""
    node_names, offset_names = _bifpn_names(min_level, max_level)
    if key.startswith("backbone."):
        return "backbone.body." + key[len("backbone."):]
    m = re.fullmatch(r"fpn\.resample\.(\d+)\.conv\.(conv|bn)\.(\w+)", key)
    if m:
        part = "conv" if m.group(2) == "conv" else "norm"
        return f"neck.extra_levels.p{min_level + int(m.group(1))}.proj.{part}.{m.group(3)}"
    m = re.fullmatch(r"fpn\.cell\.(\d+)\.fnode\.(\d+)\.(.+)", key)
    if m:
        cell, node, rest = m.group(1), int(m.group(2)), m.group(3)
        if node >= len(node_names):
            return None
        prefix = f"neck.cells.{cell}.nodes.{node_names[node]}"
        if rest == "combine.edge_weights":
            return f"{prefix}.fusion.edge_weights"
        r = re.fullmatch(r"combine\.resample\.(\d+)\.conv\.(conv|bn)\.(\w+)", rest)
        if r:
            offset = int(r.group(1))
            if offset >= len(offset_names):
                return None
            part = "conv" if r.group(2) == "conv" else "norm"
            return f"{prefix}.input_convs.{offset_names[offset]}.{part}.{r.group(3)}"
        r = re.fullmatch(r"after_combine\.conv\.(conv_dw|conv_pw)\.(weight|bias)", rest)
        if r:
            return f"{prefix}.conv.{r.group(1)}.{r.group(2)}"
        r = re.fullmatch(r"after_combine\.conv\.bn\." + _NORM, rest)
        if r:
            return f"{prefix}.norm.{r.group(1)}"
        return None
    m = re.fullmatch(r"(class_net|box_net)\.(.+)", key)
    if m:
        cls = m.group(1) == "class_net"
        rest = m.group(2)
        r = re.fullmatch(r"conv_rep\.(\d+)\.(conv_dw|conv_pw)\.(weight|bias)", rest)
        if r:
            subnet = "cls_subnet" if cls else "bbox_subnet"
            return f"head.{subnet}.{r.group(1)}.{r.group(2)}.{r.group(3)}"
        norms = "cls_norms" if cls else "bbox_norms"
        r = re.fullmatch(r"bn_rep\.(\d+)\.(\d+)\.bn\." + _NORM, rest)  # repeat-first (TF models)
        if r:
            return f"head.{norms}.{r.group(1)}.{r.group(2)}.{r.group(3)}"
        r = re.fullmatch(r"bn_rep\.(\d+)\.(\d+)\." + _NORM, rest)  # head_bn_level_first
        if r:
            return f"head.{norms}.{r.group(2)}.{r.group(1)}.{r.group(3)}"
        r = re.fullmatch(r"predict\.(conv_dw|conv_pw)\.(weight|bias)", rest)
        if r:
            return f"head.{'cls_score' if cls else 'bbox_pred'}.{r.group(1)}.{r.group(2)}"
    return None


def _yx_to_xy(tensor: torch.Tensor) -> torch.Tensor:
    """Reorder box-predictor output channels from effdet's (dy, dx, dh, dw) per anchor."""
    shape = tensor.shape
    return tensor.reshape(-1, 4, *shape[1:])[:, [1, 0, 3, 2]].reshape(shape).clone()


def describe_effdet_state_dict(state_dict: Mapping[str, torch.Tensor]) -> str:
    """A short description (BiFPN width and cells, head convs, classes) to name a variant."""
    width = state_dict.get("fpn.cell.0.fnode.0.after_combine.conv.conv_pw.weight")
    cells = {int(m.group(1)) for k in state_dict
             for m in [re.match(r"fpn\.cell\.(\d+)\.", k)] if m}
    head = {int(m.group(1)) for k in state_dict
            for m in [re.match(r"class_net\.conv_rep\.(\d+)\.", k)] if m}
    box_bias = state_dict.get("box_net.predict.conv_pw.bias")
    cls_bias = state_dict.get("class_net.predict.conv_pw.bias")
    classes = (cls_bias.numel() // (box_bias.numel() // 4)
               if cls_bias is not None and box_bias is not None else "?")
    width = width.shape[0] if width is not None else "?"
    return (f"BiFPN {width} channels x {len(cells)} cells, {len(head)} head convs, "
            f"{classes} classes")


def convert_effdet_state_dict(
    effdet_state_dict: Mapping[str, torch.Tensor],
    expected_state_dict: Optional[Mapping[str, torch.Tensor]] = None, *,
    min_level: int = 3, max_level: int = 7, class_indices: Optional[Sequence[int]] = None,
) -> Dict[str, torch.Tensor]:
    """Rename an effdet ``EfficientDet.state_dict()`` (or a ``DetBench*`` one, ``model.``
    prefix, or a DDP/EMA ``module.`` prefix) to our keys.

    Args:
        expected_state_dict: optionally our model's ``state_dict()``; then every key must be
            present with the same shape, and redundant biases it lacks are folded into norms.
        min_level, max_level: the pyramid levels (effdet's node numbering depends on them).
        class_indices: keep only these classifier outputs (see :func:`select_classes`).
    Raises:
        EffdetConversionError: one line naming unmapped, missing or mismatched keys.
    """
    state = dict(effdet_state_dict)
    for prefix in ("module.", "model."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    state.pop("anchors.boxes", None)  # DetBench buffer, recomputed by us
    converted: Dict[str, torch.Tensor] = {}
    unmapped = []
    for key, value in state.items():
        new_key = _map_key(key, min_level, max_level)
        if new_key is None:
            unmapped.append(key)
            continue
        if new_key.startswith("head.bbox_pred.conv_pw."):
            value = _yx_to_xy(value)
        converted[new_key] = value
    if unmapped:
        raise EffdetConversionError(
            f"{len(unmapped)} effdet keys have no counterpart (expected an effdet EfficientDet "
            f"state dict for levels P{min_level}-P{max_level}): {short_list(unmapped)}")
    if class_indices is not None:
        converted = select_classes(converted, class_indices)
    if expected_state_dict is not None:
        converted = _fold_redundant_biases(converted, expected_state_dict)
        check_against(converted, expected_state_dict, describe_effdet_state_dict(state))
    return converted


def _fold_redundant_biases(converted: Dict[str, torch.Tensor],
                           expected: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """BN(x + b) == BN'(x) with running_mean' = running_mean - b (and the batch mean absorbs b
    in training), so a bias our model does not have moves into the norm after it."""
    converted = dict(converted)
    for key in [k for k in converted if k.endswith(".bias") and k not in expected]:
        conv = key[: -len(".bias")]
        if conv.endswith(".conv_pw") and "_subnet." in conv:
            # head: one norm per level after the shared conv
            prefix, index = conv.rsplit(".", 2)[0], conv.rsplit(".", 2)[1]
            norms = prefix.replace("_subnet", "_norms") + f".{index}."
        elif conv.endswith(".conv.conv_pw"):
            norms = conv[: -len("conv.conv_pw")] + "norm."
        elif conv.endswith(".conv"):
            norms = conv[: -len("conv")] + "norm."
        else:
            continue
        means = [k for k in expected if k.startswith(norms) and k.endswith("running_mean")
                 and k in converted]
        if not means:
            continue
        bias = converted.pop(key)
        for mean_key in means:
            converted[mean_key] = converted[mean_key] - bias
    return converted


def check_against(converted: Mapping[str, torch.Tensor],
                  expected_state_dict: Mapping[str, torch.Tensor], source: str = "") -> None:
    """One-line error unless ``converted`` has exactly the keys and shapes of
    ``expected_state_dict``; ``source`` describes the checkpoint in the message."""
    problems = state_dict_problems(converted, expected_state_dict, source="the checkpoint")
    if problems:
        what = f" (checkpoint: {source})" if source else ""
        raise EffdetConversionError("effdet weights do not fit the model, another variant or "
                                    f"class count?{what}; " + "; ".join(problems))


def select_classes(state_dict: Mapping[str, torch.Tensor],
                   class_indices: Sequence[int]) -> Dict[str, torch.Tensor]:
    """Keep only the classifier outputs of ``class_indices`` (in that order) in a converted state
    dict; the caller owns the class layout (COCO's: ``detector.data.datasets``)."""
    return select_classifier_outputs(state_dict, class_indices, cls_prefix="head.cls_score.conv_pw",
                                     box_bias_key="head.bbox_pred.conv_pw.bias",
                                     error=EffdetConversionError)
