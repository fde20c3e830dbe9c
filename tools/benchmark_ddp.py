#!/usr/bin/env python
"""Training speed: one process vs N data-parallel processes (same total batch), and bf16/fp16
AMP vs fp32 in one process. Prints seconds per iteration and ratios.

    python tools/benchmark_ddp.py                                    # tiny demo config, 2 procs
    python tools/benchmark_ddp.py --iters 40 --num-procs 2 SOLVER.IMS_PER_BATCH 8

Every run is the standard DefaultTrainer (data loading, forward, backward, all-reduce, optimizer
step) without evaluation; the first ``--warmup`` iterations are not timed. On CPU each of the N
processes gets cores/N threads (as torchrun would); single-process runs are timed with all cores
and with one thread, which tells the gain of data parallelism from that of fewer threads.
"""
import argparse
import json
import os
import tempfile
import time

import torch

from detector.engine import DefaultTrainer, default_argument_parser, launch, setup_cfg
from detector.engine.hooks import CallbackHook
from detector.utils import comm
from detector.utils.logger import setup_logger

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              "configs", "demo", "retinanet_tiny_shapes.yaml")


def timed_training(train_args, warmup: int, result_path: str, threads=None) -> None:
    """Main function of one run (every rank): train and write rank 0's seconds per iteration.
    ``threads``: intra-op threads of this process (None: leave as set by the launcher)."""
    if threads:
        torch.set_num_threads(threads)
    cfg = setup_cfg(train_args)
    setup_logger(None, distributed_rank=comm.get_rank(), name="detector")
    torch.manual_seed(cfg.SEED)
    trainer = DefaultTrainer(cfg)
    step_seconds = []
    starts = {}
    trainer.register_hooks([CallbackHook(
        before_step=lambda t: starts.__setitem__("t", time.perf_counter()),
        after_step=lambda t: step_seconds.append(time.perf_counter() - starts["t"]),
    )])
    trainer.train()
    timed = step_seconds[warmup:]
    if comm.is_main_process():
        with open(result_path, "w") as f:
            json.dump({"seconds_per_iter": sum(timed) / len(timed), "iters": len(timed),
                       "threads": torch.get_num_threads()}, f)


def _run(name, num_procs, threads, opts, args, tmp):
    result_path = os.path.join(tmp, f"{name}.json")
    train_args = default_argument_parser().parse_args(
        ["--config-file", args.config_file] + opts + [
            "SOLVER.MAX_ITER", str(args.warmup + args.iters), "DATASETS.TEST", "()",
            "SOLVER.CHECKPOINT_PERIOD", str(10 ** 9), "LOG_PERIOD", str(10 ** 9),
            "OUTPUT_DIR", os.path.join(tmp, name)] + args.opts)
    print(f"running {name} ...", flush=True)
    before = torch.get_num_threads()
    try:
        launch(timed_training, num_procs, args=(train_args, args.warmup, result_path, threads))
    finally:
        torch.set_num_threads(before)
    with open(result_path) as f:
        return json.load(f)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-file", default=DEFAULT_CONFIG)
    parser.add_argument("--num-procs", type=int, default=2, help="processes of the DDP run")
    parser.add_argument("--iters", type=int, default=20, help="timed iterations per run")
    parser.add_argument("--warmup", type=int, default=5, help="untimed first iterations")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE")
    args = parser.parse_args(argv)
    cfg = setup_cfg(default_argument_parser().parse_args(
        ["--config-file", args.config_file] + args.opts))
    batch = cfg.SOLVER.IMS_PER_BATCH
    if batch % args.num_procs:
        raise SystemExit(f"benchmark_ddp.py: error: SOLVER.IMS_PER_BATCH={batch} is not "
                         f"divisible by --num-procs {args.num_procs}")
    amp_name = "fp16 AMP" if torch.cuda.is_available() else "bf16 AMP"
    fp32, amp = ["SOLVER.AMP.ENABLED", "False"], ["SOLVER.AMP.ENABLED", "True"]
    cores = torch.get_num_threads()
    runs = [  # (label, processes, threads of a single process, extra config)
        ("fp32, 1 process", 1, cores, fp32),
        (f"fp32, {args.num_procs} processes (DDP)", args.num_procs, None, fp32),
        (f"{amp_name}, 1 process", 1, cores, amp),
    ]
    if cores > 1:  # separates the gain of DDP from that of fewer threads per process
        runs += [("fp32, 1 process", 1, 1, fp32), (f"{amp_name}, 1 process", 1, 1, amp)]
    results = []
    with tempfile.TemporaryDirectory(prefix="benchmark_ddp-") as tmp:
        for i, (label, procs, threads, opts) in enumerate(runs):
            results.append((label, procs, _run(f"run{i}", procs, threads, opts, args, tmp)))

    base = results[0][2]["seconds_per_iter"]  # speed-ups are relative to fp32, 1 process
    print(f"\n{os.path.basename(args.config_file)}: total batch {batch}, {args.iters} timed "
          f"iterations after {args.warmup} warm-up, {os.cpu_count()} CPU core(s), "
          f"CUDA {'yes' if torch.cuda.is_available() else 'no'}")
    header = (f"{'run':<28} {'procs':>5} {'img/proc':>8} {'threads':>7} {'s/iter':>8} "
              f"{'img/s':>7} {'speed-up':>8}")
    print(header)
    print("-" * len(header))
    for label, procs, r in results:
        s = r["seconds_per_iter"]
        print(f"{label:<28} {procs:>5} {batch // procs:>8} {r['threads']:>7} {s:>8.4f} "
              f"{batch / s:>7.1f} {base / s:>7.2f}x")
    return results


if __name__ == "__main__":
    main()
