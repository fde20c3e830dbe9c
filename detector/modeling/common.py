"""Small helpers shared by backbones, necks and heads."""
from typing import Optional

from detector.layers import NormSpec

__all__ = ["norm_factory", "norm_options_from_config", "permute_to_N_HWA_K"]


def norm_factory(
    name: str, *, gn_groups: int = 32, bn_momentum: float = 0.1, bn_eps: float = 1e-5,
    evonorm_groups: int = 32, evonorm_eps: float = 1e-5, key: str = "norm",
) -> Optional[NormSpec]:
    """A ``channels -> norm layer`` factory for ``name`` (a :class:`detector.layers.NormSpec`,
    also accepted as ``norm`` by :class:`detector.layers.ConvNormAct`), or None when ``name``
    means "no norm". Validates the name now, so a bad ``key`` fails at build time with a one-line
    error listing the valid names."""
    spec = NormSpec("" if name is None else name, gn_groups=gn_groups, bn_momentum=bn_momentum,
                    bn_eps=bn_eps, evonorm_groups=evonorm_groups, evonorm_eps=evonorm_eps,
                    key=key)
    return None if spec.is_none else spec


def norm_options_from_config(cfg) -> dict:
    """The norm options shared by every part (``MODEL.GN``, ``MODEL.BN``, ``MODEL.EVONORM``), as
    the keyword arguments backbone, neck and head constructors take."""
    return {
        "gn_groups": cfg.MODEL.GN.NUM_GROUPS,
        "bn_momentum": cfg.MODEL.BN.MOMENTUM,
        "bn_eps": cfg.MODEL.BN.EPS,
        "evonorm_groups": cfg.MODEL.EVONORM.NUM_GROUPS,
        "evonorm_eps": cfg.MODEL.EVONORM.EPS,
    }


def permute_to_N_HWA_K(tensor, num_values: int):
    """(N, A*K, H, W) head output -> (N, H*W*A, K), the order anchors are generated in."""
    n, _, h, w = tensor.shape
    tensor = tensor.reshape(n, -1, num_values, h, w).permute(0, 3, 4, 1, 2)
    return tensor.reshape(n, -1, num_values)
