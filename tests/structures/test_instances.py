"""Instances: equal-length fields, indexing, concatenation and the errors on misuse."""
import pytest
import torch

from detector.structures import Boxes, Instances


def _instances(n, offset=0, size=(20, 30)):
    boxes = Boxes(torch.arange(offset, offset + 4 * n, dtype=torch.float32).reshape(n, 4))
    return Instances(size, gt_boxes=boxes, gt_classes=torch.arange(offset, offset + n),
                     names=[f"obj{offset + i}" for i in range(n)])


def test_fields_len_get_set_has_remove():
    inst = _instances(3)
    assert len(inst) == 3 and inst.image_size == (20, 30)
    assert inst.has("gt_classes") and inst.get("gt_classes").tolist() == [0, 1, 2]
    inst.scores = torch.tensor([0.5, 0.25, 0.125])
    assert inst.get_fields().keys() == {"gt_boxes", "gt_classes", "names", "scores"}
    inst.remove("names")
    assert not inst.has("names")
    assert len(Instances((4, 4))) == 0


def test_field_of_another_length_or_missing_field_is_an_error():
    inst = _instances(3)
    with pytest.raises(ValueError, match="field 'scores' of length 2 to Instances of length 3"):
        inst.scores = torch.zeros(2)
    with pytest.raises(AttributeError, match="Cannot find field 'pred_boxes'"):
        inst.pred_boxes
    assert not inst.has("scores")


def test_indexing_by_int_slice_and_mask_keeps_fields_aligned():
    inst = _instances(4)
    last = inst[-1]
    assert len(last) == 1 and last.gt_classes.tolist() == [3] and last.names == ["obj3"]
    assert last.gt_boxes.tensor.tolist() == [[12, 13, 14, 15]]
    inst.remove("names")  # a list field takes ints and slices, not tensor masks
    picked = inst[torch.tensor([True, False, True, False])]
    assert picked.gt_classes.tolist() == [0, 2]
    assert picked.gt_boxes.tensor[:, 0].tolist() == [0, 8] and picked.image_size == (20, 30)
    assert inst[1:3].gt_classes.tolist() == [1, 2]
    with pytest.raises(IndexError):
        inst[4]
    with pytest.raises(NotImplementedError):
        iter(inst)


def test_cat_joins_tensors_boxes_and_lists_in_order():
    joined = Instances.cat([_instances(2), _instances(1, offset=10)])
    assert len(joined) == 3
    assert joined.gt_classes.tolist() == [0, 1, 10]
    assert joined.names == ["obj0", "obj1", "obj10"]
    assert isinstance(joined.gt_boxes, Boxes)
    assert joined.gt_boxes.tensor[:, 0].tolist() == [0, 4, 10]


def test_cat_rejects_different_image_sizes_and_unsupported_fields():
    with pytest.raises(ValueError, match="same image size"):
        Instances.cat([_instances(1), _instances(1, size=(21, 30))])
    odd = [Instances((2, 2), meta=(1,)), Instances((2, 2), meta=(2,))]
    with pytest.raises(ValueError, match="Unsupported type <class 'tuple'>"):
        Instances.cat(odd)


def test_to_moves_tensor_fields_and_keeps_the_rest():
    inst = _instances(2).to("cpu")
    assert inst.gt_boxes.device.type == "cpu" and inst.names == ["obj0", "obj1"]
