"""ImageList pads images bottom/right to a common, optionally divisible, size."""
import pytest
import torch

from detector.structures import ImageList


def _image(c, h, w, start):
    return torch.arange(start, start + c * h * w, dtype=torch.float32).reshape(c, h, w)


def test_padding_to_size_divisibility_keeps_each_image_top_left():
    a, b = _image(3, 5, 7, 1), _image(3, 9, 4, 1000)
    images = ImageList.from_tensors([a, b], size_divisibility=4, pad_value=-1.0)
    # max (9, 7) rounded up to multiples of 4
    assert images.tensor.shape == (2, 3, 12, 8)
    assert images.image_sizes == [(5, 7), (9, 4)]
    assert torch.equal(images.tensor[0, :, :5, :7], a)
    assert torch.equal(images.tensor[1, :, :9, :4], b)
    assert (images.tensor[0, :, 5:, :] == -1).all() and (images.tensor[0, :, :, 7:] == -1).all()
    assert (images.tensor[1, :, 9:, :] == -1).all() and (images.tensor[1, :, :, 4:] == -1).all()
    assert torch.equal(images[0], a) and torch.equal(images[1], b) and len(images) == 2


def test_single_image_and_no_divisibility():
    a = _image(1, 6, 10, 0)
    images = ImageList.from_tensors([a], size_divisibility=8)
    assert images.tensor.shape == (1, 1, 8, 16)
    assert torch.equal(images.tensor[0, :, :6, :10], a)
    assert images.tensor[0, :, 6:].abs().sum() == 0 and images.tensor[0, :, :, 10:].abs().sum() == 0
    plain = ImageList.from_tensors([a, _image(1, 3, 11, 0)])
    assert plain.tensor.shape == (2, 1, 6, 11)  # size_divisibility 0: just the largest extent


def test_sizes_already_divisible_are_not_padded_further():
    images = ImageList.from_tensors([_image(2, 16, 32, 0), _image(2, 32, 16, 0)],
                                    size_divisibility=16)
    assert images.tensor.shape == (2, 2, 32, 32)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="at least one image"):
        ImageList.from_tensors([])
    with pytest.raises(ValueError, match=r"equal C, got \(1, 4, 4\)"):
        ImageList.from_tensors([_image(3, 4, 4, 0), _image(1, 4, 4, 0)])
    with pytest.raises(ValueError, match=r"got \(4, 4\)"):
        ImageList.from_tensors([torch.zeros(4, 4)])
