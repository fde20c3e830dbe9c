from .build import NORM_REGISTRY, WEIGHT_NORMS, NormSpec, available_norms, get_norm
from .conv import ConvNormAct, ConvNormActLayers, as_norm_spec, conv_norm_act
from .cpu_kernels import kernel_cache_dir, kernels_enabled, load_kernel
from .depthwise_conv import (
    DepthwiseConv2d,
    depthwise_conv2d,
    depthwise_weight_grad,
    split_depthwise_weight_gradients,
)
from .fused_conv import (
    fold_norm_into_conv,
    foldable,
    fused_conv_norm_act,
    fusion_enabled,
    conv_norm_fusion,
    register_frozen_norm,
)
from .fusion import FUSION_METHODS, NormalizedFusion
from .nms import batched_nms
from .norm import (
    EvoNormB0,
    EvoNormS0,
    FrozenBatchNorm2d,
    SyncBatchNorm2d,
    batch_norm_momentum_step,
    convert_frozen_batchnorm,
    convert_sync_batchnorm,
    has_batch_statistics,
    replace_modules,
)
from .pointwise_norm_act import (
    POINTWISE_ACTIVATIONS,
    ReusableBuffers,
    batch_norm_act,
    pointwise_conv_norm_act,
    pointwise_conv_norm_act_applies,
)
from .same_padding import (
    PADDING_MODES,
    MaxPool2dPadded,
    check_padding_mode,
    conv2d_padded,
    same_padding_amounts,
)
from .separable import (
    ACTIVATIONS,
    SeparableConv2d,
    SeparableConvNormAct,
    check_layer_norm,
    glorot_uniform_,
    make_activation,
    variance_scaling_,
)
from .shape_spec import ShapeSpec
from .squeeze_excite import squeeze_excite, squeeze_excite_applies
from .winograd_conv import conv_forward, winograd_applies, winograd_conv3x3, winograd_convolution

__all__ = [
    "NORM_REGISTRY", "WEIGHT_NORMS", "NormSpec", "available_norms", "get_norm",
    "ConvNormAct", "ConvNormActLayers", "as_norm_spec", "conv_norm_act",
    "kernel_cache_dir", "kernels_enabled", "load_kernel",
    "DepthwiseConv2d", "depthwise_conv2d", "depthwise_weight_grad",
    "split_depthwise_weight_gradients",
    "FUSION_METHODS", "NormalizedFusion", "fold_norm_into_conv", "foldable", "fused_conv_norm_act",
    "fusion_enabled", "conv_norm_fusion", "register_frozen_norm",
    "batched_nms", "EvoNormB0", "EvoNormS0", "FrozenBatchNorm2d", "SyncBatchNorm2d",
    "batch_norm_momentum_step",
    "convert_frozen_batchnorm", "convert_sync_batchnorm", "has_batch_statistics",
    "replace_modules", "POINTWISE_ACTIVATIONS", "ReusableBuffers", "batch_norm_act",
    "pointwise_conv_norm_act",
    "pointwise_conv_norm_act_applies", "PADDING_MODES", "MaxPool2dPadded", "check_padding_mode",
    "conv2d_padded",
    "same_padding_amounts",
    "ACTIVATIONS", "SeparableConv2d", "SeparableConvNormAct", "check_layer_norm",
    "glorot_uniform_", "make_activation",
    "variance_scaling_", "ShapeSpec", "squeeze_excite", "squeeze_excite_applies",
    "conv_forward", "winograd_applies", "winograd_conv3x3", "winograd_convolution",
]
