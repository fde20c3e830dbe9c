"""EfficientDet compound scaling (Tan et al. 2020, Table 1, as effdet's ``tf_efficientdet_d*``).

``MODEL.EFFICIENTDET.COMPOUND_COEF`` k in 0..7 selects the D<k> sizes below; an explicit,
non-empty/non-zero key (e.g. ``MODEL.BIFPN.CHANNELS``) overrides its entry. -1 means "no
compound scaling": every size must then come from its key.
"""
from typing import Any, Dict

__all__ = ["EFFICIENTDET_SIZES", "efficientdet_size", "scaled_value"]

# D7 keeps D6's B6 backbone and widths, with a 1536 input and anchor scale 5 (effdet's
# tf_efficientdet_d7); D6 and D7 fuse by plain sums for training stability.
EFFICIENTDET_SIZES: Dict[int, Dict[str, Any]] = {
    0: dict(backbone="b0", image_size=512, bifpn_channels=64, bifpn_repeats=3, head_convs=3,
            anchor_scale=4.0, fusion="fast"),
    1: dict(backbone="b1", image_size=640, bifpn_channels=88, bifpn_repeats=4, head_convs=3,
            anchor_scale=4.0, fusion="fast"),
    2: dict(backbone="b2", image_size=768, bifpn_channels=112, bifpn_repeats=5, head_convs=3,
            anchor_scale=4.0, fusion="fast"),
    3: dict(backbone="b3", image_size=896, bifpn_channels=160, bifpn_repeats=6, head_convs=4,
            anchor_scale=4.0, fusion="fast"),
    4: dict(backbone="b4", image_size=1024, bifpn_channels=224, bifpn_repeats=7, head_convs=4,
            anchor_scale=4.0, fusion="fast"),
    5: dict(backbone="b5", image_size=1280, bifpn_channels=288, bifpn_repeats=7, head_convs=4,
            anchor_scale=4.0, fusion="fast"),
    6: dict(backbone="b6", image_size=1280, bifpn_channels=384, bifpn_repeats=8, head_convs=5,
            anchor_scale=4.0, fusion="sum"),
    7: dict(backbone="b6", image_size=1536, bifpn_channels=384, bifpn_repeats=8, head_convs=5,
            anchor_scale=5.0, fusion="sum"),
}


def efficientdet_size(coef: int, needed_by: str = "") -> Dict[str, Any]:
    """The D<coef> sizes; a one-line error for an unknown coefficient (or for -1, naming the key
    ``needed_by`` that has to be set explicitly instead)."""
    if coef == -1 and needed_by:
        raise ValueError(f"MODEL.EFFICIENTDET.COMPOUND_COEF=-1 (no compound scaling) needs "
                         f"{needed_by} to be set")
    if coef not in EFFICIENTDET_SIZES:
        raise ValueError(f"MODEL.EFFICIENTDET.COMPOUND_COEF={coef} is not a known compound "
                         f"coefficient; use 0..7 (EfficientDet-D0..D7) or -1 with explicit sizes")
    return EFFICIENTDET_SIZES[coef]


def scaled_value(explicit, coef: int, field: str, key: str):
    """``explicit`` when set (non-zero, non-empty), else the D<coef> value of ``field``."""
    if explicit not in (0, 0.0, "", None):
        return explicit
    return efficientdet_size(coef, key)[field]
