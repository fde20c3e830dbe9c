"""RetinaNet, EfficientDet and Mask R-CNN evaluated on CUDA give the CPU's detections."""
import pytest

from gpu_inference_checks import TINY_MODELS, check_eval_forward

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_eval_forward_matches_cpu(name):
    """Would catch: tensors created on the CPU inside forward (anchors, image sizes, offsets,
    masks) that fail or silently move data, kernels that compute differently on CUDA, and
    postprocessing (decode, top-k, NMS, rescaling, mask pasting) that differs by device."""
    assert check_eval_forward(name, "cuda") > 0
