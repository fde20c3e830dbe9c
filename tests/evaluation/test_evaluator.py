"""inference_on_dataset and DatasetEvaluators with a tiny fake model and list-based loaders."""
import logging

import pytest
import torch
from tiny_coco import TINY_CATEGORY_IDS, TINY_OBJECTS
from torch import nn

from detector.evaluation import (
    COCOEvaluator,
    DatasetEvaluator,
    DatasetEvaluators,
    inference_on_dataset,
)
from detector.structures import Boxes, Instances


class FakeDetector(nn.Module):
    """Predicts the ground truth of TINY_OBJECTS; records the mode it was called in."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.calls = []

    def forward(self, batched_inputs):
        out_dtype = self.linear(torch.ones(1, 4)).dtype
        self.calls.append({"training": self.training, "grad": torch.is_grad_enabled(),
                           "dtype": out_dtype, "batch": len(batched_inputs)})
        outputs = []
        for inp in batched_inputs:
            objects = TINY_OBJECTS.get(inp["image_id"], [])
            boxes = [[x, y, x + w, y + h] for _, (x, y, w, h) in objects]
            outputs.append({"instances": Instances(
                (inp["height"], inp["width"]),
                pred_boxes=Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)),
                scores=torch.full((len(objects),), 0.8),
                pred_classes=torch.tensor([TINY_CATEGORY_IDS.index(c) for c, _ in objects],
                                          dtype=torch.int64))})
        return outputs


class CountingEvaluator(DatasetEvaluator):
    def __init__(self, task="count"):
        self.task = task
        self.resets = 0

    def reset(self):
        self.resets += 1
        self.images = 0
        self.batches = 0

    def process(self, inputs, outputs):
        assert len(inputs) == len(outputs)
        self.images += len(inputs)
        self.batches += 1

    def evaluate(self):
        return {self.task: {"images": self.images, "batches": self.batches}}


def image(image_id):
    return {"image_id": image_id, "height": 120, "width": 120, "image": torch.zeros(3, 8, 8)}


def test_counts_images_and_restores_train_mode(caplog):
    model = FakeDetector().train()
    loader = [[image(i), image(i + 100)] for i in range(6)] + [[image(999)]]
    evaluator = CountingEvaluator()
    with caplog.at_level(logging.INFO, logger="detector.evaluation"):
        results = inference_on_dataset(model, loader, evaluator)
    assert results == {"count": {"images": 13, "batches": 7}}
    assert evaluator.resets == 1
    assert model.training  # restored
    assert all(not c["training"] and not c["grad"] for c in model.calls)
    assert "Total inference time" in caplog.text
    assert "after 5 warm-up batch(es)" in caplog.text and "s/img" in caplog.text


def test_keeps_eval_mode_and_restores_after_errors():
    model = FakeDetector().eval()
    inference_on_dataset(model, [[image(5)]], CountingEvaluator())
    assert not model.training

    class Broken(FakeDetector):
        def forward(self, batched_inputs):
            raise RuntimeError("boom")

    broken = Broken().train()
    with pytest.raises(RuntimeError, match="boom"):
        inference_on_dataset(broken, [[image(5)]], CountingEvaluator())
    assert broken.training


def test_amp_runs_under_bf16_autocast_on_cpu():
    model = FakeDetector()
    inference_on_dataset(model, [[image(5)]], CountingEvaluator(), amp=True)
    assert model.calls[-1]["dtype"] == torch.bfloat16
    inference_on_dataset(model, [[image(5)]], CountingEvaluator(), amp=False)
    assert model.calls[-1]["dtype"] == torch.float32


def test_loader_without_len_and_empty_loader():
    model = FakeDetector()
    generator = (batch for batch in [[image(5)], [image(9)]])
    results = inference_on_dataset(model, generator, CountingEvaluator())
    assert results["count"]["images"] == 2
    assert inference_on_dataset(model, [], CountingEvaluator())["count"]["images"] == 0
    assert inference_on_dataset(model, [[image(5)]], None) == {}


def test_dataset_evaluators_merge_and_reject_clashes():
    model = FakeDetector()
    merged = inference_on_dataset(
        model, [[image(5)]], DatasetEvaluators([CountingEvaluator("a"), CountingEvaluator("b")]))
    assert set(merged) == {"a", "b"} and merged["b"]["images"] == 1
    with pytest.raises(ValueError, match="task 'a'"):
        inference_on_dataset(
            model, [[image(5)]],
            DatasetEvaluators([CountingEvaluator("a"), CountingEvaluator("a")]))


def test_end_to_end_with_coco_evaluator(tiny_gt_json):
    evaluator = COCOEvaluator(gt_json=tiny_gt_json,
                              contiguous_id_to_dataset_id=dict(enumerate(TINY_CATEGORY_IDS)))
    loader = [[image(5), image(9)]]
    results = inference_on_dataset(FakeDetector(), loader, evaluator)
    assert results["bbox"]["AP"] == pytest.approx(100.0)
    assert results["bbox"]["AP-dog"] == pytest.approx(100.0)
