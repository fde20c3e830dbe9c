"""Pasting per-box masks into the image: same geometry as torchvision's per-mask loop, batched
in chunks whose intermediates stay under the given bound."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torchvision.models.detection.roi_heads import paste_masks_in_image as tv_paste

from detector.modeling import paste_masks_in_image


@pytest.fixture(autouse=True)
def _one_thread(single_thread):
    yield


def _masks_and_boxes(seed, num, image_size, max_side):
    """Smooth random 28 x 28 masks (upsampled noise, so they have shapes rather than speckle)
    and boxes clipped to the image, from sub-pixel to ``max_side``, some on the borders."""
    g = torch.Generator().manual_seed(seed)
    h, w = image_size
    coarse = torch.rand(num, 1, 7, 7, generator=g)
    masks = torch.nn.functional.interpolate(coarse, size=(28, 28), mode="bilinear")
    wh = 0.3 + torch.rand(num, 2, generator=g) * max_side
    xy = torch.rand(num, 2, generator=g) * torch.tensor([w, h]) - wh / 4
    boxes = torch.cat([xy, xy + wh], dim=1)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
    return masks, boxes


def _iou(a, b):
    inter = (a & b).flatten(1).sum(1).double()
    union = (a | b).flatten(1).sum(1).double()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def test_matches_torchvision_paste():
    image_size = (97, 143)
    masks, boxes = _masks_and_boxes(0, 80, image_size, 90)
    expected = tv_paste(masks, boxes, image_size)[:, 0]
    probs = paste_masks_in_image(masks, boxes, image_size, threshold=None)
    assert probs.dtype == torch.float32 and probs.shape == (80, *image_size)
    assert torch.equal(probs, expected)  # bitwise: thresholds at exactly 0.5 agree too
    binary = paste_masks_in_image(masks, boxes, image_size)
    assert binary.dtype == torch.bool
    assert binary.any(dim=(1, 2)).sum() > 60
    assert torch.equal(binary, expected > 0.5)


class _TensorSizes(TorchDispatchMode):
    """Records the byte size and storage of every tensor an operator returns."""

    def __init__(self):
        super().__init__()
        self.tensors = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.tensors.append((t.numel() * t.element_size(),
                                     t.untyped_storage().data_ptr()))
        return out


def test_large_image_needs_no_image_sized_temporaries():
    image_size = (800, 1216)
    masks, boxes = _masks_and_boxes(1, 100, image_size, 700)
    with _TensorSizes() as sizes:
        pasted = paste_masks_in_image(masks, boxes, image_size)
    assert pasted.shape == (100, *image_size) and pasted.dtype == torch.bool
    output = pasted.untyped_storage().data_ptr()
    intermediates = [size for size, storage in sizes.tensors if storage != output]
    # the largest temporary is one mask resized onto its box (boxes up to ~700 px), never an
    # image-sized float (3.9 MB) per mask as in torchvision's loop
    expanded = (boxes[:, 2:] - boxes[:, :2]) * 30 / 28 + 2
    assert max(intermediates) <= int(expanded.prod(dim=1).max()) * 4 + 4096
    subset = torch.arange(0, 100, 10)
    expected = tv_paste(masks[subset], boxes[subset], image_size)[:, 0] > 0.5
    assert torch.equal(pasted[subset], expected)


def test_no_masks_and_shape_errors():
    empty = paste_masks_in_image(torch.zeros(0, 1, 28, 28), torch.zeros(0, 4), (20, 30))
    assert empty.shape == (0, 20, 30) and empty.dtype == torch.bool
    with pytest.raises(ValueError, match="paste_masks_in_image needs"):
        paste_masks_in_image(torch.zeros(3, 28, 28), torch.zeros(2, 4), (20, 30))
