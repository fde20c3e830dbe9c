"""COCOEvaluator gathers predictions from two gloo processes to rank 0."""
import json
import os

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp
from tiny_coco import TINY_CATEGORY_IDS, prediction

from detector.evaluation import COCOEvaluator


def _worker(rank, init_file, gt_json, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        evaluator = COCOEvaluator(gt_json=gt_json, output_dir=out_dir,
                                  contiguous_id_to_dataset_id=dict(enumerate(TINY_CATEGORY_IDS)))
        image_id = [5, 9][rank]  # each rank sees one image
        evaluator.process([{"image_id": image_id}], [prediction(image_id)])
        results = evaluator.evaluate()
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
    finally:
        dist.destroy_process_group()


def test_two_process_gather(tiny_gt_json, tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), tiny_gt_json, str(tmp_path)), nprocs=2)
    rank0 = json.loads((tmp_path / "rank0.json").read_text())
    rank1 = json.loads((tmp_path / "rank1.json").read_text())
    assert rank1 == {}
    # bird is only in image 9, which only rank 1 processed
    assert rank0["bbox"]["AP-bird"] == pytest.approx(100.0)
    assert rank0["bbox"]["AP"] == pytest.approx(100.0)
    records = json.loads((tmp_path / "coco_instances_results.json").read_text())
    assert sorted({r["image_id"] for r in records}) == [5, 9]
