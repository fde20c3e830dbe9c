"""Every anchor generator. keras-retinanet / torchvision style: per pyramid level, base sizes x
scales x ratios at every location; effdet style through :func:`efficientdet_anchor_generator`.

Per location the anchors are ordered ratio-major (all sizes x scales of the first ratio, then the
next ratio), which is torchvision's ``AnchorGenerator`` order, so head outputs reshaped to
(H, W, A) line up with these anchors. Locations are row-major over the feature map.

effdet style (``aspect_multipliers`` given, ``scale_major=True``, ``offset=0.5``): an anchor is
``size * scale * (mw, mh)`` for effdet's (width, height) multipliers such as (1.4, 0.7), ordered
scale-major (all aspects of the first octave scale, then the next), computed in float64 and cast
to float32 like effdet's numpy code, so they equal ``effdet.anchors.Anchors`` (in XYXY order).

Stride rules: "pyramid" places level ``l``'s anchors ``2**l`` pixels apart. "torchvision" derives
each level's stride per axis from the padded batch size as ``H_pad // H_l`` and ``W_pad // W_l``,
as torchvision's ``AnchorGenerator`` does; the two agree when the padded size is a multiple of
the largest stride, otherwise the top levels differ (P6 at 800 px: stride 61, not 64).
"""
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from detector.layers import ShapeSpec

__all__ = ["AnchorGenerator", "efficientdet_anchor_generator", "normalize_sizes_per_level",
           "STRIDE_RULES"]

STRIDE_RULES = ("pyramid", "torchvision")


def normalize_sizes_per_level(sizes, num_levels: int, key="MODEL.ANCHOR_GENERATOR.SIZES"):
    """``[32, 64, ...]`` (one size per level) or ``[[32, 40], [64, 80], ...]`` -> list of lists,
    checked to have ``num_levels`` entries."""
    sizes = [list(s) if isinstance(s, (list, tuple)) else [s] for s in sizes]
    if len(sizes) != num_levels:
        raise ValueError(f"{key} has {len(sizes)} levels but the pyramid has {num_levels}")
    if any(len(s) == 0 or min(s) <= 0 for s in sizes):
        raise ValueError(f"{key}={sizes}: every level needs at least one positive size")
    if len({len(s) for s in sizes}) != 1:
        raise ValueError(f"{key}={sizes}: every level needs the same number of sizes "
                         "(the head is shared across levels)")
    return [[float(x) for x in s] for s in sizes]


class AnchorGenerator(nn.Module):
    """Anchors for a feature pyramid.

    Args:
        sizes: base sizes per level (list of lists; each level the same count).
        scales: multipliers applied to every base size (octave scales).
        ratios: aspect ratios height / width.
        strides: stride of each level in pixels.
        offset: anchor centres at ``(i + offset) * stride`` (0.0 torchvision/detectron2, 0.5 keras).
        round_base_anchors: round the zero-centred base anchors to integers (torchvision).
        aspect_multipliers: optional (width, height) multipliers replacing ``ratios`` (effdet's
            ``aspect_ratios``); anchors are then computed in float64.
        scale_major: order anchors per location scale-major (effdet) instead of ratio-major.
        stride_rule: "pyramid" (``strides``) or "torchvision" (padded size // feature size per
            axis; ``forward`` then needs ``image_size``).

    ``forward(features, image_size=None)`` takes the per-level feature maps (only their H, W are
    used) and the padded batch size (H, W), and returns per-level (H * W * A, 4) float32 XYXY
    tensors.
    """

    _MAX_CACHED_GRIDS = 64

    def __init__(self, *, sizes: Sequence[Sequence[float]], scales: Sequence[float],
                 ratios: Sequence[float], strides: Sequence[int], offset: float = 0.0,
                 round_base_anchors: bool = False,
                 aspect_multipliers: Sequence[Sequence[float]] = (), scale_major: bool = False,
                 stride_rule: str = "pyramid"):
        super().__init__()
        if stride_rule not in STRIDE_RULES:
            raise ValueError(f"MODEL.ANCHOR_GENERATOR.STRIDE_RULE='{stride_rule}' must be one of "
                             f"{list(STRIDE_RULES)}")
        sizes = normalize_sizes_per_level(sizes, len(strides))
        aspect_multipliers = [tuple(float(v) for v in m) for m in aspect_multipliers]
        if aspect_multipliers:
            if any(len(m) != 2 or min(m) <= 0 for m in aspect_multipliers):
                raise ValueError(f"Anchor aspect multipliers {aspect_multipliers} must be "
                                 "positive (width, height) pairs")
            ratios = [h / w for w, h in aspect_multipliers]
        if not scales or min(scales) <= 0 or not ratios or min(ratios) <= 0:
            raise ValueError(f"Anchor scales {list(scales)} and ratios {list(ratios)} must be "
                             "non-empty and positive")
        if not 0.0 <= offset < 1.0:
            raise ValueError(f"MODEL.ANCHOR_GENERATOR.OFFSET={offset} must be in [0, 1)")
        self.sizes = sizes
        self.scales = [float(s) for s in scales]
        self.ratios = [float(r) for r in ratios]
        self.strides = [int(s) for s in strides]
        self.offset = float(offset)
        self.round_base_anchors = bool(round_base_anchors)
        self.aspect_multipliers = aspect_multipliers
        self.scale_major = bool(scale_major)
        self.stride_rule = stride_rule
        # effdet-style anchors are exact float64 values rounded once to float32
        self._float64 = bool(aspect_multipliers)
        for i, level_sizes in enumerate(sizes):
            self.register_buffer(f"base_anchors_{i}", self.make_base_anchors(level_sizes),
                                 persistent=False)
        self._grid_cache: "OrderedDict[tuple, torch.Tensor]" = OrderedDict()

    @property
    def num_anchors_per_location(self) -> int:
        return len(self.sizes[0]) * len(self.scales) * len(self.ratios)

    @property
    def num_levels(self) -> int:
        return len(self.strides)

    def make_base_anchors(self, level_sizes: Sequence[float]) -> torch.Tensor:
        """(A, 4) anchors centred on (0, 0), ratio-major. Computed in float32 with torchvision's
        operation order so rounded anchors match it exactly (float64 and effdet's order when
        ``aspect_multipliers`` are given)."""
        if self.aspect_multipliers:
            side = torch.tensor([s * c for s in level_sizes for c in self.scales],
                                dtype=torch.float64)
            mults = torch.tensor(self.aspect_multipliers, dtype=torch.float64)
            # (A_side, A_aspect) or (A_aspect, A_side) half sizes
            half_w = side[:, None] * mults[None, :, 0] / 2.0
            half_h = side[:, None] * mults[None, :, 1] / 2.0
            if not self.scale_major:
                half_w, half_h = half_w.t(), half_h.t()
            half_w, half_h = half_w.reshape(-1), half_h.reshape(-1)
            base = torch.stack([-half_w, -half_h, half_w, half_h], dim=1)
            return base.round() if self.round_base_anchors else base
        side = torch.tensor([s * c for s in level_sizes for c in self.scales], dtype=torch.float32)
        h_ratios = torch.sqrt(torch.tensor(self.ratios, dtype=torch.float32))
        w_ratios = 1 / h_ratios
        ws = w_ratios[:, None] * side[None, :]
        hs = h_ratios[:, None] * side[None, :]
        if self.scale_major:
            ws, hs = ws.t(), hs.t()
        ws, hs = ws.reshape(-1), hs.reshape(-1)
        base = torch.stack([-ws, -hs, ws, hs], dim=1) / 2
        return base.round() if self.round_base_anchors else base

    def base_anchors(self, level_index: int) -> torch.Tensor:
        return getattr(self, f"base_anchors_{level_index}")

    def _grid_anchors(self, level_index: int, height: int, width: int, stride_h: int,
                      stride_w: int) -> torch.Tensor:
        base = self.base_anchors(level_index)
        key = (level_index, height, width, stride_h, stride_w, base.device)
        cached = self._grid_cache.get(key)
        if cached is not None:
            self._grid_cache.move_to_end(key)
            return cached
        if self._float64:
            dtype = torch.float64
        elif self.offset == 0.0:  # integer shifts, exactly as torchvision
            dtype = torch.int32
        else:
            dtype = torch.float32
        shifts_x = torch.arange(width, dtype=dtype, device=base.device)
        shifts_y = torch.arange(height, dtype=dtype, device=base.device)
        if self.offset != 0.0:
            shifts_x, shifts_y = shifts_x + self.offset, shifts_y + self.offset
        shifts_x, shifts_y = shifts_x * stride_w, shifts_y * stride_h
        shift_y, shift_x = torch.meshgrid(shifts_y, shifts_x, indexing="ij")
        shift_x, shift_y = shift_x.reshape(-1), shift_y.reshape(-1)
        shifts = torch.stack((shift_x, shift_y, shift_x, shift_y), dim=1)
        anchors = (shifts.view(-1, 1, 4) + base.view(1, -1, 4)).reshape(-1, 4).float()
        self._grid_cache[key] = anchors
        if len(self._grid_cache) > self._MAX_CACHED_GRIDS:
            self._grid_cache.popitem(last=False)
        return anchors

    def level_strides(self, feature_sizes: Sequence[Tuple[int, int]],
                      image_size: Optional[Sequence[int]] = None) -> List[Tuple[int, int]]:
        """(stride_h, stride_w) per level for feature maps of ``feature_sizes`` (H_l, W_l) computed
        from a padded batch of ``image_size`` (H, W), following ``stride_rule``."""
        if self.stride_rule == "pyramid":
            return [(s, s) for s in self.strides]
        if image_size is None:
            raise ValueError("MODEL.ANCHOR_GENERATOR.STRIDE_RULE='torchvision' needs the padded "
                             "image size: call the anchor generator with image_size=(H, W)")
        image_h, image_w = int(image_size[0]), int(image_size[1])
        strides = []
        for i, (h, w) in enumerate(feature_sizes):
            if not 0 < h <= image_h or not 0 < w <= image_w:
                raise ValueError(f"Anchor level {i}: feature map {h}x{w} does not fit the padded "
                                 f"image {image_h}x{image_w}")
            strides.append((image_h // h, image_w // w))
        return strides

    def forward(self, features: List[torch.Tensor],
                image_size: Optional[Sequence[int]] = None) -> List[torch.Tensor]:
        """Per-level anchors for ``features`` (N, C, H_l, W_l); ``image_size`` is the padded
        batch's (H, W), needed by the "torchvision" stride rule."""
        if len(features) != self.num_levels:
            raise ValueError(f"AnchorGenerator has {self.num_levels} levels but got "
                             f"{len(features)} feature maps")
        feature_sizes = [(int(f.shape[-2]), int(f.shape[-1])) for f in features]
        strides = self.level_strides(feature_sizes, image_size)
        return [self._grid_anchors(i, h, w, stride_h, stride_w)
                for i, ((h, w), (stride_h, stride_w)) in enumerate(zip(feature_sizes, strides))]

    @classmethod
    def from_config(cls, cfg, feature_shapes: Dict[str, ShapeSpec]) -> dict:
        """``feature_shapes``: the neck's ``output_shape()``, levels ``p<k>`` with stride 2**k."""
        names = sorted(feature_shapes, key=lambda n: int(n[1:]))
        feature_strides = [feature_shapes[n].stride for n in names]
        strides = list(cfg.MODEL.ANCHOR_GENERATOR.STRIDES) or feature_strides
        if strides != feature_strides:
            raise ValueError(
                f"MODEL.ANCHOR_GENERATOR.STRIDES={list(strides)} must equal 2**level for the "
                f"pyramid levels {names} (MODEL.NECK.MIN_LEVEL..MAX_LEVEL), i.e. {feature_strides}"
            )
        return {
            "sizes": normalize_sizes_per_level(cfg.MODEL.ANCHOR_GENERATOR.SIZES, len(names)),
            "scales": list(cfg.MODEL.ANCHOR_GENERATOR.SCALES),
            "ratios": list(cfg.MODEL.ANCHOR_GENERATOR.RATIOS),
            "strides": strides,
            "offset": cfg.MODEL.ANCHOR_GENERATOR.OFFSET,
            "round_base_anchors": cfg.MODEL.ANCHOR_GENERATOR.ROUND_BASE_ANCHORS,
            "stride_rule": cfg.MODEL.ANCHOR_GENERATOR.STRIDE_RULE,
        }


def efficientdet_anchor_generator(*, min_level: int, max_level: int, anchor_scale: float,
                                  num_scales: int, aspect_ratios: Sequence[Sequence[float]]
                                  ) -> AnchorGenerator:
    """effdet's anchors: per level side ``anchor_scale * 2**level * 2**(i / num_scales)`` times
    (width, height) multipliers, centred at ``(j + 0.5) * stride``, ordered scale-major."""
    if anchor_scale <= 0 or num_scales <= 0:
        raise ValueError(f"MODEL.EFFICIENTDET.ANCHOR_SCALE={anchor_scale} and NUM_SCALES="
                         f"{num_scales} must be positive")
    levels = range(min_level, max_level + 1)
    return AnchorGenerator(
        sizes=[[anchor_scale * 2 ** k] for k in levels],
        scales=[2.0 ** (i / num_scales) for i in range(num_scales)],
        ratios=[], strides=[2 ** k for k in levels], offset=0.5,
        aspect_multipliers=aspect_ratios, scale_major=True)
