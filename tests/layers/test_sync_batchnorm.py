"""SyncBatchNorm2d over two gloo processes (inside DistributedDataParallel, on CPU) equals
nn.BatchNorm2d over the whole batch in one process."""
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from detector.layers import SyncBatchNorm2d

CHANNELS, EPS, MOMENTUM = 3, 1e-5, 0.3
# rows of the global batch held by rank 0 at each step (rank 1 holds the rest); step 1 is uneven
SPLITS = [2, 3]
TIMEOUT_S = 120


def _data():
    g = torch.Generator().manual_seed(0)
    steps = [(torch.randn(4, CHANNELS, 5, 3, generator=g) * 2 + 1,  # input
              torch.randn(4, CHANNELS, 5, 3, generator=g))  # upstream gradient
             for _ in SPLITS]
    weight = torch.rand(CHANNELS, generator=g) + 0.5
    bias = torch.randn(CHANNELS, generator=g)
    return steps, weight, bias


def _init_affine(layer, weight, bias):
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)
    return layer


def _worker(rank, init_file, out_file):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=60))
    try:
        steps, weight, bias = _data()
        layer = _init_affine(SyncBatchNorm2d(CHANNELS, eps=EPS, momentum=MOMENTUM), weight, bias)
        model = DistributedDataParallel(layer)  # refuses nn.SyncBatchNorm on CPU
        results = []
        for (x, grad_y), split in zip(steps, SPLITS):
            rows = slice(0, split) if rank == 0 else slice(split, None)
            x_local = x[rows].clone().requires_grad_()
            y = model(x_local)
            (y * grad_y[rows]).sum().backward()
            # DDP averages parameter gradients over the 2 processes; each loss is a partial sum
            weight_grad, bias_grad = layer.weight.grad * 2, layer.bias.grad * 2
            results.append({"y": y.detach(), "x_grad": x_local.grad, "weight_grad": weight_grad,
                            "bias_grad": bias_grad})
            layer.zero_grad()
        torch.save({"steps": results, "running_mean": layer.running_mean,
                    "running_var": layer.running_var}, f"{out_file}{rank}.pt")
    finally:
        dist.destroy_process_group()


def _run_two_processes(tmp_path):
    context = mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path / "rank")), nprocs=2,
                       join=False)
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=max(0.0, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            pytest.fail(f"SyncBatchNorm2d workers did not finish within {TIMEOUT_S} s")
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]


def test_two_gloo_processes_match_batchnorm_on_the_whole_batch(tmp_path):
    ranks = _run_two_processes(tmp_path)

    steps, weight, bias = _data()
    reference = _init_affine(nn.BatchNorm2d(CHANNELS, eps=EPS, momentum=MOMENTUM), weight, bias)
    worst = 0.0
    for i, ((x, grad_y), split) in enumerate(zip(steps, SPLITS)):
        x = x.clone().requires_grad_()
        y = reference(x)
        (y * grad_y).sum().backward()
        got = {k: torch.cat([ranks[0]["steps"][i][k], ranks[1]["steps"][i][k]])
               for k in ("y", "x_grad")}
        assert ranks[0]["steps"][i]["y"].shape[0] == split
        worst = max(worst, (got["y"] - y.detach()).abs().max().item(),
                    (got["x_grad"] - x.grad).abs().max().item(),
                    *[(r["steps"][i][k] - getattr(reference, k[:-5]).grad).abs().max().item()
                      for r in ranks for k in ("weight_grad", "bias_grad")])
        torch.testing.assert_close(got["y"], y.detach(), rtol=0, atol=1e-5)
        torch.testing.assert_close(got["x_grad"], x.grad, rtol=0, atol=1e-5)
        for rank in ranks:
            torch.testing.assert_close(rank["steps"][i]["weight_grad"], reference.weight.grad,
                                       rtol=0, atol=1e-5)
            torch.testing.assert_close(rank["steps"][i]["bias_grad"], reference.bias.grad,
                                       rtol=0, atol=1e-5)
        reference.zero_grad()
    print(f"SyncBN on 2 gloo processes vs BN on the whole batch: max abs difference of outputs "
          f"and gradients {worst:.2e}")
    for rank in ranks:
        torch.testing.assert_close(rank["running_mean"], reference.running_mean, rtol=0,
                                   atol=1e-5)
        torch.testing.assert_close(rank["running_var"], reference.running_var, rtol=0, atol=1e-5)
