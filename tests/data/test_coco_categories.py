"""The one COCO category table and the facts derived from it."""
from torchvision.models._meta import _COCO_CATEGORIES as TORCHVISION_COCO_NAMES

from detector.data import MetadataCatalog
from detector.data.datasets import (
    COCO_CATEGORIES,
    COCO_CATEGORY_IDS,
    COCO_CATEGORY_NAMES,
    EFFDET_COCO80_INDICES,
    TORCHVISION_COCO80_INDICES,
    coco80_head_indices,
    coco_metadata,
)


def test_table_has_80_increasing_ids_in_1_to_90_and_unique_names():
    assert len(COCO_CATEGORIES) == 80 and len(set(COCO_CATEGORY_NAMES)) == 80
    assert list(COCO_CATEGORY_IDS) == sorted(set(COCO_CATEGORY_IDS))
    assert COCO_CATEGORY_IDS[0] == 1 and COCO_CATEGORY_IDS[-1] == 90
    # the ten ids COCO left unused
    assert sorted(set(range(1, 91)) - set(COCO_CATEGORY_IDS)) == [12, 26, 29, 30, 45, 66, 68, 69,
                                                                  71, 83]
    assert COCO_CATEGORIES[0] == (1, "person") and COCO_CATEGORIES[-1] == (90, "toothbrush")


def test_torchvision_head_layout_names_the_same_categories():
    # torchvision's 91 slot names: background at 0, "N/A" at the unused ids
    assert len(TORCHVISION_COCO_NAMES) == 91
    assert [TORCHVISION_COCO_NAMES[i] for i in TORCHVISION_COCO80_INDICES] == \
        list(COCO_CATEGORY_NAMES)
    unused = set(range(91)) - set(TORCHVISION_COCO80_INDICES)
    assert {TORCHVISION_COCO_NAMES[i] for i in unused} == {"__background__", "N/A"}


def test_effdet_layout_is_shifted_by_one():
    assert EFFDET_COCO80_INDICES == tuple(i - 1 for i in TORCHVISION_COCO80_INDICES)
    assert EFFDET_COCO80_INDICES[:12] == (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12)
    assert max(EFFDET_COCO80_INDICES) == 89 and coco80_head_indices(0) == COCO_CATEGORY_IDS


def test_registered_coco_datasets_use_the_table():
    meta = coco_metadata()
    assert meta["thing_dataset_id_to_contiguous_id"][13] == 11  # stop sign, after the gap at 12
    assert meta["thing_contiguous_id_to_dataset_id"][79] == 90
    for name in ("coco_2017_val", "coco_2014_minival", "coco128"):
        registered = MetadataCatalog.get(name)
        assert registered.thing_classes == list(COCO_CATEGORY_NAMES)
        assert registered.thing_dataset_id_to_contiguous_id == meta[
            "thing_dataset_id_to_contiguous_id"]
