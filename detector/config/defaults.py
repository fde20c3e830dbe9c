"""Every config key, with its default and a one-line meaning.

A key that is not defined here is an error (see ``detector.config.config``).
Keep keys grouped by the part of the system that reads them.
"""
from .config import CfgNode as CN

_C = CN()
# Config format version, bumped when keys are renamed
_C.VERSION = 1

# ---------------------------------------------------------------------------
# Model: top level
# ---------------------------------------------------------------------------
_C.MODEL = CN()
# "cpu", "cuda" or "cuda:N"
_C.MODEL.DEVICE = "cpu"
# Name in META_ARCH_REGISTRY (detector/modeling/meta_arch/build.py)
_C.MODEL.META_ARCHITECTURE = "RetinaNet"
# Checkpoint (ours, or a converted torchvision one) loaded before training/eval; "" = random init
_C.MODEL.WEIGHTS = ""
# Per-channel mean subtracted from input pixels (0-255 scale, in INPUT.FORMAT order)
_C.MODEL.PIXEL_MEAN = [123.675, 116.28, 103.53]
# Per-channel std dividing input pixels (0-255 scale); ImageNet std by default
_C.MODEL.PIXEL_STD = [58.395, 57.12, 57.375]
# Pad batched images to a multiple of this; 0 = the largest pyramid stride
_C.MODEL.SIZE_DIVISIBILITY = 0
# Fold FrozenBN / eval-mode BN into the conv before it; one fused oneDNN conv + activation on CPU
# where nothing is differentiated (inference, frozen stages). See detector/layers/fused_conv.py
_C.MODEL.FUSE_CONV_NORM = True
# Run 3x3 stride-1 convs of 64+ channels on large CPU float32 channels-last maps as Winograd
# F(2x2, 3x3), equal up to float rounding; see detector/layers/winograd_conv.py
_C.MODEL.WINOGRAD_CONV = True
# Background anchors covered by a crowd region (INPUT.KEEP_CROWD) by at least this fraction of
# their area are ignored in the loss; above 1 = never
_C.MODEL.CROWD_IGNORE_FRACTION = 0.7
# Instance masks: the mapper adds gt_masks to the training instances and the model predicts masks
_C.MODEL.MASK_ON = False

# ---------------------------------------------------------------------------
# Norm layers (shared by backbone, neck and head)
# ---------------------------------------------------------------------------
_C.MODEL.GN = CN()
# Number of groups for "GN" norms
_C.MODEL.GN.NUM_GROUPS = 32
# Epsilon added to the group variance of "GN" norms
_C.MODEL.GN.EPS = 1e-5
_C.MODEL.BN = CN()
# BatchNorm momentum in PyTorch convention (1 - TF decay); EfficientDet uses 0.01
_C.MODEL.BN.MOMENTUM = 0.1
# BatchNorm epsilon; EfficientDet uses 1e-3
_C.MODEL.BN.EPS = 1e-5
_C.MODEL.EVONORM = CN()
# Channel groups of "EvoNormS0"'s group std (must divide the channels); running-variance momentum
# of "EvoNormB0" is MODEL.BN.MOMENTUM
_C.MODEL.EVONORM.NUM_GROUPS = 32
# Epsilon added to the variances of "EvoNormS0" / "EvoNormB0"
_C.MODEL.EVONORM.EPS = 1e-5

# ---------------------------------------------------------------------------
# Backbone (bottom-up network producing c2..c5)
# ---------------------------------------------------------------------------
_C.MODEL.BACKBONE = CN()
# Name in BACKBONE_REGISTRY (detector/modeling/backbone/build.py): "ResNet", "TinyNet",
# "EfficientNet" or "MobileNetV3"
_C.MODEL.BACKBONE.NAME = "ResNet"
# Freeze the stem (1) and the first N-1 stages; 0 trains everything
_C.MODEL.BACKBONE.FREEZE_AT = 2
# Norm of the backbone: "FrozenBN", "BN", "SyncBN", "GN", "EvoNormS0", "EvoNormB0", "SN" or ""
_C.MODEL.BACKBONE.NORM = "FrozenBN"
# Backbone features handed to the neck, named c<level> (stride 2**level)
_C.MODEL.BACKBONE.OUT_FEATURES = ["c3", "c4", "c5"]
# ImageNet weights loaded into the backbone before training when MODEL.WEIGHTS is "" (torchvision/timm
# .pth/.safetensors, detectron2/MSRA .pkl); relative names are looked up in $DETECTOR_PRETRAINED
_C.MODEL.BACKBONE.WEIGHTS = ""

_C.MODEL.RESNETS = CN()
# ResNet depth: 18, 34, 50 or 101
_C.MODEL.RESNETS.DEPTH = 50
# Stride in the first 1x1 conv of each bottleneck (MSRA/caffe weights such as detectron2's
# R-50.pkl) instead of the 3x3 conv (torchvision, v1.5)
_C.MODEL.RESNETS.STRIDE_IN_1X1 = False

_C.MODEL.TINYNET = CN()
# Output channels of the five stride-2 stages c1..c5 of the light demo backbone
_C.MODEL.TINYNET.CHANNELS = [16, 32, 64, 96, 128]
# Stage kind: "basic" (ResNet BasicBlock, stage 1 one conv) or "plain" (two conv-norm-ReLU each)
_C.MODEL.TINYNET.BLOCK = "basic"

_C.MODEL.EFFICIENTNET = CN()
# EfficientNet size "b0".."b7" (backbone "EfficientNet"); "" = set by EfficientDet from its
# MODEL.EFFICIENTDET.COMPOUND_COEF (any other meta-architecture must set it)
_C.MODEL.EFFICIENTNET.VARIANT = ""
# "same" (TF padding, timm's tf_efficientnet) or "symmetric"; "" = MODEL.EFFICIENTDET.PADDING
# under EfficientDet, "same" elsewhere
_C.MODEL.EFFICIENTNET.PADDING = ""
# Stochastic depth (drop connect) rate of the MBConv blocks, growing linearly with depth
_C.MODEL.EFFICIENTNET.DROP_PATH_RATE = 0.2
# CPU fp32 training: keep the BN/activation maps from one step to the next (no page faults on
# fresh maps; faster, ~5% more peak memory for EfficientDet-D0 at 512, batch 2)
_C.MODEL.EFFICIENTNET.REUSE_TRAINING_MAPS = True

_C.MODEL.MOBILENET = CN()
# MobileNetV3 size "large" or "small" (backbone "MobileNetV3"; activations and SE fixed by it)
_C.MODEL.MOBILENET.VARIANT = "large"
# Channel multiplier of every MobileNetV3 layer (rounded to multiples of 8, as torchvision)
_C.MODEL.MOBILENET.WIDTH_MULT = 1.0

# ---------------------------------------------------------------------------
# Neck (feature pyramid p<min>..p<max>)
# ---------------------------------------------------------------------------
_C.MODEL.NECK = CN()
# Name in NECK_REGISTRY (detector/modeling/neck/build.py): "FPN", "BiFPN", "TwoWayFPN", "PConv"
_C.MODEL.NECK.NAME = "FPN"
# Channels of every pyramid level
_C.MODEL.NECK.OUT_CHANNELS = 256
# Norm of the neck's convs (same names as MODEL.BACKBONE.NORM; "SN" not for TwoWayFPN)
_C.MODEL.NECK.NORM = ""
# Lowest pyramid level (2 = stride 4)
_C.MODEL.NECK.MIN_LEVEL = 3
# Highest pyramid level (7 = stride 128); levels above the backbone's come from a top block
_C.MODEL.NECK.MAX_LEVEL = 7
# Levels above 5: "conv" (3x3 stride-2 convs, RetinaNet's P6/P7) or "maxpool" (P6 only, kernel-1
# stride-2 max-pool of P5, as Mask R-CNN's FPN; needs MAX_LEVEL 6)
_C.MODEL.NECK.TOP_BLOCK = "conv"
# Input of P6 in the top block: "p5" (torchvision v1) or "c5" (RetinaNet paper, detectron2)
_C.MODEL.NECK.TOP_BLOCK_IN = "p5"

_C.MODEL.BIFPN = CN()
# Channels of every BiFPN level (neck "BiFPN"); 0 = set by EfficientDet from COMPOUND_COEF
_C.MODEL.BIFPN.CHANNELS = 0
# Number of stacked BiFPN cells; 0 = set by EfficientDet from COMPOUND_COEF
_C.MODEL.BIFPN.NUM_REPEATS = 0
# Fusion of node inputs: "fast" (normalised ReLU weights), "attn" (softmax), "sum"; "" = set by
# EfficientDet from COMPOUND_COEF
_C.MODEL.BIFPN.FUSION = ""
# Padding of the BiFPN pools and convs: "same" or "symmetric"; "" = MODEL.EFFICIENTDET.PADDING
# under EfficientDet, "same" elsewhere
_C.MODEL.BIFPN.PADDING = ""
# Bias on BiFPN convs followed by a norm, as in the TF models (converted weights need it)
_C.MODEL.BIFPN.REDUNDANT_BIAS = True
# Norm after each BiFPN conv and input-resampling 1x1 conv: "BN", "SyncBN", "GN", ...
_C.MODEL.BIFPN.NORM = "BN"
# Activation before each BiFPN node conv: "swish", "relu" or "" (none)
_C.MODEL.BIFPN.ACT = "swish"

# Neck "PConv" (neck/pconv.py, SEPC's pyramid convolution); channels, norm and levels are
# MODEL.NECK's, as for "FPN" and "TwoWayFPN"
_C.MODEL.PCONV = CN()
# Stacked pyramid convolutions after the 1x1 input projections
_C.MODEL.PCONV.NUM_CONVS = 4

# ---------------------------------------------------------------------------
# Anchors (keras-retinanet style: one base size per level x scales x ratios)
# ---------------------------------------------------------------------------
_C.MODEL.ANCHOR_GENERATOR = CN()
# Base anchor size per pyramid level; a list of lists gives several sizes per level
_C.MODEL.ANCHOR_GENERATOR.SIZES = [[32], [64], [128], [256], [512]]
# Multipliers applied to every base size (octave scales)
_C.MODEL.ANCHOR_GENERATOR.SCALES = [1.0, 1.2599210498948732, 1.5874010519681994]
# Aspect ratios height/width
_C.MODEL.ANCHOR_GENERATOR.RATIOS = [0.5, 1.0, 2.0]
# Stride per level; must equal 2**level for MIN_LEVEL..MAX_LEVEL ([] = derive)
_C.MODEL.ANCHOR_GENERATOR.STRIDES = [8, 16, 32, 64, 128]
# Anchor centre offset in units of stride (0.0 = torchvision/detectron2, 0.5 = keras-retinanet)
_C.MODEL.ANCHOR_GENERATOR.OFFSET = 0.0
# Round base anchor corners to integers, as torchvision does
_C.MODEL.ANCHOR_GENERATOR.ROUND_BASE_ANCHORS = False
# Anchor spacing per level: "pyramid" (2**level) or "torchvision" (padded size // feature size,
# per axis; differs at the top levels when the padded size is not a multiple of their stride)
_C.MODEL.ANCHOR_GENERATOR.STRIDE_RULE = "pyramid"

# ---------------------------------------------------------------------------
# RetinaNet head, matching, losses and inference
# ---------------------------------------------------------------------------
_C.MODEL.RETINANET = CN()
# Registered dense head (detector.modeling.dense_heads) of the meta-architecture "RetinaNet"
_C.MODEL.RETINANET.HEAD_NAME = "RetinaNetHead"
# Number of foreground classes
_C.MODEL.RETINANET.NUM_CLASSES = 80
# Convs per branch (classification and box) before the predictor
_C.MODEL.RETINANET.NUM_CONVS = 4
# Norm of the head convs (names as MODEL.BACKBONE.NORM); BN-family norms are kept per level
_C.MODEL.RETINANET.NORM = ""
# Prior probability used to initialise the classification bias
_C.MODEL.RETINANET.PRIOR_PROB = 0.01
# IoU below the first value = background, above the second = foreground, between = ignored
_C.MODEL.RETINANET.IOU_THRESHOLDS = [0.4, 0.5]
# Also match each ground truth to its best anchors even if their IoU is low
_C.MODEL.RETINANET.ALLOW_LOW_QUALITY_MATCHES = True
# Weights (wx, wy, ww, wh) of the box delta encoding
_C.MODEL.RETINANET.BBOX_REG_WEIGHTS = [1.0, 1.0, 1.0, 1.0]
# Focal loss alpha
_C.MODEL.RETINANET.FOCAL_LOSS_ALPHA = 0.25
# Focal loss gamma
_C.MODEL.RETINANET.FOCAL_LOSS_GAMMA = 2.0
# Box loss: "smooth_l1" (beta 0 = L1) or "giou"
_C.MODEL.RETINANET.BBOX_REG_LOSS_TYPE = "smooth_l1"
# Smooth-L1 beta; 0.0 gives plain L1 as in torchvision
_C.MODEL.RETINANET.SMOOTH_L1_BETA = 0.1
# Loss normaliser: "batch" (foreground anchors in the batch) or "per_image" (torchvision)
_C.MODEL.RETINANET.LOSS_NORMALIZATION = "batch"
# Drop per-level candidates scoring below this at test time
_C.MODEL.RETINANET.SCORE_THRESH_TEST = 0.05
# Keep at most this many candidates per level before NMS
_C.MODEL.RETINANET.TOPK_CANDIDATES_TEST = 1000
# IoU threshold of the class-aware NMS
_C.MODEL.RETINANET.NMS_THRESH_TEST = 0.5
# Run inference in channels-last memory format (faster convolutions on CPU and tensor cores)
_C.MODEL.RETINANET.CHANNELS_LAST_INFERENCE = True
# Train in channels-last memory format too, unless a conv torch 2.14 mishandles there forbids it
_C.MODEL.RETINANET.CHANNELS_LAST_TRAINING = True

# ---------------------------------------------------------------------------
# Proposal generator of two-stage detectors (Faster / Mask R-CNN) and its RPN
# ---------------------------------------------------------------------------
_C.MODEL.PROPOSAL_GENERATOR = CN()
# Name in PROPOSAL_GENERATOR_REGISTRY (detector/modeling/proposal_generator/build.py): "RPN"
_C.MODEL.PROPOSAL_GENERATOR.NAME = "RPN"
# Proposals narrower or lower than this (pixels, after clipping) are dropped; torchvision: 1e-3
_C.MODEL.PROPOSAL_GENERATOR.MIN_SIZE = 0.0

_C.MODEL.RPN = CN()
# Registered dense head (detector.modeling.dense_heads) scoring and regressing the anchors
_C.MODEL.RPN.HEAD_NAME = "StandardRPNHead"
# Pyramid levels the RPN reads, one anchor-generator level each
_C.MODEL.RPN.IN_FEATURES = ["p2", "p3", "p4", "p5", "p6"]
# Output channels of the head's shared 3x3 convs (+ ReLU); -1 = the input channels
_C.MODEL.RPN.CONV_DIMS = [-1]
# IoU below the first value = background, above the second = foreground, between = ignored
_C.MODEL.RPN.IOU_THRESHOLDS = [0.3, 0.7]
# Anchor label per IoU interval of IOU_THRESHOLDS: 0 background, -1 ignored, 1 foreground
_C.MODEL.RPN.IOU_LABELS = [0, -1, 1]
# Anchors sampled per image for the losses
_C.MODEL.RPN.BATCH_SIZE_PER_IMAGE = 256
# At most this fraction of the sampled anchors is foreground
_C.MODEL.RPN.POSITIVE_FRACTION = 0.5
# Weights (wx, wy, ww, wh) of the anchor box delta encoding
_C.MODEL.RPN.BBOX_REG_WEIGHTS = (1.0, 1.0, 1.0, 1.0)
# Box loss: "smooth_l1" (beta 0 = L1) or "giou"
_C.MODEL.RPN.BBOX_REG_LOSS_TYPE = "smooth_l1"
# Smooth-L1 beta of the box loss; 0.0 = L1 (detectron2), torchvision 1/9
_C.MODEL.RPN.SMOOTH_L1_BETA = 0.0
# Weight of both RPN losses
_C.MODEL.RPN.LOSS_WEIGHT = 1.0
# Extra weight of the RPN box loss (times LOSS_WEIGHT)
_C.MODEL.RPN.BBOX_REG_LOSS_WEIGHT = 1.0
# Loss divisor: "batch_size" (images x BATCH_SIZE_PER_IMAGE, detectron2) or "num_sampled" (the
# anchors actually sampled, torchvision)
_C.MODEL.RPN.LOSS_NORMALIZATION = "batch_size"
# Under data parallelism sum the loss divisor over processes (divided by their number)
_C.MODEL.RPN.LOSS_NORMALIZER_ALL_RANKS = True
# Highest-scoring anchors kept per image and level before NMS, in training
_C.MODEL.RPN.PRE_NMS_TOPK_TRAIN = 2000
# Highest-scoring anchors kept per image and level before NMS, at test time
_C.MODEL.RPN.PRE_NMS_TOPK_TEST = 1000
# Proposals kept per image after NMS, in training (torchvision: 2000)
_C.MODEL.RPN.POST_NMS_TOPK_TRAIN = 1000
# Proposals kept per image after NMS, at test time
_C.MODEL.RPN.POST_NMS_TOPK_TEST = 1000
# IoU threshold of the NMS, run per pyramid level
_C.MODEL.RPN.NMS_THRESH = 0.7
# Proposals with objectness probability below this are dropped (0.0 keeps all, as torchvision)
_C.MODEL.RPN.SCORE_THRESH = 0.0

# ---------------------------------------------------------------------------
# RoI heads of two-stage detectors (Faster / Mask R-CNN): proposal sampling, box and mask heads
# ---------------------------------------------------------------------------
_C.MODEL.ROI_HEADS = CN()
# Name in ROI_HEADS_REGISTRY (detector/modeling/roi_heads/build.py): "StandardROIHeads"
_C.MODEL.ROI_HEADS.NAME = "StandardROIHeads"
# Number of foreground classes
_C.MODEL.ROI_HEADS.NUM_CLASSES = 80
# Pyramid levels the RoIs are pooled from (consecutive; box side 224 px maps to p4)
_C.MODEL.ROI_HEADS.IN_FEATURES = ["p2", "p3", "p4", "p5"]
# IoU cut points of proposal-to-ground-truth matching (no low-quality matches)
_C.MODEL.ROI_HEADS.IOU_THRESHOLDS = [0.5]
# Proposal label per IoU interval of IOU_THRESHOLDS: 0 background, -1 ignored, 1 foreground
_C.MODEL.ROI_HEADS.IOU_LABELS = [0, 1]
# Proposals sampled per image for the box losses
_C.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 512
# At most this fraction of the sampled proposals is foreground
_C.MODEL.ROI_HEADS.POSITIVE_FRACTION = 0.25
# Add the ground-truth boxes to the proposals in training
_C.MODEL.ROI_HEADS.PROPOSAL_APPEND_GT = True
# Under data parallelism sum the box and mask loss divisors over the W processes, divided by W
_C.MODEL.ROI_HEADS.LOSS_NORMALIZER_ALL_RANKS = True
# Test-time (proposal, class) candidates scoring at or below this are dropped
_C.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.05
# IoU threshold of the per-class NMS at test time
_C.MODEL.ROI_HEADS.NMS_THRESH_TEST = 0.5
# Test-time detections narrower or lower than this (pixels) are dropped; 0 keeps all (tv: 1e-2)
_C.MODEL.ROI_HEADS.MIN_BOX_SIZE_TEST = 0.0

_C.MODEL.ROI_BOX_HEAD = CN()
# Name in ROI_BOX_HEAD_REGISTRY: "FastRCNNConvFCHead" (NUM_CONV convs, then NUM_FC fcs)
_C.MODEL.ROI_BOX_HEAD.NAME = "FastRCNNConvFCHead"
# 3x3 convs before the fcs (4 with NORM "GN" = detectron2's 4conv1fc head)
_C.MODEL.ROI_BOX_HEAD.NUM_CONV = 0
# Channels of those convs
_C.MODEL.ROI_BOX_HEAD.CONV_DIM = 256
# Fully connected layers (2 = the 2fc head of Mask R-CNN FPN)
_C.MODEL.ROI_BOX_HEAD.NUM_FC = 2
# Width of those fcs
_C.MODEL.ROI_BOX_HEAD.FC_DIM = 1024
# Norm of the box head convs (names as MODEL.BACKBONE.NORM)
_C.MODEL.ROI_BOX_HEAD.NORM = ""
# One box regression for all classes instead of one per class
_C.MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG = False
# Weights (wx, wy, ww, wh) of the proposal box delta encoding
_C.MODEL.ROI_BOX_HEAD.BBOX_REG_WEIGHTS = (10.0, 10.0, 5.0, 5.0)
# Box loss: "smooth_l1" (beta 0 = L1) or "giou"
_C.MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE = "smooth_l1"
# Weight of the box loss
_C.MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_WEIGHT = 1.0
# Smooth-L1 beta of the box loss; 0.0 = L1 (detectron2), torchvision 1/9
_C.MODEL.ROI_BOX_HEAD.SMOOTH_L1_BETA = 0.0
# Side of the pooled RoI features
_C.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION = 7
# RoIAlign sampling points per bin side; 0 = adaptive (torchvision: 2)
_C.MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO = 0
# "ROIAlignV2" (half-pixel aligned, detectron2) or "ROIAlign" (torchvision)
_C.MODEL.ROI_BOX_HEAD.POOLER_TYPE = "ROIAlignV2"

_C.MODEL.ROI_MASK_HEAD = CN()
# Name in ROI_MASK_HEAD_REGISTRY: "MaskRCNNConvUpsampleHead" (convs, 2x deconv, 1x1 predictor)
_C.MODEL.ROI_MASK_HEAD.NAME = "MaskRCNNConvUpsampleHead"
# 3x3 convs before the 2x transposed conv
_C.MODEL.ROI_MASK_HEAD.NUM_CONV = 4
# Channels of those convs and of the transposed conv
_C.MODEL.ROI_MASK_HEAD.CONV_DIM = 256
# Norm of the mask head convs (names as MODEL.BACKBONE.NORM)
_C.MODEL.ROI_MASK_HEAD.NORM = ""
# One mask for all classes instead of one per class
_C.MODEL.ROI_MASK_HEAD.CLS_AGNOSTIC_MASK = False
# Side of the pooled RoI features; masks are twice this (14 -> 28)
_C.MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION = 14
# RoIAlign sampling points per bin side; 0 = adaptive (torchvision: 2)
_C.MODEL.ROI_MASK_HEAD.POOLER_SAMPLING_RATIO = 0
# "ROIAlignV2" (half-pixel aligned, detectron2) or "ROIAlign" (torchvision)
_C.MODEL.ROI_MASK_HEAD.POOLER_TYPE = "ROIAlignV2"
# Mask targets: "binary" (aligned RoIAlign of the gt masks, thresholded at 0.5, detectron2) or
# "soft" (unaligned RoIAlign, fractional values kept, torchvision)
_C.MODEL.ROI_MASK_HEAD.TARGET_TYPE = "binary"
# Pasted mask probabilities above this are the object (the masks given to evaluation)
_C.MODEL.ROI_MASK_HEAD.PASTE_THRESHOLD = 0.5

# ---------------------------------------------------------------------------
# EfficientDet (meta-architecture "EfficientDet": backbone + BiFPN + separable-conv heads)
# ---------------------------------------------------------------------------
_C.MODEL.EFFICIENTDET = CN()
# Compound coefficient k of D<k> (0..7): fills the backbone, BiFPN, head and anchor sizes left
# unset (0 / ""); -1 = no compound scaling, every size set explicitly
_C.MODEL.EFFICIENTDET.COMPOUND_COEF = 0
# Registered dense head (detector.modeling.dense_heads) of the meta-architecture "EfficientDet"
_C.MODEL.EFFICIENTDET.HEAD_NAME = "EfficientDetHead"
# Number of foreground classes
_C.MODEL.EFFICIENTDET.NUM_CLASSES = 80
# "same" (TensorFlow padding, needed by the original weights) or "symmetric" (PyTorch, faster):
# the head's, and the backbone's and BiFPN's where their own PADDING is ""
_C.MODEL.EFFICIENTDET.PADDING = "same"
# Separable convs per head branch before the predictor; 0 = from COMPOUND_COEF
_C.MODEL.EFFICIENTDET.NUM_HEAD_CONVS = 0
# Norm of the head convs, one per pyramid level: "BN", "SyncBN", "GN", "EvoNormS0", ...
_C.MODEL.EFFICIENTDET.HEAD_NORM = "BN"
# Activation after each head norm: "swish", "relu" or "" (e.g. for EvoNorm, which has its own)
_C.MODEL.EFFICIENTDET.HEAD_ACT = "swish"
# Drop connect in the heads (TF survival_prob = 1 - rate): > 0 adds residuals around convs 2..n
_C.MODEL.EFFICIENTDET.HEAD_DROP_PATH_RATE = 0.0
# Bias on head convs followed by a norm, as in the TF models (converted weights need it)
_C.MODEL.EFFICIENTDET.REDUNDANT_BIAS = True
# Prior probability used to initialise the classification bias
_C.MODEL.EFFICIENTDET.PRIOR_PROB = 0.01
# Anchor side = ANCHOR_SCALE * stride * octave scale; 0.0 = from COMPOUND_COEF (4, 5 for D7)
_C.MODEL.EFFICIENTDET.ANCHOR_SCALE = 0.0
# Octave scales per level: 2 ** (i / NUM_SCALES) for i < NUM_SCALES
_C.MODEL.EFFICIENTDET.NUM_SCALES = 3
# Anchor (width, height) multipliers, effdet's aspect ratios
_C.MODEL.EFFICIENTDET.ASPECT_RATIOS = [[1.0, 1.0], [1.4, 0.7], [0.7, 1.4]]
# Anchors with IoU >= this are foreground, below it background (plus each gt's best anchor)
_C.MODEL.EFFICIENTDET.IOU_THRESHOLD = 0.5
# Focal loss alpha
_C.MODEL.EFFICIENTDET.FOCAL_LOSS_ALPHA = 0.25
# Focal loss gamma (effdet: 1.5)
_C.MODEL.EFFICIENTDET.FOCAL_LOSS_GAMMA = 1.5
# Box loss: "huber" on encoded deltas or "giou" on decoded boxes
_C.MODEL.EFFICIENTDET.BOX_LOSS_TYPE = "huber"
# Huber delta of the box loss
_C.MODEL.EFFICIENTDET.HUBER_DELTA = 0.1
# Weight of the Huber box loss (normalised by 4 x (foreground anchors + 1), as effdet)
_C.MODEL.EFFICIENTDET.BOX_LOSS_WEIGHT = 50.0
# Weight of the GIoU box loss (normalised by foreground anchors + 1)
_C.MODEL.EFFICIENTDET.GIOU_LOSS_WEIGHT = 1.0
# Drop (anchor, class) candidates scoring at or below this at test time (effdet: 0, keep all)
_C.MODEL.EFFICIENTDET.SCORE_THRESH_TEST = 0.0
# Candidates kept over all levels before NMS
_C.MODEL.EFFICIENTDET.TOPK_CANDIDATES_TEST = 5000
# IoU threshold of the class-aware NMS
_C.MODEL.EFFICIENTDET.NMS_THRESH_TEST = 0.5
# Run backbone, BiFPN and heads in channels-last memory format (faster on CPU and tensor cores)
_C.MODEL.EFFICIENTDET.CHANNELS_LAST = True

# ---------------------------------------------------------------------------
# Input pipeline
# ---------------------------------------------------------------------------
_C.INPUT = CN()
# Channel order of images fed to the model: "RGB" or "BGR"
_C.INPUT.FORMAT = "RGB"
# Keep crowd annotations in training as regions that only make anchors ignored (see
# MODEL.CROWD_IGNORE_FRACTION); False drops them, as torchvision and effdet do
_C.INPUT.KEEP_CROWD = True
# How polygon masks reach the model with MODEL.MASK_ON: "polygon" (PolygonMasks) or "bitmask"
# (BitMasks); RLE annotations always become BitMasks
_C.INPUT.MASK_FORMAT = "polygon"
# Train-time resize: "shortest_edge" (MIN/MAX_SIZE_TRAIN) or "scale_jitter" (EfficientDet's
# random scale of a MAX_SIZE_TRAIN square, then a random MAX_SIZE_TRAIN crop)
_C.INPUT.RESIZE_MODE_TRAIN = "shortest_edge"
# Range of the random scale of "scale_jitter" (effdet: 0.1 to 2.0)
_C.INPUT.SCALE_JITTER_RANGE = (0.1, 2.0)
# Shorter side at train time, sampled per image from this list
_C.INPUT.MIN_SIZE_TRAIN = (512, 544, 576, 608, 640)
# Longer side cap at train time (the square side with "scale_jitter")
_C.INPUT.MAX_SIZE_TRAIN = 1066
# Shorter side at test time
_C.INPUT.MIN_SIZE_TEST = 576
# Longer side cap at test time
_C.INPUT.MAX_SIZE_TEST = 1066
# Random flip at train time: "horizontal" or "none"
_C.INPUT.RANDOM_FLIP = "horizontal"
# Probability that a training batch gets two of its images scaled down and stitched into one
# (side by side or top and bottom; detector/data/stitch.py); 0 = off
_C.INPUT.STITCH = 0.0
_C.INPUT.AUTOAUGMENT = CN()
# Detection AutoAugment policy applied after the resize and flip at train time: "" (off), "v0"
# (the paper's), "v1", "v2" or "v3" (Zoph et al. 2019; detector/data/autoaugment.py)
_C.INPUT.AUTOAUGMENT.POLICY = ""

# ---------------------------------------------------------------------------
# Datasets (names registered in detector/data/datasets/builtin.py)
# ---------------------------------------------------------------------------
_C.DATASETS = CN()
# Datasets concatenated for training
_C.DATASETS.TRAIN = ("coco_2017_train",)
# Datasets evaluated at test time
_C.DATASETS.TEST = ("coco_2017_val",)

# ---------------------------------------------------------------------------
# Data loader
# ---------------------------------------------------------------------------
_C.DATALOADER = CN()
# Worker processes per data loader (0 = load in the main process)
_C.DATALOADER.NUM_WORKERS = 2
# Batch images of similar aspect ratio (landscape with landscape) to reduce padding
_C.DATALOADER.ASPECT_RATIO_GROUPING = True
# Drop training images that have no usable (non-crowd) annotation
_C.DATALOADER.FILTER_EMPTY_ANNOTATIONS = True

# ---------------------------------------------------------------------------
# Solver
# ---------------------------------------------------------------------------
_C.SOLVER = CN()
# Optimizer: "SGD" (momentum) or "AdamW"
_C.SOLVER.OPTIMIZER = "SGD"
# Total training iterations
_C.SOLVER.MAX_ITER = 90000
# Learning rate for IMS_PER_BATCH images
_C.SOLVER.BASE_LR = 0.01
# SGD momentum
_C.SOLVER.MOMENTUM = 0.9
# Use Nesterov momentum
_C.SOLVER.NESTEROV = False
# Weight decay of conv/linear weights
_C.SOLVER.WEIGHT_DECAY = 0.0001
# Weight decay of norm parameters (BN/GN/... weights and biases)
_C.SOLVER.WEIGHT_DECAY_NORM = 0.0
# Weight decay of biases outside norm layers
_C.SOLVER.WEIGHT_DECAY_BIAS = 0.0
# Learning-rate multiplier for biases
_C.SOLVER.BIAS_LR_FACTOR = 1.0
# Images per iteration summed over all processes
_C.SOLVER.IMS_PER_BATCH = 16
# Processes the solver values were written for; another world size scales them linearly (0 = never)
_C.SOLVER.REFERENCE_WORLD_SIZE = 0
# "WarmupMultiStepLR" or "WarmupCosineLR"
_C.SOLVER.LR_SCHEDULER_NAME = "WarmupMultiStepLR"
# Iterations at which the multistep schedule multiplies the LR by GAMMA
_C.SOLVER.STEPS = (60000, 80000)
# Multistep decay factor
_C.SOLVER.GAMMA = 0.1
# Final LR of the cosine schedule as a fraction of BASE_LR
_C.SOLVER.COSINE_END_FACTOR = 0.0
# LR multiplier at iteration 0 of the warmup
_C.SOLVER.WARMUP_FACTOR = 0.001
# Warmup length in iterations
_C.SOLVER.WARMUP_ITERS = 1000
# Warmup shape: "linear" or "constant"
_C.SOLVER.WARMUP_METHOD = "linear"
# Save a checkpoint every N iterations
_C.SOLVER.CHECKPOINT_PERIOD = 5000
# Periodic checkpoints kept on disk (older ones are deleted); 0 keeps all
_C.SOLVER.CHECKPOINT_MAX_TO_KEEP = 3
# Signals that stop training after the current iteration with a checkpoint, exit status 128+signal
_C.SOLVER.CHECKPOINT_ON_SIGNALS = ("SIGINT", "SIGTERM", "SIGUSR1")
_C.SOLVER.BEST_CHECKPOINT = CN()
# Eval result choosing model_best.pth ("<dataset>/bbox/AP" with several test sets); "" = off
_C.SOLVER.BEST_CHECKPOINT.METRIC = "bbox/AP"
# "max": a higher METRIC is better; "min": a lower one is
_C.SOLVER.BEST_CHECKPOINT.MODE = "max"
_C.SOLVER.CLIP_GRADIENTS = CN()
# Clip gradients before the optimizer step
_C.SOLVER.CLIP_GRADIENTS.ENABLED = False
# "norm" (total norm of all parameters) or "value" (elementwise)
_C.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = "norm"
# Maximum gradient norm or absolute value
_C.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = 10.0
# p of the p-norm for "norm" clipping
_C.SOLVER.CLIP_GRADIENTS.NORM_TYPE = 2.0
_C.SOLVER.AMP = CN()
# Mixed precision: fp16 + GradScaler on CUDA, bf16 autocast on CPU
_C.SOLVER.AMP.ENABLED = False
_C.SOLVER.EMA = CN()
# Keep an exponential moving average of the weights (detector/solver/ema.py), used for evaluation
_C.SOLVER.EMA.ENABLED = False
# EMA decay per iteration (effdet: 0.9998)
_C.SOLVER.EMA.DECAY = 0.9998

# ---------------------------------------------------------------------------
# Test / evaluation
# ---------------------------------------------------------------------------
_C.TEST = CN()
# Evaluate every N iterations during training (0 = only at the end)
_C.TEST.EVAL_PERIOD = 0
# Maximum detections kept per image after NMS
_C.TEST.DETECTIONS_PER_IMAGE = 100
# COCO evaluation backend (same numbers): "faster_coco_eval" (or "faster-coco-eval"), "pycocotools"
_C.TEST.COCO_EVAL_BACKEND = "faster_coco_eval"
# First N images of DATASETS.TEST[0] drawn GT | prediction to TensorBoard at each evaluation; 0 = off
_C.TEST.VIS_NUM_IMAGES = 4
_C.TEST.AMP = CN()
# Inference (evaluation, DefaultPredictor) under autocast: bf16 on CPU, fp16 on CUDA; the
# postprocessing stays float32. Independent of SOLVER.AMP (training)
_C.TEST.AMP.ENABLED = False

# ---------------------------------------------------------------------------
# Distributed (multi-process) runs; read by tools/*.py before the processes start
# ---------------------------------------------------------------------------
_C.DIST = CN()
# Whole minutes a collective waits for the other ranks before failing (bounds a dead-peer hang)
_C.DIST.TIMEOUT_MINUTES = 30

# ---------------------------------------------------------------------------
# Misc
# ---------------------------------------------------------------------------
# Directory for checkpoints, logs, metrics.json, events and results
_C.OUTPUT_DIR = "./output"
# Global seed; < 0 picks one from time and pid (and logs it)
_C.SEED = -1
# Print training metrics every N iterations
_C.LOG_PERIOD = 20
# torch.backends.cudnn.benchmark
_C.CUDNN_BENCHMARK = False
