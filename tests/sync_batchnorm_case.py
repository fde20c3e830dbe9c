"""The SyncBatchNorm2d check shared by tests/layers/test_sync_batchnorm.py (two gloo processes
started by torch.multiprocessing) and tests/cuda/gpu_training_checks.py (two processes through
detector.engine.launch, NCCL on GPUs): each step's data, the per-rank loop inside DDP, and the
comparison with nn.BatchNorm2d over the whole batch in one process."""
from typing import Dict, List, Sequence

import torch
from torch import nn


def make_steps(splits: Sequence[int], *, batch: int, channels: int, height: int, width: int):
    """(steps, weight, bias): per step an input and an upstream gradient of the whole batch,
    and the affine parameters; the same draws in every process."""
    g = torch.Generator().manual_seed(0)
    steps = [(torch.randn(batch, channels, height, width, generator=g) * 2 + 1,  # input
              torch.randn(batch, channels, height, width, generator=g))  # upstream gradient
             for _ in splits]
    weight = torch.rand(channels, generator=g) + 0.5
    bias = torch.randn(channels, generator=g)
    return steps, weight, bias


def with_affine(layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor) -> nn.Module:
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)
    return layer


def run_rank(model: nn.Module, layer: nn.Module, steps, splits: Sequence[int], rank: int,
             device: torch.device) -> Dict[str, object]:
    """This rank's rows of each step through ``model`` (DDP around the SyncBN ``layer``):
    outputs, gradients and the final running statistics, on the CPU."""
    results = []
    for (x, grad_y), split in zip(steps, splits):
        rows = slice(0, split) if rank == 0 else slice(split, None)
        x_local = x[rows].clone().to(device).requires_grad_()
        y = model(x_local)
        (y * grad_y[rows].to(device)).sum().backward()
        # DDP averages parameter gradients over the 2 processes; each loss is a partial sum
        results.append({"y": y.detach().cpu(), "x_grad": x_local.grad.cpu(),
                        "weight_grad": layer.weight.grad.cpu() * 2,
                        "bias_grad": layer.bias.grad.cpu() * 2,
                        "grad_fn": type(y.grad_fn).__name__})
        layer.zero_grad()
    return {"steps": results, "running_mean": layer.running_mean.cpu(),
            "running_var": layer.running_var.cpu(),
            "num_batches_tracked": int(layer.num_batches_tracked)}


def compare_with_whole_batch(ranks: List[Dict[str, object]], steps, splits: Sequence[int],
                             weight: torch.Tensor, bias: torch.Tensor, *, eps: float,
                             momentum: float, rtol: float, atol: float) -> float:
    """Asserts that the two ranks' outputs, gradients and running statistics equal those of
    nn.BatchNorm2d on the whole batch; returns the largest absolute difference."""
    reference = with_affine(nn.BatchNorm2d(weight.numel(), eps=eps, momentum=momentum),
                            weight, bias)
    close = dict(rtol=rtol, atol=atol)
    worst = 0.0
    for i, ((x, grad_y), split) in enumerate(zip(steps, splits)):
        x = x.clone().requires_grad_()
        y = reference(x)
        (y * grad_y).sum().backward()
        assert ranks[0]["steps"][i]["y"].shape[0] == split
        pairs = [(torch.cat([ranks[0]["steps"][i][key], ranks[1]["steps"][i][key]]), expected)
                 for key, expected in (("y", y.detach()), ("x_grad", x.grad))]
        pairs += [(rank["steps"][i][key], expected) for rank in ranks
                  for key, expected in (("weight_grad", reference.weight.grad),
                                        ("bias_grad", reference.bias.grad))]
        for got, expected in pairs:
            worst = max(worst, (got - expected).abs().max().item())
            torch.testing.assert_close(got, expected, **close)
        reference.zero_grad()
    for rank in ranks:
        assert rank["num_batches_tracked"] == len(splits)
        torch.testing.assert_close(rank["running_mean"], reference.running_mean, **close)
        torch.testing.assert_close(rank["running_var"], reference.running_var, **close)
    return worst
