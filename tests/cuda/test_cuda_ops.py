"""RoIAlign, the multi-level RoI pooler, NMS and batched NMS on CUDA against the CPU."""
import pytest

from gpu_inference_checks import (
    BATCHED_NMS_SIZES,
    check_batched_nms,
    check_nms,
    check_roi_align,
    check_roi_pooler,
)

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("aligned", [True, False], ids=["ROIAlignV2", "ROIAlign"])
@pytest.mark.parametrize("sampling_ratio", [0, 2])
def test_roi_align_forward_and_backward_match_cpu(aligned, sampling_ratio):
    """Would catch: a CUDA RoIAlign that samples other points (half-pixel offset, adaptive
    sampling count, boxes past the border) or accumulates gradients wrongly."""
    check_roi_align("cuda", aligned=aligned, sampling_ratio=sampling_ratio)


def test_roi_pooler_matches_cpu():
    """Would catch: boxes assigned to other levels on CUDA, or pooled features written to the
    wrong rows when the pooler scatters each level's results back."""
    check_roi_pooler("cuda")


def test_nms_matches_cpu():
    """Would catch: a CUDA NMS that keeps other boxes or returns them in another order."""
    check_nms("cuda")


@pytest.mark.parametrize("num_boxes", BATCHED_NMS_SIZES)
def test_batched_nms_matches_cpu(num_boxes):
    """Would catch: per-class NMS that differs between torchvision's two strategies (coordinate
    offsets or a loop over classes), which CUDA and CPU switch between at different sizes."""
    check_batched_nms("cuda", num_boxes)
