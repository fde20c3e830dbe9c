"""Dense heads: per-location class and box predictors over a feature pyramid."""
from .build import DENSE_HEAD_REGISTRY, build_dense_head, permute_to_N_HWA_K

# imported for their registrations
from .retinanet import RetinaNetHead  # noqa: E402
from .efficientdet import EfficientDetHead  # noqa: E402
from .rpn import StandardRPNHead  # noqa: E402

__all__ = ["DENSE_HEAD_REGISTRY", "build_dense_head", "permute_to_N_HWA_K", "RetinaNetHead",
           "EfficientDetHead", "StandardRPNHead"]
