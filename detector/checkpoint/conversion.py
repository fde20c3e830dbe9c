"""Helpers shared by the converters of other projects' weights (torchvision, effdet)."""
from typing import Dict, Iterable, List, Mapping, Sequence, Type

import torch

__all__ = ["ConversionError", "short_list", "state_dict_problems", "select_classifier_outputs"]


class ConversionError(ValueError):
    """Weights of another project that do not map one-to-one onto our model."""


def short_list(keys: Iterable[str], limit: int = 8) -> str:
    """Sorted, comma-separated, at most ``limit`` items and a count of the rest."""
    keys = sorted(keys)
    more = f" ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def state_dict_problems(converted: Mapping[str, torch.Tensor],
                        expected: Mapping[str, torch.Tensor], *, source: str,
                        limit: int = 4) -> List[str]:
    """What keeps ``converted`` from loading strictly into a model with state dict ``expected``:
    shape mismatches, keys missing in the ``source`` checkpoint, keys our model lacks."""
    mismatched = [
        f"{k} {tuple(converted[k].shape)} vs ours {tuple(expected[k].shape)}"
        for k in sorted(set(converted) & set(expected))
        if tuple(converted[k].shape) != tuple(expected[k].shape)
    ]
    missing = set(expected) - set(converted)
    unexpected = set(converted) - set(expected)
    problems = []
    if mismatched:
        problems.append(f"shape mismatch: {short_list(mismatched, limit)}")
    if missing:
        problems.append(f"missing in {source}: {short_list(missing, limit)}")
    if unexpected:
        problems.append(f"not in our model: {short_list(unexpected, limit)}")
    return problems


def select_classifier_outputs(state_dict: Mapping[str, torch.Tensor],
                              class_indices: Sequence[int], *, cls_prefix: str,
                              box_bias_key: str,
                              error: Type[Exception] = ConversionError) -> Dict[str, torch.Tensor]:
    """Keep only the outputs of ``class_indices`` (in that order) of the classifier
    ``<cls_prefix>.weight`` / ``.bias``, whose output channel ``a * K + k`` is anchor a, class k;
    the anchor count comes from the box predictor's bias (4 per anchor)."""
    state_dict = dict(state_dict)
    weight, bias = state_dict[cls_prefix + ".weight"], state_dict[cls_prefix + ".bias"]
    num_anchors = state_dict[box_bias_key].numel() // 4
    num_classes = bias.numel() // num_anchors
    idx = torch.as_tensor(list(class_indices), dtype=torch.int64)
    if idx.numel() == 0 or int(idx.min()) < 0 or int(idx.max()) >= num_classes:
        raise error(
            f"class indices must lie in [0, {num_classes}) for a head with {num_classes} classes")
    state_dict[cls_prefix + ".weight"] = (
        weight.reshape(num_anchors, num_classes, *weight.shape[1:])[:, idx]
        .reshape(-1, *weight.shape[1:]).clone())
    state_dict[cls_prefix + ".bias"] = (
        bias.reshape(num_anchors, num_classes)[:, idx].reshape(-1).clone())
    return state_dict
