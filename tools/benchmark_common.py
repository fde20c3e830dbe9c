"""Timing, reporting, command-line options and reference-model set-up shared by tools/benchmark.py,
tools/benchmark_effdet.py and tools/benchmark_maskrcnn.py (and the tests that build model pairs).

Run as a program (``benchmark_common.py --memory-case SPEC``) it is the fresh process that
measures the peak memory of one case, see :func:`peak_memory_mb`."""
import argparse
import importlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

__all__ = ["amp_context", "amp_fn", "amp_rows", "conv_peak_gflops", "stage_breakdown", "print_breakdown",
           "STAGES", "time_one", "time_pair", "train_step", "TrainStep", "phase_ms", "profile", "speed_rows",
           "detail_rows", "print_rows", "write_json", "add_timing_args", "randomize_batchnorms",
           "freeze_like_released_detection_weights", "inference_macs", "peak_memory_mb",
           "infer_fn", "load_weights_for_case", "save_weights_for_case", "pair_peak_memory"]

Rows = Dict[str, Tuple[float, float, float]]


def time_pair(fn_a: Callable, fn_b: Callable, iters: int, warmup: int) -> Tuple[float, float]:
    """Median seconds of two functions, run alternately so machine noise hits both alike, and
    in turns first (a b, b a, a b, ...) so that neither always runs in the state the other
    leaves behind (its caches, its freed heap)."""
    for _ in range(warmup):
        fn_a()
        fn_b()
    samples_a, samples_b = [], []
    for i in range(iters):
        pair = ((fn_a, samples_a), (fn_b, samples_b))
        for fn, samples in (pair if i % 2 == 0 else pair[::-1]):
            start = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - start)
    return statistics.median(samples_a), statistics.median(samples_b)


def _synchronize() -> None:
    # CUDA kernels run asynchronously: a phase ends when its kernels have
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


class TrainStep:
    """One optimizer step on the summed losses of ``forward()`` (or its "loss" entry, as
    effdet's bench returns) when called; each call appends its (forward, backward, optimizer)
    seconds to ``phases``."""

    def __init__(self, optimizer: torch.optim.Optimizer, forward: Callable[[], Dict]):
        self.optimizer, self.forward = optimizer, forward
        self.phases: List[Tuple[float, float, float]] = []

    def __call__(self) -> None:
        start = time.perf_counter()
        losses = self.forward()
        total = losses["loss"] if "loss" in losses else sum(losses.values())
        _synchronize()
        forward_done = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        _synchronize()
        backward_done = time.perf_counter()
        self.optimizer.step()
        _synchronize()
        self.phases.append((forward_done - start, backward_done - forward_done,
                            time.perf_counter() - backward_done))


def train_step(optimizer: torch.optim.Optimizer, forward: Callable[[], Dict]) -> TrainStep:
    """A ``TrainStep``: callable, doing one optimizer step and timing its phases."""
    return TrainStep(optimizer, forward)


def phase_ms(step: TrainStep, iters: int) -> Tuple[float, float]:
    """Median forward and backward milliseconds of the last ``iters`` calls of ``step`` (the
    timed ones, after the warm-up)."""
    timed = step.phases[-iters:]
    return (statistics.median(p[0] for p in timed) * 1000,
            statistics.median(p[1] for p in timed) * 1000)


def infer_fn(model: nn.Module, inputs) -> Callable[[], None]:
    """A function running ``model(inputs)`` without gradients."""
    def run():
        with torch.no_grad():
            model(inputs)
    return run


def without_instances(inputs: List[dict]) -> List[dict]:
    """Our model inputs without their ground truth (for inference)."""
    return [{k: v for k, v in d.items() if k != "instances"} for d in inputs]


def torchvision_style_case(model: nn.Module, side: str, mode: str, images, tv_targets,
                           our_inputs) -> Callable[[], object]:
    """What a memory case of a torchvision comparison runs: inference (``mode``
    "inference") or one SGD step of torchvision's model (``side`` "reference", on ``images``
    and ``tv_targets``) or of ours (on ``our_inputs``)."""
    if mode == "inference":
        model.eval()
        return infer_fn(model, images if side == "reference" else without_instances(our_inputs))
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    if side == "reference":
        return train_step(optimizer, lambda: model(images, tv_targets))
    return train_step(optimizer, lambda: model(our_inputs))


def profile(name: str, fn: Callable, rows: int = 25) -> None:
    """Print the ops of one call of ``fn`` that take the most CPU time."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    fn()
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    print(f"=== {name}")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def speed_rows(infer_seconds: Tuple[float, float], infer_batch: int,
               train_seconds: Tuple[float, float], train_batch: int) -> Rows:
    """{"inference_ms_per_img", "train_img_per_s"} -> (reference, ours, ratio ours-faster > 1)
    from the (reference, ours) seconds per batch."""
    (ref_inf, our_inf), (ref_train, our_train) = infer_seconds, train_seconds
    return {
        "inference_ms_per_img": (ref_inf * 1000 / infer_batch, our_inf * 1000 / infer_batch,
                                 ref_inf / our_inf),
        "train_img_per_s": (train_batch / ref_train, train_batch / our_train,
                            ref_train / our_train),
    }


def detail_rows(forward_backward_ms: Tuple[Tuple[float, float], Tuple[float, float]],
                macs_per_image: int, infer_ms_per_img: Tuple[float, float],
                peak_mb: Optional[Dict[str, Tuple[float, float]]] = None) -> Rows:
    """The training step's forward and backward ms, the inference FLOP rate (2 x multiply-adds
    per image / inference seconds per image, GFLOP/s) and the peak memory (MB) of inference and
    of training (``peak_mb``: {"inference"|"train": (reference, ours)}), as (reference, ours,
    ratio) with ratio > 1 meaning ours is better (faster, smaller). Both sides run the same
    network (their outputs are compared first), so one multiply-add count serves both."""
    (ref_fwd, ref_bwd), (our_fwd, our_bwd) = forward_backward_ms
    rate = [2.0 * macs_per_image / (ms / 1000) / 1e9 for ms in infer_ms_per_img]
    rows = {
        "train_forward_ms": (ref_fwd, our_fwd, ref_fwd / our_fwd),
        "train_backward_ms": (ref_bwd, our_bwd, ref_bwd / our_bwd),
        "inference_GFLOP_per_s": (rate[0], rate[1], rate[1] / rate[0]),
    }
    for mode, (ref, ours) in (peak_mb or {}).items():
        rows[f"peak_MB_{mode}"] = (ref, ours, ref / ours)
    return rows


def print_rows(title: str, reference: str, rows: Rows) -> None:
    print(title)
    print(f"{'metric':<24}{reference:>14}{'detector':>14}{'ratio (ours faster >1)':>26}")
    for name, (a, b, r) in rows.items():
        print(f"{name:<24}{a:>14.2f}{b:>14.2f}{r:>26.3f}")


def write_json(path: str, results: Dict) -> None:
    with open(path, "w") as f:
        json.dump(results, f, indent=1)


def add_timing_args(parser: argparse.ArgumentParser) -> None:
    """The timing options every benchmark tool takes."""
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="where both implementations run")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--infer-batch", type=int, default=1)
    parser.add_argument("--train-batch", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    parser.add_argument("--json", default="", help="write the figures to this file")
    parser.add_argument("--no-memory", action="store_true",
                        help="skip the peak-memory column (one fresh process per case)")


def amp_context(device: torch.device, enabled: bool = True):
    """The inference autocast both sides of an AMP comparison run under: bf16 on CPU, fp16 on
    CUDA, as ``TEST.AMP.ENABLED`` (``detector.evaluation.evaluator.inference_autocast``)."""
    from detector.evaluation.evaluator import inference_autocast

    return inference_autocast(torch.device(device), enabled)


def amp_fn(fn: Callable, device: torch.device) -> Callable[[], None]:
    """``fn`` run under :func:`amp_context`."""
    def run():
        with amp_context(device):
            fn()
    return run


def amp_rows(ref_infer: Callable, our_infer: Callable, *, device, batch: int,
             ref_fp32_ms: float, iters: int, warmup: int, macs: Optional[int] = None) -> Rows:
    """Both sides' inference (``batch`` images per call) timed under :func:`amp_context`:
    ``inference_ms_per_img_amp``, ours under autocast against the reference in fp32
    (``ref_fp32_ms`` per image) and, given the multiply-adds, the FLOP rates; each row
    (reference, ours, ratio ours-faster > 1)."""
    device = torch.device(device)
    seconds = time_pair(amp_fn(ref_infer, device), amp_fn(our_infer, device), iters, warmup)
    ref_ms, our_ms = (s * 1000 / batch for s in seconds)
    rows = {"inference_ms_per_img_amp": (ref_ms, our_ms, ref_ms / our_ms),
            "amp_vs_reference_fp32_ms": (ref_fp32_ms, our_ms, ref_fp32_ms / our_ms)}
    if macs is not None:
        rate = [2.0 * macs / (ms / 1000) / 1e9 for ms in (ref_ms, our_ms)]
        rows["inference_GFLOP_per_s_amp"] = (rate[0], rate[1], rate[1] / rate[0])
    return rows


def conv_peak_gflops(device="cpu", dtype: torch.dtype = torch.float32, iters: int = 20) -> float:
    """GFLOP/s of one 256-channel 3x3 convolution on a (2, 256, 64, 64) channels-last input: the
    rate this machine's convolutions reach at best, to which a network's rate is compared."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 256, 64, 64, generator=g).to(device=device, dtype=dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    w = (torch.randn(256, 256, 3, 3, generator=g) * 0.02).to(device=device, dtype=dtype)
    w = w.contiguous(memory_format=torch.channels_last)

    def run():
        with torch.no_grad():
            nn.functional.conv2d(x, w, padding=1)
        _synchronize()

    return 2.0 * (2 * 256 * 256 * 9 * 64 * 64) / time_one(run, iters, warmup=3) / 1e9


def time_one(fn: Callable, iters: int, warmup: int) -> float:
    """Median seconds of ``fn`` over ``iters`` runs after ``warmup``."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


STAGES = ("preprocess", "network", "anchors", "matching", "loss", "postprocess")


def stage_breakdown(fn: Callable, runs: int = 3) -> Dict[str, float]:
    """Median ms per ``detector::<stage>`` profiler label (see ``DetectorBase.stage``) over
    ``runs`` profiled calls of ``fn``, plus "total" (the call's wall time under the profiler) and
    "other" (total minus the stages: reshapes between them, backward, optimizer step)."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    fn()
    per_run = []
    for _ in range(runs):
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            fn()
            total = (time.perf_counter() - start) * 1000
        times = {stage: 0.0 for stage in STAGES}
        for event in prof.key_averages():
            if event.key.startswith("detector::") and event.key[10:] in times:
                times[event.key[10:]] += event.cpu_time_total / 1000
        times["total"] = total
        times["other"] = total - sum(times[s] for s in STAGES)
        per_run.append(times)
    return {k: statistics.median(r[k] for r in per_run) for k in per_run[0]}


def print_breakdown(title: str, breakdowns: Dict[str, Dict[str, float]]) -> None:
    """One column per mode ("inference", "train step"): ms and share of every stage."""
    print(title)
    modes = list(breakdowns)
    print(f"{'stage':<14}" + "".join(f"{m + ' ms':>18}{'%':>7}" for m in modes))
    for stage in STAGES + ("other", "total"):
        cells = ""
        for m in modes:
            ms, total = breakdowns[m].get(stage, 0.0), breakdowns[m]["total"]
            cells += f"{ms:>18.1f}{100 * ms / total:>7.1f}"
        print(f"{stage:<14}{cells}")


def randomize_batchnorms(modules, generator: torch.Generator) -> None:
    """Gives every nn.BatchNorm2d among ``modules`` a weight in [0.75, 1.25), a bias and running
    mean of scale 0.1, and a running variance in [0.75, 1.25), drawn from ``generator``, so a
    converter that drops or swaps a norm tensor changes the outputs."""
    with torch.no_grad():
        for m in modules:
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=generator) * 0.5 + 0.75)
                m.bias.copy_(torch.randn(m.bias.shape, generator=generator) * 0.1)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=generator) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=generator) * 0.5
                                    + 0.75)


def freeze_like_released_detection_weights(tv_model: nn.Module) -> None:
    """A torchvision ResNet-FPN detector set up as for its released COCO weights, which our
    torchvision configs mirror: FrozenBatchNorm with eps 0 in the backbone body, stem and res2
    frozen (``trainable_backbone_layers=3``)."""
    from torchvision.models.detection._utils import overwrite_eps

    # imported here: the memory-measuring processes that import this module stay light
    from detector.layers import convert_frozen_batchnorm

    tv_model.backbone.body = convert_frozen_batchnorm(tv_model.backbone.body)
    overwrite_eps(tv_model, 0.0)
    for name, param in tv_model.backbone.body.named_parameters():
        if name.startswith(("conv1.", "layer1.")):
            param.requires_grad_(False)


def inference_macs(model: nn.Module, height: int, width: int) -> int:
    """fvcore multiply-adds of one eval forward of ``model`` on an H x W image (one fused
    multiply-add counts as one; see tools/analyze_model.py)."""
    from analyze_model import flop_count

    was_training = model.training
    try:
        return flop_count(model.eval(), height, width)["total"]
    finally:
        model.train(was_training)


def load_weights_for_case(model: nn.Module, path: str) -> nn.Module:
    """Give ``model`` the weights saved at ``path`` without holding a second copy: the file is
    memory-mapped and its tensors become the parameters (the initial ones are freed), so the
    measured peak is the case's, not the loading's."""
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    model.load_state_dict(state, assign=True)
    return model


def save_weights_for_case(model: nn.Module, path: str) -> str:
    torch.save(model.state_dict(), path)
    return path


def pair_peak_memory(module: str, reference: nn.Module, ours: nn.Module, *, size: int,
                     infer_batch: int, train_batch: int, threads: int = 0,
                     **case_kwargs) -> Dict[str, Tuple[float, float]]:
    """{"inference"|"train": (reference MB, our MB)}: four fresh processes, each running
    ``module.memory_case(side, mode, size, batch, weights, **case_kwargs)`` with one side's
    weights (saved here, so both processes hold the weights this process compared)."""
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        weights = {"reference": save_weights_for_case(reference, os.path.join(tmp, "ref.pth")),
                   "detector": save_weights_for_case(ours, os.path.join(tmp, "ours.pth"))}
        for mode, batch in (("inference", infer_batch), ("train", train_batch)):
            out[mode] = tuple(
                peak_memory_mb(module, "memory_case",
                               dict(side=side, mode=mode, size=size, batch=batch,
                                    weights=weights[side], **case_kwargs), threads=threads)
                for side in ("reference", "detector"))
    return out


MEMORY_RESULT_PREFIX = "PEAK_MEMORY_MB "


def peak_memory_mb(module: str, function: str, kwargs: Dict, *, threads: int = 0,
                   timeout: float = 1800) -> float:
    """Peak memory (MB) of one case, measured in a fresh process so that nothing else this
    process allocated counts: ``module.function(**kwargs)`` (a module of tools/) builds the
    model(s) and returns the function to measure, which runs twice (the second training step
    has optimizer state). On CPU the figure is the process's peak resident set size, read
    after the case ran (``peak_rss_mb``: it includes the Python and torch runtime); on CUDA
    ``torch.cuda.max_memory_allocated``. A failed case is a one-line
    RuntimeError naming it."""
    spec = json.dumps({"module": module, "function": function, "kwargs": kwargs,
                       "threads": threads})
    env = dict(os.environ)
    tools_dir = os.path.dirname(os.path.abspath(__file__))
    env["PYTHONPATH"] = os.pathsep.join(
        [tools_dir, os.path.dirname(tools_dir)] + [p for p in [env.get("PYTHONPATH")] if p])
    name = f"{module}.{function}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())})"
    try:
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--memory-case", spec],
                              capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"memory case {name} did not finish in {timeout:.0f} s") from None
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(MEMORY_RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"memory case {name} failed (exit {proc.returncode}): {last}")
    return float(lines[-1][len(MEMORY_RESULT_PREFIX):])


def _run_memory_case(spec: Dict) -> float:
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    run = getattr(importlib.import_module(spec["module"]), spec["function"])(**spec["kwargs"])
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    for _ in range(2):
        run()
    if torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0:
        return torch.cuda.max_memory_allocated() / 2**20
    return peak_rss_mb()


def peak_rss_mb() -> float:
    """This process's peak resident set size. Linux's ru_maxrss also keeps the peak of the
    process image before exec, i.e. of the (large) benchmark process this one was forked from;
    VmHWM is the peak of this program alone, so it is read where it exists."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**10  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # kilobytes on Linux, bytes on macOS
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="peak memory of one benchmark case")
    parser.add_argument("--memory-case", required=True, help="json: module, function, kwargs")
    case = json.loads(parser.parse_args().memory_case)
    print(f"{MEMORY_RESULT_PREFIX}{_run_memory_case(case):.1f}")
