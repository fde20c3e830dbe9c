from dataclasses import dataclass

__all__ = ["ShapeSpec"]


@dataclass(frozen=True)
class ShapeSpec:
    """Channels and stride of a feature map, used to wire modules without running them."""

    channels: int
    stride: int
