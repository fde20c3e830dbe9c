"""EfficientNet-B0..B7 backbone from timm (``features_only``), returning ``c2``..``c5``.

Padding "same" builds timm's ``tf_efficientnet_b<k>`` (TensorFlow SAME padding, what the original
EfficientDet weights need); "symmetric" builds ``efficientnet_b<k>`` (PyTorch padding, faster).
Both have the same parameters, so weights move between them. Parameter names are timm's under
``body.``, e.g. ``body.conv_stem.weight``, ``body.blocks.2.0.conv_pw.weight``.

Inside :func:`detector.layers.conv_norm_fusion` (``MODEL.FUSE_CONV_NORM``), a network whose norms
are fixed (eval mode, or FrozenBN) runs its blocks with each conv + norm + activation (+ the
residual add) folded into one convolution (:func:`detector.layers.fused_conv_norm_act`): timm's
own forward runs them as three to four passes over every feature map.

In training on CPU (fp32, channels-last, plain BN), each BN + activation, with the 1x1 conv before
it, writes into maps kept between steps (:func:`detector.layers.pointwise_conv_norm_act`): fresh
large maps cost a page fault per 4 KB on every step. Squeeze-excite runs with a hand-written
backward (:func:`detector.layers.squeeze_excite`), and the strided 5x5 depthwise convs take the
split weight gradient of :func:`detector.layers.depthwise_conv2d`.
"""
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import timm
import torch
from timm.layers import (
    BatchNormAct2d,
    Conv2dSame,
    FrozenBatchNormAct2d,
    SyncBatchNormAct,
    convert_sync_batchnorm,
    pad_same,
)
from timm.models._efficientnet_blocks import (
    DepthwiseSeparableConv,
    InvertedResidual,
    SqueezeExcite,
)
from torch import nn

from detector.layers import (
    DepthwiseConv2d,
    NormSpec,
    ReusableBuffers,
    as_norm_spec,
    batch_norm_act,
    check_padding_mode,
    depthwise_conv2d,
    foldable,
    fused_conv_norm_act,
    fusion_enabled,
    pointwise_conv_norm_act_applies,
    register_frozen_norm,
    replace_modules,
    same_padding_amounts,
    split_depthwise_weight_gradients,
    squeeze_excite,
    squeeze_excite_applies,
)

from .base import Backbone, check_out_features
from .build import BACKBONE_REGISTRY

__all__ = ["EfficientNetBackbone", "EfficientNet", "EFFICIENTNET_VARIANTS"]

EFFICIENTNET_VARIANTS = tuple(f"b{k}" for k in range(8))
# timm feature index of each level: index i has stride 2**(i+1)
_FEATURE_INDEX = {1: 0, 2: 1, 3: 2, 4: 3, 5: 4}
BACKBONE_NORMS = ("BN", "FrozenBN", "SyncBN")
# norms of each timm block type that _fused_block folds
_BLOCK_NORMS = {DepthwiseSeparableConv: ("bn1", "bn2"), InvertedResidual: ("bn1", "bn2", "bn3")}

register_frozen_norm(FrozenBatchNormAct2d)


def _frozen_bn_act(module: nn.Module) -> nn.Module:
    if not isinstance(module, (BatchNormAct2d, SyncBatchNormAct)):
        return module
    frozen = FrozenBatchNormAct2d(module.num_features, eps=module.eps)
    with torch.no_grad():
        frozen.weight.copy_(module.weight)
        frozen.bias.copy_(module.bias)
        frozen.running_mean.copy_(module.running_mean)
        frozen.running_var.copy_(module.running_var)
    frozen.act, frozen.drop = module.act, module.drop
    return frozen


def freeze_batch_norm_act(module: nn.Module) -> nn.Module:
    """``module`` with every timm ``BatchNormAct2d`` / ``SyncBatchNormAct`` replaced by a
    ``FrozenBatchNormAct2d`` holding the same statistics, affine parameters, eps and activation
    (timm's own helper drops eps)."""
    return replace_modules(module, _frozen_bn_act)


def _norm_act_foldable(norm: nn.Module) -> bool:
    """A timm norm-activation layer that is a fixed affine map followed by its activation."""
    return isinstance(getattr(norm, "drop", None), nn.Identity) and foldable(norm, norm.act)


def _block_foldable(block: nn.Module) -> bool:
    """Whether :func:`_fused_block` reproduces ``block``: a timm MBConv / depthwise-separable
    block without space-to-depth or anti-aliasing, all of whose norms are fixed."""
    norms = _BLOCK_NORMS.get(type(block))
    return (norms is not None and getattr(block, "conv_s2d", None) is None
            and isinstance(block.aa, nn.Identity)
            and all(_norm_act_foldable(getattr(block, n)) for n in norms))


def _conv_norm_act(x: torch.Tensor, conv: nn.Conv2d, norm: nn.Module,
                   residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``norm(conv(x)) (+ residual)`` for a timm conv and norm-activation layer (the residual only
    after a norm without activation), folded into one conv where it applies, else eager."""
    conv_input = x
    if isinstance(conv, Conv2dSame):
        conv_input = pad_same(x, conv.kernel_size, conv.stride, conv.dilation)
    y = fused_conv_norm_act(conv_input, conv, norm, norm.act, residual,
                            padded_input=isinstance(conv, Conv2dSame))
    if y is None:
        y = norm(conv(x))
        if residual is not None:
            y = y + residual
    return y


def _squeeze_excite(se: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """timm's ``SqueezeExcite`` with its two 1x1 convs on the pooled (N, C) vector run as linear
    layers: as convs on a 1x1 map they take PyTorch's slow im2col path. In CPU training, with
    SiLU and a sigmoid gate, :func:`detector.layers.squeeze_excite` (hand-written backward)."""
    if type(se) is not SqueezeExcite:
        return se(x)
    if (squeeze_excite_applies(x) and type(se.act1) is nn.SiLU
            and type(se.gate) is nn.Sigmoid):
        return squeeze_excite(x, se.conv_reduce.weight.flatten(1), se.conv_reduce.bias,
                              se.conv_expand.weight.flatten(1), se.conv_expand.bias)
    pooled = x.mean((2, 3))
    pooled = se.act1(nn.functional.linear(pooled, se.conv_reduce.weight.flatten(1),
                                          se.conv_reduce.bias))
    pooled = nn.functional.linear(pooled, se.conv_expand.weight.flatten(1), se.conv_expand.bias)
    return x * se.gate(pooled)[:, :, None, None]


def _fused_block(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """timm's ``DepthwiseSeparableConv`` / ``InvertedResidual`` forward (checked by
    :func:`_block_foldable`) with folded convs; the residual add joins the last conv unless drop
    path is active (training)."""
    shortcut = x
    drop_path_active = block.training and not isinstance(block.drop_path, nn.Identity)
    if isinstance(block, InvertedResidual):
        x = _conv_norm_act(x, block.conv_pw, block.bn1)
        x = _conv_norm_act(x, block.conv_dw, block.bn2)
        last_conv, last_norm = block.conv_pwl, block.bn3
    else:
        x = _conv_norm_act(x, block.conv_dw, block.bn1)
        last_conv, last_norm = block.conv_pw, block.bn2
    x = _squeeze_excite(block.se, x)
    # timm adds the shortcut after the last norm's activation; fused only when it has none
    fuse_residual = (block.has_skip and not drop_path_active
                     and isinstance(last_norm.act, nn.Identity))
    x = _conv_norm_act(x, last_conv, last_norm, shortcut if fuse_residual else None)
    if block.has_skip and not fuse_residual:
        x = block.drop_path(x) + shortcut
    return x


def _norm_act_pooled(norm: nn.Module, x: torch.Tensor, conv: Optional[nn.Module] = None) -> bool:
    """Whether ``norm(conv(x))`` (``conv`` a 1x1 conv or None) can run through
    :func:`detector.layers.pointwise_conv_norm_act`: a plain training-mode timm BatchNorm (not
    SyncBN) with running statistics and a supported activation."""
    return (type(norm) is BatchNormAct2d and isinstance(norm.drop, nn.Identity)
            and norm.track_running_stats
            and pointwise_conv_norm_act_applies(x, conv, norm, norm.act))


def _norm_act(norm: nn.Module, x: torch.Tensor, buffers: Optional[ReusableBuffers], key: str,
              conv: Optional[nn.Module] = None) -> torch.Tensor:
    """``norm(conv(x))``, through pooled maps where it can (never without ``buffers``)."""
    if buffers is not None and _norm_act_pooled(norm, x, conv):
        return batch_norm_act(x, norm, norm.act, conv=conv, buffers=buffers, key=key)
    return norm(x if conv is None else conv(x))


def _prepadding(conv: nn.Module, x: torch.Tensor) -> Optional[Tuple[int, int, int, int]]:
    """(top, bottom, left, right) zero padding of ``conv``'s input that lets it run unpadded: for
    a depthwise conv padding TF-"same" in its forward (Conv2dSame) or statically with a split
    weight gradient (DepthwiseConv2d); None for other convs."""
    if not (isinstance(conv, nn.Conv2d) and conv.groups == conv.in_channels == conv.out_channels
            and conv.dilation == (1, 1)):
        return None
    if isinstance(conv, Conv2dSame):
        (top, bottom), (left, right) = (
            same_padding_amounts(int(size), k, stride)
            for size, k, stride in zip(x.shape[-2:], conv.kernel_size, conv.stride))
        return top, bottom, left, right
    if isinstance(conv, DepthwiseConv2d):
        (pad_h, pad_w) = conv.padding
        return pad_h, pad_h, pad_w, pad_w
    return None


def _train_block(block: nn.Module, x: torch.Tensor, buffers: Optional[ReusableBuffers],
                 key: str) -> torch.Tensor:
    """timm's ``InvertedResidual`` / ``DepthwiseSeparableConv`` forward (without space-to-depth)
    with each BN + activation written into ``buffers``' maps where :func:`_norm_act_pooled`
    allows (nowhere when None); an MBConv expansion joins its 1x1 conv and is padded there for
    its depthwise conv when :func:`_prepadding` says so."""
    shortcut = x
    conv_dw = block.conv_dw
    if isinstance(block, InvertedResidual):
        padding = _prepadding(conv_dw, x)
        if (padding is not None and buffers is not None
                and _norm_act_pooled(block.bn1, x, block.conv_pw)):
            x = batch_norm_act(x, block.bn1, block.bn1.act, conv=block.conv_pw, buffers=buffers,
                               key=key + ".bn1", padding=padding)
            # the map is padded already: Conv2dSame would pad in its forward, and the split
            # weight gradient of a 5x5 depthwise conv would pad its input again
            x = depthwise_conv2d(x, conv_dw.weight, conv_dw.bias, conv_dw.stride)
        else:
            x = conv_dw(_norm_act(block.bn1, x, buffers, key + ".bn1", block.conv_pw))
        x = _norm_act(block.bn2, x, buffers, key + ".bn2")
        last_conv, last_norm, last_norm_name = block.conv_pwl, block.bn3, "bn3"
    else:
        x = _norm_act(block.bn1, conv_dw(x), buffers, key + ".bn1")
        last_conv, last_norm, last_norm_name = block.conv_pw, block.bn2, "bn2"
    x = _squeeze_excite(block.se, block.aa(x))
    x = _norm_act(last_norm, x, buffers, f"{key}.{last_norm_name}", last_conv)
    if block.has_skip:
        x = block.drop_path(x) + shortcut
    return x


class EfficientNetBackbone(Backbone):
    """Args:
        variant: "b0".."b7".
        padding_mode: "same" (TF variant) or "symmetric".
        out_features: subset of ``c1``..``c5``.
        drop_path_rate: stochastic depth (drop connect) rate of the MBConv blocks, linearly
            increasing with depth as in timm.
        reuse_training_maps: in fp32 CPU training, keep the BN + activation maps between steps
            (:func:`detector.layers.pointwise_conv_norm_act`): faster, more peak memory.
        norm: a :class:`detector.layers.NormSpec` (or name) of "BN", "SyncBN" or "FrozenBN"
            (statistics and affine parameters fixed); its ``bn_momentum`` and ``bn_eps`` go to
            timm's BatchNorms (EfficientDet: 0.01 and 1e-3).
        freeze_at: 0 trains everything, 1 freezes the stem, k > 1 also the blocks up to ``c<k>``.
    """

    def __init__(self, *, variant: str = "b0", padding_mode: str = "same",
                 out_features: Sequence[str] = ("c3", "c4", "c5"), drop_path_rate: float = 0.2,
                 reuse_training_maps: bool = True, norm="BN", freeze_at: int = 0,
                 in_channels: int = 3):
        super().__init__()

        if variant not in EFFICIENTNET_VARIANTS:
            raise ValueError(f"MODEL.EFFICIENTNET.VARIANT='{variant}' is not one of "
                             f"{EFFICIENTNET_VARIANTS}")
        check_padding_mode(padding_mode, "MODEL.EFFICIENTNET.PADDING")
        norm = as_norm_spec(norm, "MODEL.BACKBONE.NORM")
        if norm.name not in BACKBONE_NORMS:
            raise ValueError(f"{norm.key}='{norm.name}' is not supported by the EfficientNet "
                             f"backbone; choose from {BACKBONE_NORMS}")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"MODEL.EFFICIENTNET.DROP_PATH_RATE={drop_path_rate} must be in "
                             "[0, 1)")
        if not 0 <= freeze_at <= 5:
            raise ValueError(f"MODEL.BACKBONE.FREEZE_AT={freeze_at} must be in [0, 5]")
        self.out_features = check_out_features(out_features, [f"c{k}" for k in range(1, 6)])
        self.variant, self.padding_mode = variant, padding_mode
        levels = [int(f[1:]) for f in self.out_features]
        name = ("tf_" if padding_mode == "same" else "") + f"efficientnet_{variant}"
        self.body = timm.create_model(
            name, pretrained=False, features_only=True, in_chans=in_channels,
            out_indices=tuple(_FEATURE_INDEX[k] for k in levels), drop_path_rate=drop_path_rate,
            bn_momentum=norm.bn_momentum, bn_eps=norm.bn_eps,
            pad_type="same" if padding_mode == "same" else "")
        for level, info in zip(levels, self.body.feature_info.get_dicts()):
            if info["reduction"] != 2 ** level:
                raise RuntimeError(f"timm {name} feature {info} does not have stride {2 ** level}")
            self._out_feature_channels[f"c{level}"] = int(info["num_chs"])
            self._out_feature_strides[f"c{level}"] = 2 ** level
        # faster CPU weight gradients of the 5x5 depthwise convs
        self.body = split_depthwise_weight_gradients(self.body)
        if norm.name == "SyncBN":
            self.body = convert_sync_batchnorm(self.body)
        self._freeze(freeze_at, all_frozen_bn=norm.name == "FrozenBN")
        # timm's SiLUs are in place; autograd then copies each one's input to keep it for the
        # gradient, an extra pass over every feature map in training
        for module in self.body.modules():
            if isinstance(module, nn.SiLU):
                module.inplace = False
        # BN + activation maps kept between training steps (see _train_block)
        self._train_buffers = ReusableBuffers() if reuse_training_maps else None

    def _freeze(self, freeze_at: int, all_frozen_bn: bool) -> None:
        frozen: List[nn.Module] = []
        if freeze_at >= 1:
            frozen += [self.body.conv_stem, self.body.bn1]
        if freeze_at >= 2:
            # last block of each level in timm's B-series: c1 blocks.0, c2 .1, c3 .2, c4 .4, c5 .6
            last_block = {2: 1, 3: 2, 4: 4, 5: 6}[freeze_at]
            frozen += [self.body.blocks[i] for i in range(last_block + 1)]
        for module in frozen:
            for p in module.parameters():
                p.requires_grad_(False)
        if all_frozen_bn:
            self.body = freeze_batch_norm_act(self.body)
        else:
            for name in ("conv_stem", "bn1"):
                if getattr(self.body, name) in frozen:
                    setattr(self.body, name, freeze_batch_norm_act(getattr(self.body, name)))
            for i, block in enumerate(self.body.blocks):
                if block in frozen:
                    self.body.blocks[i] = freeze_batch_norm_act(block)

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        if self.body.feature_hooks is None and not self.body.grad_checkpointing:
            if fusion_enabled() and _norm_act_foldable(self.body.bn1):
                return dict(zip(self.out_features, self._forward_folded(x)))
            if self.training and torch.is_grad_enabled():
                return dict(zip(self.out_features, self._forward_training(x)))
        return dict(zip(self.out_features, self.body(x)))

    def train(self, mode: bool = True) -> "EfficientNetBackbone":
        if not mode and self._train_buffers is not None:
            self._train_buffers.clear()
        return super().train(mode)

    def _forward_stages(self, x: torch.Tensor, stem: Callable[[torch.Tensor], torch.Tensor],
                        run_block: Callable[[nn.Module, torch.Tensor, str], torch.Tensor]
                        ) -> List[torch.Tensor]:
        """timm's ``EfficientNetFeatures.forward`` with its stem (conv + norm) run by ``stem``
        and each block by ``run_block(block, x, name)``."""
        body = self.body
        x = stem(x)
        features = [x] if 0 in body._stage_out_idx else []
        for i, stage in enumerate(body.blocks):
            for j, block in enumerate(stage):
                x = run_block(block, x, f"blocks.{i}.{j}")
            if i + 1 in body._stage_out_idx:
                features.append(x)
        return features

    def _forward_training(self, x: torch.Tensor) -> List[torch.Tensor]:
        """Training with the BN + activation layers written into maps reused between steps
        (:func:`_train_block`; timm's own forward for other block types)."""
        buffers, body = self._train_buffers, self.body

        def run_block(block: nn.Module, x: torch.Tensor, name: str) -> torch.Tensor:
            if type(block) in _BLOCK_NORMS and getattr(block, "conv_s2d", None) is None:
                return _train_block(block, x, buffers, name)
            return block(x)

        return self._forward_stages(
            x, lambda x: _norm_act(body.bn1, body.conv_stem(x), buffers, "bn1"), run_block)

    def _forward_folded(self, x: torch.Tensor) -> List[torch.Tensor]:
        """Every block whose norms are fixed run by :func:`_fused_block` (the others by timm)."""
        body = self.body
        return self._forward_stages(
            x, lambda x: _conv_norm_act(x, body.conv_stem, body.bn1),
            lambda block, x, name: _fused_block(block, x) if _block_foldable(block) else block(x))

    @classmethod
    def from_config(cls, cfg) -> dict:
        e = cfg.MODEL.EFFICIENTNET
        if not e.VARIANT:
            raise ValueError("MODEL.EFFICIENTNET.VARIANT is empty: set b0..b7 (EfficientDet sets "
                             "it from MODEL.EFFICIENTDET.COMPOUND_COEF)")
        return {
            "variant": e.VARIANT,
            "padding_mode": e.PADDING or "same",
            "out_features": list(cfg.MODEL.BACKBONE.OUT_FEATURES),
            "drop_path_rate": e.DROP_PATH_RATE,
            "reuse_training_maps": e.REUSE_TRAINING_MAPS,
            "norm": NormSpec.from_config(cfg, cfg.MODEL.BACKBONE.NORM, key="MODEL.BACKBONE.NORM"),
            "freeze_at": cfg.MODEL.BACKBONE.FREEZE_AT,
            "in_channels": len(cfg.MODEL.PIXEL_MEAN),
        }


@BACKBONE_REGISTRY.register()
def EfficientNet(cfg) -> EfficientNetBackbone:
    """EfficientNet backbone from ``MODEL.EFFICIENTNET`` and ``MODEL.BACKBONE``."""
    return EfficientNetBackbone(**EfficientNetBackbone.from_config(cfg))
