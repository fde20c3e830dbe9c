"""EfficientDet compound scaling (Tan et al. 2020, Table 1, as effdet's ``tf_efficientdet_d*``).

The one place that reads ``MODEL.EFFICIENTDET.COMPOUND_COEF``: :func:`resolve_efficientdet_sizes`
fills every size left unset (0 or "") in the backbone, BiFPN, head and anchor sections from the
D<k> row below, so each part then reads only its own section. -1 means "no compound scaling":
every size must then be set explicitly.
"""
from typing import Any, Dict

__all__ = ["EFFICIENTDET_SIZES", "efficientdet_size", "resolve_efficientdet_sizes"]

# D7 keeps D6's B6 backbone and widths, with anchor scale 5 (effdet's tf_efficientdet_d7);
# D6 and D7 fuse by plain sums for training stability.
EFFICIENTDET_SIZES: Dict[int, Dict[str, Any]] = {
    0: dict(backbone="b0", bifpn_channels=64, bifpn_repeats=3, head_convs=3, anchor_scale=4.0,
            fusion="fast"),
    1: dict(backbone="b1", bifpn_channels=88, bifpn_repeats=4, head_convs=3, anchor_scale=4.0,
            fusion="fast"),
    2: dict(backbone="b2", bifpn_channels=112, bifpn_repeats=5, head_convs=3, anchor_scale=4.0,
            fusion="fast"),
    3: dict(backbone="b3", bifpn_channels=160, bifpn_repeats=6, head_convs=4, anchor_scale=4.0,
            fusion="fast"),
    4: dict(backbone="b4", bifpn_channels=224, bifpn_repeats=7, head_convs=4, anchor_scale=4.0,
            fusion="fast"),
    5: dict(backbone="b5", bifpn_channels=288, bifpn_repeats=7, head_convs=4, anchor_scale=4.0,
            fusion="fast"),
    6: dict(backbone="b6", bifpn_channels=384, bifpn_repeats=8, head_convs=5, anchor_scale=4.0,
            fusion="sum"),
    7: dict(backbone="b6", bifpn_channels=384, bifpn_repeats=8, head_convs=5, anchor_scale=5.0,
            fusion="sum"),
}

# config key -> column of the size table
_SIZE_KEYS = {
    "MODEL.EFFICIENTNET.VARIANT": "backbone",
    "MODEL.BIFPN.CHANNELS": "bifpn_channels",
    "MODEL.BIFPN.NUM_REPEATS": "bifpn_repeats",
    "MODEL.BIFPN.FUSION": "fusion",
    "MODEL.EFFICIENTDET.NUM_HEAD_CONVS": "head_convs",
    "MODEL.EFFICIENTDET.ANCHOR_SCALE": "anchor_scale",
}
# parts that take the family-wide padding when their own key is ""
_PADDING_KEYS = ("MODEL.EFFICIENTNET.PADDING", "MODEL.BIFPN.PADDING")


def efficientdet_size(coef: int) -> Dict[str, Any]:
    """The D<coef> sizes; a one-line error for an unknown coefficient."""
    if coef not in EFFICIENTDET_SIZES:
        raise ValueError(f"MODEL.EFFICIENTDET.COMPOUND_COEF={coef} is not a known compound "
                         f"coefficient; use 0..7 (EfficientDet-D0..D7) or -1 with explicit sizes")
    return EFFICIENTDET_SIZES[coef]


def _node_and_leaf(cfg, key: str):
    *path, leaf = key.split(".")
    node = cfg
    for name in path:
        node = getattr(node, name)
    return node, leaf


def resolve_efficientdet_sizes(cfg):
    """A copy of ``cfg`` in which every unset size key (0 or "") takes its value from
    ``MODEL.EFFICIENTDET.COMPOUND_COEF`` and the backbone's and BiFPN's empty ``PADDING`` take
    ``MODEL.EFFICIENTDET.PADDING``. Keys set explicitly win. With COMPOUND_COEF -1 an unset size
    is a one-line error naming its key."""
    coef = cfg.MODEL.EFFICIENTDET.COMPOUND_COEF
    sizes = efficientdet_size(coef) if coef != -1 else None
    resolved = cfg.clone()
    resolved.defrost()
    for key, column in _SIZE_KEYS.items():
        node, leaf = _node_and_leaf(resolved, key)
        if getattr(node, leaf) not in (0, 0.0, "", None):
            continue
        if sizes is None:
            raise ValueError(f"MODEL.EFFICIENTDET.COMPOUND_COEF=-1 (no compound scaling) needs "
                             f"{key} to be set")
        setattr(node, leaf, sizes[column])
    for key in _PADDING_KEYS:
        node, leaf = _node_and_leaf(resolved, key)
        if not getattr(node, leaf):
            setattr(node, leaf, cfg.MODEL.EFFICIENTDET.PADDING)
    resolved.freeze()
    return resolved
