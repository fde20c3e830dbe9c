"""The bodies of the GPU checks of training (fp16 with a GradScaler, SyncBN over NCCL) and of
the benchmark, each taking the device (or process-group backend) it checks.

The tests in tests/cuda (marked ``cuda``) call them with "cuda"; tests/tools/test_gpu_check.py
calls them with "cpu" (gloo for SyncBN), so the same code is known to run and pass on the CPU
too. Imported by name: tests/cuda is on sys.path for its tests.
"""
import json
import math
import os
import subprocess
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from detector.engine import DefaultTrainer, default_argument_parser, launch, setup_cfg
from detector.engine.hooks import CallbackHook
from detector.layers import SyncBatchNorm2d
from detector.utils import comm

import process_watchdog
from sync_batchnorm_case import compare_with_whole_batch, make_steps, run_rank, with_affine

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RETINANET_DEMO = os.path.join(ROOT, "configs", "demo", "retinanet_tiny_shapes.yaml")
WATCHDOG_S = 240


def watchdog(seconds=WATCHDOG_S):
    """:func:`process_watchdog.watchdog` with this module's bound."""
    return process_watchdog.watchdog(seconds)


# ------------------------------------------------------------------------------------------
# Mixed-precision training through DefaultTrainer
# ------------------------------------------------------------------------------------------
AMP_ITERS = 30


def amp_training_cfg(device, out_dir, max_iter=AMP_ITERS):
    """The RetinaNet demo shrunk (64 px, few channels, no flip, no workers) with
    SOLVER.AMP.ENABLED on ``device``."""
    opts = [
        "MODEL.DEVICE", device, "SOLVER.AMP.ENABLED", "True",
        "MODEL.TINYNET.CHANNELS", "[8, 16, 16, 32, 32]", "MODEL.NECK.OUT_CHANNELS", "32",
        "MODEL.GN.NUM_GROUPS", "8", "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64",
        "INPUT.RANDOM_FLIP", "none", "DATALOADER.NUM_WORKERS", "0", "SOLVER.IMS_PER_BATCH", "4",
        "SOLVER.BASE_LR", "0.02", "SOLVER.WARMUP_ITERS", "0", "SOLVER.MAX_ITER", str(max_iter),
        "SOLVER.CHECKPOINT_PERIOD", "1000", "DATASETS.TEST", "()", "SEED", "7",
        "LOG_PERIOD", "100", "OUTPUT_DIR", str(out_dir),
    ]
    return setup_cfg(default_argument_parser().parse_args(["--config-file", RETINANET_DEMO]
                                                          + opts))


def check_amp_training(device, out_dir):
    """Train the tiny RetinaNet with SOLVER.AMP.ENABLED through DefaultTrainer on ``device``:
    float16 convolutions with a GradScaler on CUDA (bfloat16 without one on CPU), float32
    weights, finite falling losses, and the scaler's state restored by a resume from the final
    checkpoint."""
    cfg = amp_training_cfg(device, out_dir)
    trainer = DefaultTrainer(cfg)
    trainer.resume_or_load(resume=False)
    step_trainer = trainer.checkpointer.checkpointables["trainer"]
    cuda = torch.device(device).type == "cuda"
    expected_dtype = torch.float16 if cuda else torch.bfloat16
    assert type(step_trainer).__name__ == "AMPTrainer"
    assert step_trainer.amp_dtype == expected_dtype
    assert (step_trainer.grad_scaler is not None) == cuda

    conv_dtypes, losses = set(), []
    convs = [m for m in trainer.model.modules() if isinstance(m, nn.Conv2d)]
    handles = [m.register_forward_hook(lambda m, i, out: conv_dtypes.add(out.dtype))
               for m in convs]
    trainer.register_hooks([CallbackHook(
        after_step=lambda t: losses.append(t.storage.latest()["total_loss"][0]))])
    try:
        trainer.train()
    finally:
        for h in handles:
            h.remove()

    assert conv_dtypes == {expected_dtype}, conv_dtypes
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    assert len(losses) == AMP_ITERS and all(math.isfinite(x) for x in losses), losses
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.8 * first, losses

    saved = torch.load(os.path.join(out_dir, "model_final.pth"), weights_only=True)
    resumed = DefaultTrainer(cfg)
    resumed_scaler = resumed.checkpointer.checkpointables["trainer"].grad_scaler
    if not cuda:
        assert "grad_scaler" not in saved["trainer"] and resumed_scaler is None
        resumed.resume_or_load(resume=True)
        assert resumed.start_iter == AMP_ITERS
        return losses
    scaler = step_trainer.grad_scaler
    state, fresh = scaler.state_dict(), resumed_scaler.state_dict()
    assert math.isfinite(scaler.get_scale()) and scaler.get_scale() > 0, state
    # update() ran: either steps without overflow were counted or an overflow lowered the scale
    assert state["_growth_tracker"] > 0 or state["scale"] < fresh["scale"], (state, fresh)
    assert saved["trainer"]["grad_scaler"] == state
    assert fresh != state  # so that the load below shows
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == AMP_ITERS
    assert resumed_scaler.state_dict() == state
    return losses


# ------------------------------------------------------------------------------------------
# SyncBatchNorm2d over two processes started by detector.engine.launch
# ------------------------------------------------------------------------------------------
SYNC_CHANNELS, SYNC_EPS, SYNC_MOMENTUM = 4, 1e-5, 0.3
# rows of the 6-image global batch held by rank 0 at each step (rank 1 holds the rest)
SYNC_SPLITS = [3, 1, 4]
SYNC_TOLERANCE = 1e-5


def _sync_batchnorm_data():
    return make_steps(SYNC_SPLITS, batch=6, channels=SYNC_CHANNELS, height=5, width=7)


def sync_batchnorm_worker(out_dir):
    """Run by ``launch`` in every process: SyncBatchNorm2d inside DDP on this rank's rows of
    each step's batch (the rank's GPU under NCCL, else the CPU); saves outputs, gradients and
    running statistics to ``out_dir``/rank<r>.pt."""
    rank, backend = comm.get_rank(), dist.get_backend()
    device = (torch.device("cuda", comm.get_local_rank()) if backend == "nccl"
              else torch.device("cpu"))
    steps, weight, bias = _sync_batchnorm_data()
    layer = with_affine(SyncBatchNorm2d(SYNC_CHANNELS, eps=SYNC_EPS, momentum=SYNC_MOMENTUM),
                        weight, bias).to(device)
    model = DistributedDataParallel(
        layer, device_ids=[device.index] if device.type == "cuda" else None)
    result = run_rank(model, layer, steps, SYNC_SPLITS, rank, device)
    torch.save({"backend": backend, "device": str(device), **result},
               os.path.join(out_dir, f"rank{rank}.pt"))


def check_sync_batchnorm(out_dir, expected_backend):
    """Two processes through ``detector.engine.launch`` (NCCL on 2 GPUs, else gloo): SyncBN's
    outputs, input and parameter gradients and running statistics equal nn.BatchNorm2d's over
    the whole batch in this process (uneven splits, one rank with a single image). On NCCL the
    fused CUDA kernel must be the one that ran."""
    with watchdog():
        launch(sync_batchnorm_worker, 2, args=(str(out_dir),), timeout_minutes=2)
    ranks = [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=True)
             for r in range(2)]
    assert [r["backend"] for r in ranks] == [expected_backend] * 2
    fused = {s["grad_fn"] == "SyncBatchNormBackward" for r in ranks for s in r["steps"]}
    if expected_backend == "nccl":
        assert [r["device"] for r in ranks] == ["cuda:0", "cuda:1"]
        assert fused == {True}  # torch's SyncBatchNorm kernel, not the all-reduce fallback
    else:
        assert fused == {False}

    steps, weight, bias = _sync_batchnorm_data()
    # sums over 210 values per channel: float32 rounding grows with their magnitude
    compare_with_whole_batch(ranks, steps, SYNC_SPLITS, weight, bias, eps=SYNC_EPS,
                             momentum=SYNC_MOMENTUM, rtol=SYNC_TOLERANCE, atol=SYNC_TOLERANCE)


# ------------------------------------------------------------------------------------------
# The benchmark
# ------------------------------------------------------------------------------------------
BENCHMARK_TIMEOUT_S = 600


def benchmark_command(device, json_file):
    """tools/benchmark.py timing the RetinaNet demo config alone on ``device`` (peak memory
    included: on CUDA, max_memory_allocated in a fresh process)."""
    return [sys.executable, os.path.join(ROOT, "tools", "benchmark.py"),
            "--config-file", RETINANET_DEMO, "--size", "128", "--iters", "2", "--warmup", "1",
            "--threads", "1", "--device", device, "--json", str(json_file)]


def check_benchmark(device, out_dir):
    """The benchmark command on ``device`` exits 0 and writes positive figures; returns them."""
    out = os.path.join(out_dir, "bench.json")
    done = subprocess.run(benchmark_command(device, out), capture_output=True, text=True,
                          cwd=ROOT, timeout=BENCHMARK_TIMEOUT_S)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with open(out) as f:
        rows = json.load(f)[RETINANET_DEMO]
    for metric in ("inference_ms_per_img", "train_img_per_s", "train_forward_ms",
                   "train_backward_ms", "peak_MB_inference", "peak_MB_train"):
        assert rows[metric] > 0, (metric, rows)
    return rows
