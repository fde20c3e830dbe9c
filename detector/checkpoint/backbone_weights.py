"""Start a backbone from ImageNet weights (``MODEL.BACKBONE.WEIGHTS``).

Accepted files, recognised by their extension and contents:

- ``.pth`` / ``.pt`` / ``.bin``: a torchvision ResNet (``conv1``, ``bn1``, ``layer1.0.conv1``,
  ``downsample.0/1``, ``fc``) or timm EfficientNet (``conv_stem``, ``bn1``, ``blocks.*``,
  ``conv_head``, ``bn2``, ``classifier``) or torchvision MobileNetV3 (``features.*``,
  ``classifier.0/3``) state dict, read with ``torch.load(weights_only=True)``.
  A ``{"model": ...}`` / ``{"state_dict": ...}`` wrapper and a DDP ``module.`` prefix are removed.
- ``.safetensors``: the same names (timm's hub files), read with the ``safetensors`` package.
- ``.pkl``: detectron2's model-zoo format ``{"model": {name: ndarray}, "__author__": ...}``
  (``stem.conv1.weight``, ``stem.conv1.norm.*``, ``res2.0.conv1.weight``, ``res2.0.shortcut.*``)
  or the Caffe2 / Detectron format of the MSRA ImageNet files such as ``R-50.pkl``
  (``conv1_w``, ``res_conv1_bn_s``, ``res2_0_branch2a_w``, ``res2_0_branch1_bn_b``, optionally
  under ``"blobs"``). Pickles are read by an unpickler that only builds numpy arrays and
  containers: any other global is refused, so nothing in the file is ever executed.

Names are converted to torchvision's (ResNet) or timm's (EfficientNet) and matched against the
backbone's own: our ResNet and MobileNetV3 use torchvision's names, the EfficientNet backbone
holds timm's model as ``body``. Classifier tensors (``fc``, ``classifier``, ``conv_head``,
``bn2``) are dropped.
Norm tensors of a file's BatchNorm only go into BatchNorm-like layers of ours (BN, SyncBN,
FrozenBN); Caffe2's affine-only norms get mean 0 and a variance that makes the layer the file's
affine map. A shape mismatch is an error; missing and unused tensors are reported.

Input conventions differ: torchvision and timm weights expect RGB, ImageNet mean/std
(``MODEL.PIXEL_MEAN [123.675, 116.28, 103.53]``, ``PIXEL_STD [58.395, 57.12, 57.375]``);
the MSRA (Caffe) files expect BGR, ``PIXEL_MEAN [103.530, 116.280, 123.675]``,
``PIXEL_STD [1.0, 1.0, 1.0]``, and a ResNet that strides in the first 1x1 conv of a block
(``MODEL.RESNETS.STRIDE_IN_1X1 True``; torchvision strides in the 3x3 conv). A mismatch is logged
as a warning.
"""
import codecs
import logging
import os
import pickle
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .checkpointer import CheckpointError, load_checkpoint_file
from .conversion import short_list

__all__ = [
    "BackboneWeightsError", "BackboneWeightsReport", "read_backbone_weights",
    "load_backbone_weights", "load_backbone_weights_from_config", "resolve_pretrained_path",
    "read_numpy_pickle", "PRETRAINED_ENV",
]

logger = logging.getLogger(__name__)

# folder in which relative MODEL.BACKBONE.WEIGHTS names are looked up (default ./pretrained)
PRETRAINED_ENV = "DETECTOR_PRETRAINED"
_DEFAULT_PRETRAINED_DIR = "pretrained"

# the input normalisation each kind of file was trained with (0-255 scale)
_RGB_IMAGENET = ("RGB", (123.675, 116.28, 103.53), (58.395, 57.12, 57.375))
_BGR_CAFFE = ("BGR", (103.530, 116.280, 123.675), (1.0, 1.0, 1.0))

_NORM_BUFFERS = ("running_mean", "running_var")


class BackboneWeightsError(CheckpointError):
    """A pretrained backbone file that cannot or must not be loaded; the message names it."""


@dataclass
class BackboneWeightsReport:
    """What :func:`load_backbone_weights` did, by our backbone's parameter names (file names for
    ``unused`` and ``dropped``)."""

    path: str
    source: str  # "pytorch" (torchvision/timm names), "detectron2" or "caffe2"
    author: str = ""
    loaded: List[str] = field(default_factory=list)
    missing: List[str] = field(default_factory=list)
    unused: List[str] = field(default_factory=list)
    dropped: List[str] = field(default_factory=list)
    filled: List[str] = field(default_factory=list)
    other_norms: List[str] = field(default_factory=list)

    @property
    def caffe_style(self) -> bool:
        """True for MSRA/Caffe weights: BGR, caffe mean, std 1, stride in the 1x1 conv."""
        return self.source == "caffe2" or (self.source == "detectron2"
                                           and self.author.lower() != "torchvision")

    def summary(self) -> str:
        """One line: counts and the first names of each list."""
        parts = [f"loaded {len(self.loaded)} tensors from {self.path} ({self.source} names)"]
        if self.filled:
            parts.append(f"mean 0 / unit variance set for {len(self.filled)} affine-only norm "
                         f"buffers: {short_list(self.filled, 4)}")
        parts.append(f"missing in file: [{short_list(self.missing, 8)}]")
        parts.append(f"unused in file: [{short_list(self.unused, 8)}]")
        if self.other_norms:
            parts.append(f"file BatchNorms kept out of our non-BatchNorm layers: "
                         f"[{short_list(self.other_norms, 6)}]")
        if self.dropped:
            parts.append(f"classifier dropped: [{short_list(self.dropped, 4)}]")
        return "; ".join(parts)


# ------------------------------------------------------------------------------------ reading
def _numpy_globals() -> Dict[Tuple[str, str], Any]:
    import numpy as np

    core = getattr(np, "_core", None) or np.core  # numpy 2 renamed numpy.core to numpy._core
    reconstruct, scalar = core.multiarray._reconstruct, core.multiarray.scalar
    allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
               ("collections", "OrderedDict"): OrderedDict,
               # protocol-2 pickles written by Python 3 rebuild byte strings with it
               ("_codecs", "encode"): codecs.encode}
    # pickles name the module numpy had when they were written: numpy.core (< 2) or numpy._core
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(module, "_reconstruct")] = reconstruct
        allowed[(module, "scalar")] = scalar
    return allowed


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Builds numpy arrays, dicts, lists, strings and numbers, and refuses every other global
    (the only way a pickle runs code is by calling a global it names)."""

    def __init__(self, file, path: str):
        # latin1 reads the byte strings of numpy arrays pickled by Python 2
        super().__init__(file, encoding="latin1")
        self._path = path
        self._allowed = _numpy_globals()

    def find_class(self, module: str, name: str):
        obj = self._allowed.get((module, name))
        if obj is None:
            raise BackboneWeightsError(
                f"Refusing to load {self._path}: it names the global '{module}.{name}'; only "
                "numpy arrays and containers are accepted (nothing in the file was executed)")
        return obj

    def persistent_load(self, pid):
        raise BackboneWeightsError(f"Refusing to load {self._path}: it uses pickle persistent "
                                   "ids, which only numpy arrays and containers never need")


def read_numpy_pickle(path: str) -> Any:
    """Unpickle ``path`` allowing only numpy arrays and plain containers (Python 2 or 3 pickles).

    Raises:
        BackboneWeightsError: a refused global, or a corrupt/truncated file (one line, naming it).
    """
    with open(path, "rb") as f:
        try:
            return _NumpyOnlyUnpickler(f, path).load()
        except BackboneWeightsError:
            raise
        except Exception as err:  # UnpicklingError, EOFError, ValueError, ...
            detail = " ".join(str(err).split()) or type(err).__name__
            raise BackboneWeightsError(f"Cannot read {path} (corrupt or truncated pickle?): "
                                       f"{type(err).__name__}: {detail}") from None


def _as_tensor(value: Any, name: str, path: str) -> Optional[torch.Tensor]:
    """A tensor for an array/tensor entry; None for entries that are not arrays."""
    import numpy as np

    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "biuf":
            raise BackboneWeightsError(f"{path}: entry '{name}' has dtype {value.dtype}, not a "
                                       "number array")
        return torch.from_numpy(np.array(value, copy=True))
    return None


def _unwrap(obj: Any, path: str) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """(name -> value of the weights, the wrapper's other entries)."""
    if not isinstance(obj, dict):
        raise BackboneWeightsError(f"{path} holds a {type(obj).__name__}, not a dict of weights")
    for key in ("model", "state_dict", "blobs"):
        if isinstance(obj.get(key), dict):
            return dict(obj[key]), {k: v for k, v in obj.items() if k != key}
    return dict(obj), {}


def read_backbone_weights(path: str) -> Tuple[Dict[str, torch.Tensor], str, str, List[str]]:
    """Read a pretrained file into tensors with the file's own names.

    Returns:
        (name -> tensor, source, author, names of entries that are not arrays), source being
        "pytorch", "detectron2" or "caffe2".
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Pretrained backbone file not found: {path}")
    ext = os.path.splitext(path)[1].lower()
    author = ""
    if ext == ".pkl":
        data = read_numpy_pickle(path)
        weights, rest = _unwrap(data, path)
        is_detectron2 = isinstance(data, dict) and isinstance(data.get("model"), dict)
        source = "detectron2" if is_detectron2 else "caffe2"
        author = str(rest.get("__author__", "Caffe2" if source == "caffe2" else ""))
    elif ext == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise BackboneWeightsError(f"Reading {path} needs the 'safetensors' package "
                                       "(pip install safetensors)") from None
        try:
            weights, source = dict(load_file(path, device="cpu")), "pytorch"
        except Exception as err:
            raise BackboneWeightsError(f"Cannot read {path}: {type(err).__name__}: "
                                       f"{' '.join(str(err).split())}") from None
    else:
        try:
            weights = _unwrap(load_checkpoint_file(path), path)[0]
        except CheckpointError as err:
            raise BackboneWeightsError(str(err)) from None
        source = "pytorch"
    tensors, not_arrays = {}, []
    for name, value in weights.items():
        tensor = _as_tensor(value, str(name), path)
        if tensor is None:
            not_arrays.append(str(name))
        else:
            tensors[str(name)] = tensor
    if tensors and all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module."):]: v for k, v in tensors.items()}
    return tensors, source, author, not_arrays


# ---------------------------------------------------------------------------- name conversion
_STAGE = {"2": "layer1", "3": "layer2", "4": "layer3", "5": "layer4"}
_C2_BRANCH = {"2a": "1", "2b": "2", "2c": "3"}
_C2_NORM = {"s": "weight", "b": "bias", "rm": "running_mean", "riv": "running_var"}
_NORM_PARAM = r"(weight|bias|running_mean|running_var|num_batches_tracked)"


def _detectron2_to_torchvision(name: str) -> str:
    """detectron2 ResNet names (also inside a full detector's ``backbone.bottom_up.``) to
    torchvision's; other names are returned unchanged."""
    if name.startswith("backbone.bottom_up."):
        name = name[len("backbone.bottom_up."):]
    m = re.fullmatch(r"stem\.conv1\.norm\." + _NORM_PARAM, name)
    if m:
        return f"bn1.{m.group(1)}"
    m = re.fullmatch(r"stem\.(conv1\.weight|fc\.weight|fc\.bias)", name)
    if m:
        return m.group(1)
    m = re.fullmatch(r"linear\.(weight|bias)", name)
    if m:
        return f"fc.{m.group(1)}"
    m = re.fullmatch(r"res([2-5])\.(\d+)\.(conv[1-3]|shortcut)(\.norm)?\.(.+)", name)
    if m:
        stage, block, conv, norm, param = m.groups()
        if conv == "shortcut":
            module = "downsample.1" if norm else "downsample.0"
        else:
            module = conv.replace("conv", "bn") if norm else conv
        return f"{_STAGE[stage]}.{block}.{module}.{param}"
    return name


def _caffe2_to_torchvision(name: str) -> Optional[str]:
    """Caffe2 / Detectron ResNet blob names to torchvision's; None for optimizer state."""
    if name.endswith("_momentum"):
        return None
    m = re.fullmatch(r"(fc1000|pred)_(w|b)", name)
    if m:
        return "fc.weight" if m.group(2) == "w" else "fc.bias"
    m = re.fullmatch(r"conv1_(w|b)", name)
    if m:
        return "conv1.weight" if m.group(1) == "w" else "conv1.bias"
    m = re.fullmatch(r"res_conv1_bn_(s|b|rm|riv)", name)
    if m:
        return f"bn1.{_C2_NORM[m.group(1)]}"
    m = re.fullmatch(r"res([2-5])_(\d+)_branch(1|2a|2b|2c)(_bn)?_(w|s|b|rm|riv)", name)
    if m:
        stage, block, branch, norm, kind = m.groups()
        prefix = f"{_STAGE[stage]}.{block}"
        if norm is None:
            if kind != "w":
                return name
            module = "downsample.0" if branch == "1" else f"conv{_C2_BRANCH[branch]}"
            return f"{prefix}.{module}.weight"
        module = "downsample.1" if branch == "1" else f"bn{_C2_BRANCH[branch]}"
        return f"{prefix}.{module}.{_C2_NORM.get(kind, kind)}"
    return name


# image-classifier parts that a feature backbone never has
# (torchvision's MobileNetV3 classifier is a Sequential: classifier.0 and classifier.3)
_CLASSIFIER = re.compile(r"(fc|classifier|linear)(\.\d+)?\.(weight|bias)"
                         r"|conv_head\.(weight|bias)|bn2\." + _NORM_PARAM)


def _canonical_names(tensors: Dict[str, torch.Tensor], source: str, path: str
                     ) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """File tensors under torchvision/timm names, and the file names that are optimizer state."""
    converted: Dict[str, torch.Tensor] = {}
    origin: Dict[str, str] = {}
    skipped = []
    for name, tensor in tensors.items():
        if source == "caffe2":
            new = _caffe2_to_torchvision(name)
        elif source == "detectron2":
            new = _detectron2_to_torchvision(name)
        else:
            new = name
        if new is None:
            skipped.append(name)
            continue
        if new in converted:
            raise BackboneWeightsError(f"{path}: '{origin[new]}' and '{name}' both map to "
                                       f"'{new}'")
        converted[new], origin[new] = tensor, name
    return converted, skipped


def _our_names(backbone: nn.Module) -> Dict[str, str]:
    """torchvision/timm-style name -> our state-dict key. The EfficientNet backbone holds timm's
    model as ``body``; spectral-normalised convs keep their weight under ``parametrizations``."""
    names = {}
    for key in backbone.state_dict():
        if key.endswith("num_batches_tracked") or re.search(r"parametrizations\.weight\.\d+\.",
                                                            key):
            continue  # BN step counters and power-iteration vectors are state, not weights
        canonical = key.replace(".parametrizations.weight.original", ".weight")
        if canonical.startswith("body."):
            canonical = canonical[len("body."):]
        names[canonical] = key
    return names


def _module_of(backbone: nn.Module, key: str) -> nn.Module:
    return backbone.get_submodule(key.rsplit(".", 1)[0]) if "." in key else backbone


def _is_batch_norm(module: nn.Module) -> bool:
    """BN, SyncBN, FrozenBN (ours, torchvision's, timm's): normalised by running statistics."""
    return all(isinstance(getattr(module, b, None), torch.Tensor) for b in _NORM_BUFFERS)


# ----------------------------------------------------------------------------------- loading
def load_backbone_weights(backbone: nn.Module, path: str) -> BackboneWeightsReport:
    """Copy the tensors of a pretrained file (see the module docstring) into ``backbone``.

    Returns:
        the report: loaded, missing (ours, not in the file), unused (file, not ours), dropped
        (classifier), filled (affine-only norm buffers) names.
    Raises:
        FileNotFoundError, BackboneWeightsError: unreadable or refused file, shape mismatches
        (both shapes named), or no tensor of the file fits the backbone.
    """
    tensors, source, author, not_arrays = read_backbone_weights(path)
    converted, optimizer_state = _canonical_names(tensors, source, path)
    ours = _our_names(backbone)
    own_state = backbone.state_dict()
    report = BackboneWeightsReport(path=path, source=source, author=author,
                                   unused=sorted(not_arrays), dropped=sorted(optimizer_state))

    # modules that are BatchNorms in the file: they have running statistics, or Caffe2 names
    # them "_bn_" (its affine-only norms)
    file_norms = {n.rsplit(".", 1)[0] for n in converted if n.rsplit(".", 1)[-1] in _NORM_BUFFERS}
    if source == "caffe2":
        file_norms |= {n.rsplit(".", 1)[0] for n in converted
                       if re.search(r"(^|\.)(bn\d|downsample\.1)\.(weight|bias)$", n)}

    to_load: Dict[str, torch.Tensor] = {}
    mismatched, other_norms = [], set()
    for name, tensor in converted.items():
        if name.endswith("num_batches_tracked"):
            continue
        key = ours.get(name)
        if key is None:
            (report.dropped if _CLASSIFIER.fullmatch(name) else report.unused).append(name)
            continue
        module_name = name.rsplit(".", 1)[0]
        if module_name in file_norms and not _is_batch_norm(_module_of(backbone, key)):
            other_norms.add(module_name)
            report.unused.append(name)
            continue
        if tuple(tensor.shape) != tuple(own_state[key].shape):
            mismatched.append(f"{key} file {tuple(tensor.shape)} vs ours "
                              f"{tuple(own_state[key].shape)}")
            continue
        to_load[key] = tensor
    if mismatched:
        raise BackboneWeightsError(f"{path} does not fit the backbone: shape mismatch "
                                   f"{short_list(mismatched, 4)}")
    if not to_load:
        raise BackboneWeightsError(
            f"No tensor of {path} ({source} names such as {short_list(converted, 3)}) matches "
            f"the backbone (names such as {short_list(ours.values(), 3)})")

    # a Caffe2 affine-only norm: mean 0, var 1 - eps makes (x - mean) / sqrt(var + eps) = x
    for module_name in sorted(file_norms - other_norms):
        key = ours.get(module_name + ".weight")
        if key is None or key not in to_load or not _is_batch_norm(_module_of(backbone, key)):
            continue
        prefix = key.rsplit(".", 1)[0]
        eps = float(getattr(_module_of(backbone, key), "eps", 0.0))
        for buffer, value in (("running_mean", 0.0), ("running_var", max(1.0 - eps, 0.0))):
            if f"{module_name}.{buffer}" not in converted:
                to_load[f"{prefix}.{buffer}"] = torch.full_like(own_state[f"{prefix}.{buffer}"],
                                                                value)
                report.filled.append(f"{prefix}.{buffer}")

    backbone.load_state_dict(to_load, strict=False)  # every key is one of the backbone's
    report.loaded = sorted(k for k in to_load if k not in report.filled)
    report.missing = sorted(set(ours.values()) - set(to_load))
    report.unused.sort()
    report.dropped.sort()
    report.other_norms = sorted(other_norms)
    return report


# ---------------------------------------------------------------------------------- from cfg
def resolve_pretrained_path(name: str, key: str = "MODEL.BACKBONE.WEIGHTS") -> str:
    """An absolute path as is; a relative one under ``$DETECTOR_PRETRAINED`` (default
    ``./pretrained``), else relative to the working directory.

    Raises:
        FileNotFoundError: one line naming ``key``, the value and the places looked at.
    """
    name = os.path.expanduser(name)
    if os.path.isabs(name):
        candidates = [name]
    else:
        root = os.environ.get(PRETRAINED_ENV) or _DEFAULT_PRETRAINED_DIR
        candidates = list(dict.fromkeys([os.path.join(root, name), name]))
    for candidate in candidates:
        if os.path.isfile(candidate):
            return candidate
    where = f"{PRETRAINED_ENV}={os.environ[PRETRAINED_ENV]}" if os.environ.get(PRETRAINED_ENV) \
        else f"{PRETRAINED_ENV} unset, so ./{_DEFAULT_PRETRAINED_DIR}"
    raise FileNotFoundError(
        f"{key}: file '{name}' not found (looked at {', '.join(map(os.path.abspath, candidates))};"
        f" {where}); see docs/models.md for where to download it")


def _close(values: Sequence[float], expected: Sequence[float], tol: float = 0.01) -> bool:
    return len(values) == len(expected) and all(abs(float(a) - b) <= tol
                                                for a, b in zip(values, expected))


def _check_input_convention(cfg, backbone: nn.Module, report: BackboneWeightsReport) -> None:
    """Warn when INPUT.FORMAT / PIXEL_MEAN / PIXEL_STD or the ResNet's stride placement differ
    from what the file was trained with. A file without an ImageNet classifier (e.g. a backbone
    saved by this project) has no known convention and is not checked."""
    if not report.caffe_style and not report.dropped:
        return
    fmt, mean, std = _BGR_CAFFE if report.caffe_style else _RGB_IMAGENET
    actual = (cfg.INPUT.FORMAT, list(cfg.MODEL.PIXEL_MEAN), list(cfg.MODEL.PIXEL_STD))
    if actual[0] != fmt or not _close(actual[1], mean) or not _close(actual[2], std):
        kind = "MSRA/Caffe" if report.caffe_style else "torchvision/timm ImageNet"
        logger.warning(
            "%s weights in %s expect INPUT.FORMAT %s, MODEL.PIXEL_MEAN %s, MODEL.PIXEL_STD %s; "
            "the config has %s, %s, %s: the pretrained features see differently scaled inputs",
            kind, report.path, fmt, list(mean), list(std), *actual)
    if report.caffe_style and _strides_in_3x3(backbone):
        logger.warning(
            "%s comes from a ResNet that strides in the first 1x1 conv of each stage (MSRA/Caffe);"
            " this ResNet strides in the 3x3 conv (torchvision), so the loaded weights compute "
            "different features than in detectron2: set MODEL.RESNETS.STRIDE_IN_1X1 True",
            report.path)


def _strides_in_3x3(backbone: nn.Module) -> bool:
    """True if some bottleneck block strides in its 3x3 conv2 rather than its 1x1 conv1."""
    for module in backbone.modules():
        conv1, conv2 = getattr(module, "conv1", None), getattr(module, "conv2", None)
        if (isinstance(conv1, nn.Conv2d) and isinstance(conv2, nn.Conv2d)
                and getattr(module, "conv3", None) is not None
                and conv1.kernel_size == (1, 1) and conv2.stride != (1, 1)):
            return True
    return False


def load_backbone_weights_from_config(cfg, model: nn.Module) -> Optional[BackboneWeightsReport]:
    """Load ``MODEL.BACKBONE.WEIGHTS`` into ``model.backbone`` before training starts.

    Nothing is loaded when ``MODEL.WEIGHTS`` is set (it replaces the whole model, as a resumed
    checkpoint does). With neither set and ``MODEL.BACKBONE.FREEZE_AT > 0`` a warning says that
    the frozen layers keep their random initialization.

    Returns:
        the report, or None if nothing was loaded.
    """
    weights = cfg.MODEL.BACKBONE.WEIGHTS
    if cfg.MODEL.WEIGHTS:
        if weights:
            logger.info("MODEL.WEIGHTS is set and initializes the whole model: "
                        "MODEL.BACKBONE.WEIGHTS (%s) is not loaded", weights)
        return None
    if not weights:
        if cfg.MODEL.BACKBONE.FREEZE_AT > 0:
            logger.warning(
                "!! MODEL.BACKBONE.FREEZE_AT=%d freezes the backbone's first layers, but neither "
                "MODEL.BACKBONE.WEIGHTS nor MODEL.WEIGHTS is set: those layers keep their RANDOM "
                "initialization for the whole run. Set MODEL.BACKBONE.WEIGHTS to ImageNet weights "
                "(docs/models.md) or MODEL.BACKBONE.FREEZE_AT 0 !!", cfg.MODEL.BACKBONE.FREEZE_AT)
        return None
    path = resolve_pretrained_path(weights)
    backbone = getattr(model, "module", model).backbone
    try:
        report = load_backbone_weights(backbone, path)
    except (BackboneWeightsError, FileNotFoundError) as err:
        raise type(err)(f"MODEL.BACKBONE.WEIGHTS: {err}") from None
    logger.info("MODEL.BACKBONE.WEIGHTS: %s", report.summary())
    if report.missing:
        logger.warning("MODEL.BACKBONE.WEIGHTS: %d backbone tensors are not in %s and keep "
                       "their initialization: %s", len(report.missing), path,
                       short_list(report.missing, 12))
    _check_input_convention(cfg, backbone, report)
    return report
