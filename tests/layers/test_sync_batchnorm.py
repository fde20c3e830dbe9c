"""SyncBatchNorm2d over two gloo processes (inside DistributedDataParallel, on CPU) equals
nn.BatchNorm2d over the whole batch in one process."""
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from detector.layers import SyncBatchNorm2d

from sync_batchnorm_case import compare_with_whole_batch, make_steps, run_rank, with_affine

CHANNELS, EPS, MOMENTUM = 3, 1e-5, 0.3
# rows of the global batch held by rank 0 at each step (rank 1 holds the rest); step 1 is uneven
SPLITS = [2, 3]
TIMEOUT_S = 120


def _data():
    return make_steps(SPLITS, batch=4, channels=CHANNELS, height=5, width=3)


def _worker(rank, init_file, out_file):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=60))
    try:
        steps, weight, bias = _data()
        layer = with_affine(SyncBatchNorm2d(CHANNELS, eps=EPS, momentum=MOMENTUM), weight, bias)
        model = DistributedDataParallel(layer)  # refuses nn.SyncBatchNorm on CPU
        torch.save(run_rank(model, layer, steps, SPLITS, rank, torch.device("cpu")),
                   f"{out_file}{rank}.pt")
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
    worst = compare_with_whole_batch(ranks, steps, SPLITS, weight, bias, eps=EPS,
                                     momentum=MOMENTUM, rtol=0, atol=1e-5)
    print(f"SyncBN on 2 gloo processes vs BN on the whole batch: max abs difference of outputs "
          f"and gradients {worst:.2e}")
