"""The evaluator interface and the inference loop that feeds it."""
import contextlib
import datetime
import logging
import time
from typing import Dict, List, Optional

import torch
from torch import nn
from tqdm import tqdm

from detector.utils import comm

__all__ = ["DatasetEvaluator", "DatasetEvaluators", "inference_on_dataset", "inference_autocast"]

logger = logging.getLogger(__name__)


class DatasetEvaluator:
    """Accumulates model outputs over a dataset and turns them into metrics.

    ``reset()`` starts a new pass, ``process(inputs, outputs)`` takes one batch (the model's input
    dicts and its outputs, in the same order), ``evaluate()`` returns
    ``{task: {metric: float}}`` (on the main process; other processes may return ``{}``).
    """

    def reset(self) -> None:
        pass

    def process(self, inputs: List[dict], outputs: List[dict]) -> None:
        raise NotImplementedError

    def evaluate(self) -> Dict[str, Dict[str, float]]:
        raise NotImplementedError


class DatasetEvaluators(DatasetEvaluator):
    """Runs several evaluators on the same outputs and merges their result dicts."""

    def __init__(self, evaluators: List[DatasetEvaluator]):
        super().__init__()
        self._evaluators = list(evaluators)

    def reset(self):
        for evaluator in self._evaluators:
            evaluator.reset()

    def process(self, inputs, outputs):
        for evaluator in self._evaluators:
            evaluator.process(inputs, outputs)

    def evaluate(self):
        results = {}
        for evaluator in self._evaluators:
            for task, metrics in (evaluator.evaluate() or {}).items():
                if task in results:
                    raise ValueError(f"Two evaluators both report results for task '{task}'")
                results[task] = metrics
        return results


def inference_autocast(device: torch.device, enabled: bool):
    """The autocast context of inference with AMP on ``device`` (a no-op when not ``enabled``)."""
    if not enabled:
        return contextlib.nullcontext()
    # fp16 on CUDA, bf16 on CPU (CPU autocast has no fp16 kernels for most ops)
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _synchronize_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _fmt_seconds(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(seconds)))


def inference_on_dataset(model: nn.Module, data_loader, evaluator: Optional[DatasetEvaluator], *,
                         amp: bool = False) -> dict:
    """Run ``model`` on every batch of ``data_loader``, feed ``evaluator``, return its results.

    The model runs in eval mode under ``torch.no_grad()`` (its previous mode is restored
    afterwards), optionally under autocast (``amp``). Seconds per image are measured after the
    first few warm-up batches, split into data loading, model and evaluator time, and logged.
    Returns ``evaluator.evaluate()`` (``{}`` when it returns None, e.g. on non-main processes).
    """
    if evaluator is None:
        evaluator = DatasetEvaluators([])
    elif isinstance(evaluator, (list, tuple)):
        evaluator = DatasetEvaluators(list(evaluator))
    try:
        total = len(data_loader)
    except TypeError:
        total = None
    num_warmup = min(5, total - 1) if total else 5
    device = comm.model_device(model)
    world = comm.get_world_size()
    logger.info("Start inference on %s batches (%d process(es))",
                total if total is not None else "an unknown number of", world)
    evaluator.reset()

    was_training = model.training
    model.eval()
    num_images = 0
    timed_images = 0
    warmup_used = 0
    data_time = compute_time = eval_time = 0.0
    start = time.perf_counter()
    timed_start = start
    try:
        with torch.no_grad(), tqdm(total=total, desc="inference", unit="batch",
                                   disable=not comm.is_main_process(), dynamic_ncols=True) as bar:
            data_start = time.perf_counter()
            for idx, inputs in enumerate(data_loader):
                if idx == num_warmup:  # restart the clocks once warm-up is over
                    data_time = compute_time = eval_time = 0.0
                    timed_images = 0
                    timed_start = data_start
                    warmup_used = num_warmup
                tic = time.perf_counter()
                data_time += tic - data_start
                with inference_autocast(device, amp):
                    outputs = model(inputs)
                _synchronize_device(device)
                toc = time.perf_counter()
                compute_time += toc - tic
                evaluator.process(inputs, outputs)
                data_start = time.perf_counter()
                eval_time += data_start - toc
                num_images += len(inputs)
                timed_images += len(inputs)
                bar.update(1)
    finally:
        model.train(was_training)

    total_time = time.perf_counter() - start
    logger.info("Total inference time: %s for %d images (%.4f s/img per process)",
                _fmt_seconds(total_time), num_images, total_time / max(num_images, 1))
    if timed_images:
        timed_total = time.perf_counter() - timed_start
        logger.info(
            "Inference speed over %d images after %d warm-up batch(es): %.4f s/img per process "
            "(model %.4f, data loading %.4f, evaluator %.4f)", timed_images, warmup_used,
            timed_total / timed_images, compute_time / timed_images, data_time / timed_images,
            eval_time / timed_images)
    else:
        logger.warning("inference_on_dataset: the data loader gave no images")

    results = evaluator.evaluate()
    return results if results is not None else {}
