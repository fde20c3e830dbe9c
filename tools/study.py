#!/usr/bin/env python
"""Train several configs (or one config with several sets of overrides), evaluate them and write one
comparison: results.md (table), results.json, loss.png (loss curves) and ap.png (AP per run).

    # two configs, one schedule for both, on the built-in dataset
    python tools/study.py --output-dir docs/studies/pyramid --title "Pyramid levels" \\
        --common DATASETS.TRAIN '("shapes_train",)' DATASETS.TEST '("shapes_val",)' \\
            MODEL.RETINANET.NUM_CLASSES 3 SOLVER.MAX_ITER 2000 \\
        --run base --config-file configs/pyramid/retinanet_base.yaml \\
        --run P2-P6 --config-file configs/pyramid/retinanet_P2-P6.yaml
    # one config and overrides per run, each trained with 3 seeds on 3 processes
    python tools/study.py --output-dir out/norms \\
        --config-file configs/demo/retinanet_tiny_shapes.yaml \\
        --run bn MODEL.RETINANET.NORM BN --run gn MODEL.RETINANET.NORM GN --seeds 1 2 3 --num-gpus 3
    # the table and plots again from finished runs, timing at 256x256
    python tools/study.py --output-dir out/norms --config-file ... --run bn ... --run gn ... \\
        --seeds 1 2 3 --skip-train --size 256 256

    # runs that differ in processes or seeds: 4 images per process on 1 and on 3 processes,
    # the baseline with 3 seeds
    python tools/study.py --output-dir out/batch --config-file ... \\
        --run base --run-seeds 1 2 3 SOLVER.IMS_PER_BATCH 4 \\
        --run bn_4x1 SOLVER.IMS_PER_BATCH 4 MODEL.NECK.NORM BN \\
        --run bn_4x3 --run-num-gpus 3 SOLVER.IMS_PER_BATCH 12 MODEL.NECK.NORM BN

Grammar: ``--run NAME [--config-file FILE] [--run-num-gpus N] [--run-seeds K ...] [KEY VALUE ...]``
starts a run; its KEY VALUE overrides continue up to the next token beginning with "--" (so no value
may begin with "--"). A run's own --config-file, --run-num-gpus and --run-seeds may come anywhere
among its overrides; a run without them uses --config-file, --num-gpus and --seeds given outside
any run. ``--common KEY VALUE ...`` overrides apply to every run before its own. The other options
may come anywhere outside a run's overrides.

Each run trains in its own process, ``tools/train_net.py --resume --config-file FILE <common>
<overrides> [SEED k] OUTPUT_DIR <output-dir>/runs/<name>[_seed<k>]``, its output appended to
``<output-dir>/logs/<name>[_seed<k>].txt``. A run folder holding model_final.pth and the final
evaluation in metrics.json is reused; an unfinished one continues from its last checkpoint. A run
folder trained with another config (OUTPUT_DIR aside) is an error, never silently reused.

Columns: COCO box AP of the final model on DATASETS.TEST[0] (metrics.json's evaluation at
iteration SOLVER.MAX_ITER); train time summed over the run's sessions ("Total training time" in
log.txt) and train s/it ("Overall training speed", last session); eval s/img per process of that
final evaluation (log.txt, warm-up excluded); inference ms/img: median eval-mode forward (batch 1,
postprocessing included) of the run's final weights on a fixed random image of --size (default:
the first run's INPUT.MIN_SIZE_TEST, square), re-measured at every invocation so that all rows
share one machine state; parameters from fvcore (tools/analyze_model.py). With --seeds, every
number is mean +- sample std over seeds, and a second table lists each seed.
"""
import argparse
import json
import logging
import math
import os
import re
import shlex
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch
import yaml

# tools/ is not a package: its sibling programs are imported from the folder of this file
TOOLS_DIR = os.path.dirname(os.path.abspath(__file__))
if TOOLS_DIR not in sys.path:
    sys.path.insert(0, TOOLS_DIR)

from analyze_model import example_image, parameter_counts  # noqa: E402
from benchmark_common import infer_fn, time_one  # noqa: E402
from study_report import AP_KEYS, METRIC_COLUMNS, write_outputs  # noqa: E402

from detector.checkpoint import DetectionCheckpointer  # noqa: E402
from detector.config import get_cfg  # noqa: E402
from detector.engine import scale_for_world_size  # noqa: E402
from detector.modeling import build_model  # noqa: E402
from detector.utils.logger import setup_logger  # noqa: E402

ROOT = os.path.dirname(TOOLS_DIR)
TRAIN_SCRIPT = os.path.join(TOOLS_DIR, "train_net.py")
RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
logger = logging.getLogger("study")


class StudyError(Exception):
    """A one-line reason the study cannot go on (names the run)."""


@dataclass
class RunSpec:
    """One row of the study: a name, its config file and its own overrides."""
    name: str
    config_file: str = ""
    overrides: List[str] = field(default_factory=list)
    num_gpus: Optional[int] = None  # None: the study's --num-gpus
    seeds: Optional[List[int]] = None  # None: the study's --seeds


@dataclass
class Trial:
    """One training of a run: the run, its seed (None: the config's SEED), its folder name
    (``label``) and folder."""
    run: RunSpec
    seed: Optional[int]
    label: str
    output_dir: str

    def describe(self) -> str:
        return f"run '{self.run.name}'" + ("" if self.seed is None else f" (seed {self.seed})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="study.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="study.py --output-dir DIR [--config-file FILE] [--common KEY VALUE ...] "
              "--run NAME [--config-file FILE] [--run-num-gpus N] [--run-seeds K ...] [KEY VALUE ...] "
              "[--run ...] [--num-gpus N] "
              "[--seeds K ...] [--size H W] [--timing-iters N] [--skip-train] [--title T]")
    parser.add_argument("--output-dir", required=True, metavar="DIR",
                        help="study folder: results.md/json, loss.png, ap.png, runs/, logs/")
    parser.add_argument("--config-file", default="", metavar="FILE",
                        help="config of the runs that name none themselves")
    # --run and --common are split off before argparse sees the rest; listed here for --help
    parser.add_argument("--run", metavar="NAME",
                        help="a run, then optionally its own --config-file FILE, --run-num-gpus N, "
                             "--run-seeds K ... and KEY VALUE overrides")
    parser.add_argument("--common", metavar="KEY VALUE ...",
                        help="config overrides of every run (before the run's own)")
    parser.add_argument("--num-gpus", type=int, default=1,
                        help="processes per training (tools/train_net.py --num-gpus)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, metavar="K",
                        help="train every run once per seed (SEED K); the table shows mean +- std")
    parser.add_argument("--size", type=int, nargs=2, default=None, metavar=("H", "W"),
                        help="image size of the inference timing (default: the first run's "
                             "INPUT.MIN_SIZE_TEST, square)")
    parser.add_argument("--timing-iters", type=int, default=20,
                        help="timed forwards per run (median; after 3 warm-up forwards)")
    parser.add_argument("--skip-train", action="store_true",
                        help="train nothing: every run must be finished already")
    parser.add_argument("--title", default="", help="heading of results.md and the plots")
    return parser


def _take_overrides(tokens: Sequence[str], start: int):
    """The tokens from ``start`` up to the next one beginning with "--", and the index after."""
    end = start
    while end < len(tokens) and not tokens[end].startswith("--"):
        end += 1
    return list(tokens[start:end]), end


def parse_study_args(argv: Sequence[str]) -> argparse.Namespace:
    """Parse the study's command line (grammar in the module docstring); ``runs`` is a list of
    ``RunSpec`` (each with its config file resolved) and ``common`` the shared overrides."""
    parser = build_parser()
    tokens, rest, runs, common = list(argv), [], [], []
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if token.startswith(("--run=", "--common=")):
            parser.error(f"write {token.split('=')[0]} and its values with spaces, not '='")
        elif token == "--common":
            values, i = _take_overrides(tokens, i + 1)
            common.extend(values)
        elif token == "--run":
            if i + 1 >= len(tokens) or tokens[i + 1].startswith("-"):
                parser.error("--run needs a NAME")
            run = RunSpec(name=tokens[i + 1])
            i += 2
            while True:
                values, i = _take_overrides(tokens, i)
                run.overrides.extend(values)
                option = tokens[i] if i < len(tokens) else None
                if option == "--config-file":
                    if i + 1 >= len(tokens) or tokens[i + 1].startswith("--"):
                        parser.error(f"run '{run.name}': --config-file needs a FILE")
                    run.config_file = tokens[i + 1]
                    i += 2
                    continue
                if option == "--run-num-gpus":
                    values = tokens[i + 1:i + 2]
                    if not values or not values[0].isdigit():
                        parser.error(f"run '{run.name}': --run-num-gpus needs a number")
                    run.num_gpus = int(values[0])
                    i += 2
                    continue
                if option == "--run-seeds":
                    i += 1
                    seeds = []
                    while i < len(tokens) and re.fullmatch(r"-?\d+", tokens[i]):
                        seeds.append(int(tokens[i]))
                        i += 1
                    if not seeds:
                        parser.error(f"run '{run.name}': --run-seeds needs at least one number")
                    run.seeds = seeds
                    continue
                break
            runs.append(run)
        else:
            rest.append(token)
            i += 1
    args = parser.parse_args(rest)
    if not runs:
        parser.error("no --run given")
    if len(common) % 2:
        parser.error(f"--common needs KEY VALUE pairs, got {len(common)} token(s): "
                     f"{' '.join(common)}")
    seen = set()
    for run in runs:
        if not RUN_NAME.match(run.name):
            parser.error(f"run name {run.name!r} must be letters, digits and _.+- (it names a "
                         f"folder)")
        if run.name in seen:
            parser.error(f"run '{run.name}' is given twice")
        seen.add(run.name)
        if len(run.overrides) % 2:
            parser.error(f"run '{run.name}': overrides need KEY VALUE pairs, got "
                         f"{len(run.overrides)} token(s): {' '.join(run.overrides)}")
        run.config_file = run.config_file or args.config_file
        if not run.config_file:
            parser.error(f"run '{run.name}' has no --config-file (give one after its name or "
                         f"one for all runs)")
        run.num_gpus = args.num_gpus if run.num_gpus is None else run.num_gpus
        run.seeds = args.seeds if run.seeds is None else run.seeds
        if run.seeds is not None and len(set(run.seeds)) != len(run.seeds):
            parser.error(f"--seeds are repeated: {' '.join(map(str, run.seeds))}")
        if run.num_gpus < 1:
            parser.error(f"run '{run.name}': --run-num-gpus must be at least 1")
    if args.num_gpus < 1 or args.timing_iters < 1:
        parser.error("--num-gpus and --timing-iters must be at least 1")
    if args.size is not None and min(args.size) <= 0:
        parser.error(f"--size must be positive, got {args.size[0]} {args.size[1]}")
    args.runs, args.common = runs, common
    return args


def trials_of(args) -> List[Trial]:
    """Every (run, seed) of the study, in command-line order."""
    trials = []
    for run in args.runs:
        for seed in (run.seeds or [None]):
            label = run.name if seed is None else f"{run.name}_seed{seed}"
            trials.append(Trial(run, seed, label, os.path.join(args.output_dir, "runs", label)))
    return trials


def trial_overrides(trial: Trial, common: Sequence[str]) -> List[str]:
    """The overrides given to tools/train_net.py: common, the run's, SEED, OUTPUT_DIR last."""
    opts = list(common) + list(trial.run.overrides)
    if trial.seed is not None:
        opts += ["SEED", str(trial.seed)]
    return opts + ["OUTPUT_DIR", trial.output_dir]


def trial_config(trial: Trial, common: Sequence[str], num_gpus: int = 1):
    """The frozen config tools/train_net.py will build (and save as config.yaml) for ``trial``
    (``num_gpus``: the processes it trains on)."""
    cfg = get_cfg()
    try:
        cfg.merge_from_file(trial.run.config_file)
        cfg.merge_from_list(trial_overrides(trial, common))
        cfg.freeze()
        scale_for_world_size(cfg, num_gpus, log=False)
    except (ValueError, KeyError, OSError, yaml.YAMLError) as err:
        raise StudyError(f"{trial.describe()}: {' '.join(str(err).split())}") from None
    if len(cfg.DATASETS.TEST) == 0:
        raise StudyError(f"{trial.describe()}: DATASETS.TEST is empty; a study needs the final "
                         f"evaluation")
    return cfg


def _flat(tree, prefix=""):
    if not isinstance(tree, dict):
        return {prefix: tree}
    out = {}
    for key, value in tree.items():
        out.update(_flat(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def check_same_config(trial: Trial, cfg) -> None:
    """A run folder trained with another config must not be reused or resumed."""
    path = os.path.join(trial.output_dir, "config.yaml")
    if not os.path.isfile(path):
        return
    with open(path) as f:
        saved = _flat(yaml.safe_load(f) or {})
    wanted = _flat(yaml.safe_load(cfg.dump()))
    # the folder may have been moved since (e.g. committed under docs/)
    saved.pop("OUTPUT_DIR", None)
    wanted.pop("OUTPUT_DIR", None)
    # keys added to (or removed from) the defaults since the run trained do not count
    differing = sorted(k for k in set(saved) & set(wanted) if saved[k] != wanted[k])
    if differing:
        key = differing[0]
        more = f" and {len(differing) - 1} more key(s)" if len(differing) > 1 else ""
        raise StudyError(f"{trial.describe()}: {path} was written for another config ({key}: "
                         f"{saved.get(key)!r} there, {wanted.get(key)!r} now{more}); remove "
                         f"{trial.output_dir} to retrain it, or use another --output-dir")


def metric_prefix(cfg) -> str:
    """Flattened name of the first test set's box metrics in metrics.json."""
    return "bbox/" if len(cfg.DATASETS.TEST) == 1 else f"{cfg.DATASETS.TEST[0]}/bbox/"


def read_metrics_lines(path: str) -> List[dict]:
    """metrics.json as a list of dicts (a missing file is empty)."""
    if not os.path.isfile(path):
        return []
    lines = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    lines.append(json.loads(line))
                except json.JSONDecodeError:
                    raise StudyError(f"{path}: line {number} is not JSON") from None
    return lines


def final_evaluation(cfg, output_dir: str, num_gpus: int) -> Optional[Dict[str, float]]:
    """The box metrics of the evaluation after the last iteration (the model of model_final.pth),
    or None when the folder has no such evaluation yet."""
    if not os.path.isfile(os.path.join(output_dir, "model_final.pth")):
        return None
    prefix = metric_prefix(cfg)
    # config.yaml holds the values before tools/train_net.py scales them to its world size
    last = scale_for_world_size(cfg, num_gpus, log=False).SOLVER.MAX_ITER
    found = None
    for line in read_metrics_lines(os.path.join(output_dir, "metrics.json")):
        if line.get("iteration") == last and prefix + "AP" in line:
            found = {k: float(line[prefix + k]) for k in AP_KEYS if prefix + k in line}
    return found


def train(trial: Trial, common: Sequence[str], log_dir: str) -> None:
    """Train (or continue) ``trial`` with tools/train_net.py in a child process."""
    os.makedirs(log_dir, exist_ok=True)
    log_path = os.path.join(log_dir, f"{trial.label}.txt")
    command = ([sys.executable, TRAIN_SCRIPT, "--resume", "--num-gpus", str(trial.run.num_gpus),
                "--config-file", trial.run.config_file] + trial_overrides(trial, common))
    env = dict(os.environ)
    # the child imports the detector package next to this file, wherever it is started from
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    logger.info("training %s: %s (output in %s)", trial.describe(), shlex.join(command), log_path)
    with open(log_path, "a") as out:
        out.write(f"$ {shlex.join(command)}\n")
        out.flush()
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            status = process.wait()
        except KeyboardInterrupt:
            # the child got the same Ctrl-C and stops after writing a checkpoint: let it finish
            status = process.wait()
            raise StudyError(f"{trial.describe()} interrupted (exit status {status}); the same "
                             f"command continues the study") from None
    if status != 0:
        with open(log_path, errors="replace") as f:
            lines = [line.strip() for line in f if line.strip()]
        reason = lines[-1] if lines else "no output"
        # 128 + signal: stopped by a signal after a checkpoint (SOLVER.CHECKPOINT_ON_SIGNALS)
        what = "was stopped" if status > 128 else "failed"
        raise StudyError(f"{trial.describe()} {what} (exit status {status}): {reason} "
                         f"[full output: {log_path}]")


_DURATION = r"(?:(\d+) days?, )?(\d+):(\d\d):(\d\d)"
_TOTAL_TIME = re.compile(r"Total training time: " + _DURATION)
_SPEED = re.compile(r"Overall training speed: \d+ iterations in .* \(([\d.]+) s / it\)")
_EVAL_SPEED = re.compile(r"Inference speed over \d+ images .*?: ([\d.]+) s/img per process")
_EVAL_TOTAL = re.compile(r"Total inference time: .* \(([\d.]+) s/img per process\)")


def _seconds(match) -> float:
    days, hours, minutes, seconds = match.groups()
    return int(days or 0) * 86400 + int(hours) * 3600 + int(minutes) * 60 + int(seconds)


def read_log_times(output_dir: str) -> Dict[str, Optional[float]]:
    """From log.txt: ``train_time_s`` (summed over sessions), ``train_s_per_iter`` (last
    session that trained), ``eval_s_per_img`` (the first evaluation after the last session's
    training: DATASETS.TEST[0] of the final model)."""
    times = {"train_time_s": None, "train_s_per_iter": None, "eval_s_per_img": None}
    path = os.path.join(output_dir, "log.txt")
    if not os.path.isfile(path):
        return times
    total, evals = 0.0, []
    with open(path, errors="replace") as f:
        for line in f:
            if _TOTAL_TIME.search(line):
                total += _seconds(_TOTAL_TIME.search(line))
                times["train_time_s"] = total
                evals = []  # only the evaluations after the last training count
            elif _SPEED.search(line):
                times["train_s_per_iter"] = float(_SPEED.search(line).group(1))
            elif _EVAL_TOTAL.search(line):
                evals.append(float(_EVAL_TOTAL.search(line).group(1)))
            elif _EVAL_SPEED.search(line) and evals:
                # the warm-up-free figure of the same evaluation replaces its total
                evals[-1] = float(_EVAL_SPEED.search(line).group(1))
    if evals:
        times["eval_s_per_img"] = evals[0]
    return times


def loss_curve(output_dir: str) -> Dict[str, List[float]]:
    """``{"iteration": [...], "total_loss": [...]}`` from metrics.json; an iteration written
    twice (before and after a resume) keeps its last value."""
    by_iter = {}
    for line in read_metrics_lines(os.path.join(output_dir, "metrics.json")):
        if "total_loss" in line and "iteration" in line:
            by_iter[int(line["iteration"])] = float(line["total_loss"])
    iterations = sorted(by_iter)
    return {"iteration": iterations, "total_loss": [by_iter[i] for i in iterations]}


def measure_model(cfg, weights: str, size, iters: int) -> Dict[str, float]:
    """Parameters (fvcore) and median inference ms/img of the model of ``cfg`` with ``weights``
    on one random uint8 image of ``size`` (H, W), eval mode, batch 1."""
    torch.manual_seed(0)
    model = build_model(cfg)
    DetectionCheckpointer(model).load(weights, checkpointables=[])
    model.eval()
    height, width = size
    inputs = [{"image": example_image(model, height, width), "height": height, "width": width}]
    run = infer_fn(model, inputs)
    if model.device.type == "cuda":
        forward = run

        def run():
            forward()
            torch.cuda.synchronize()
    seconds = time_one(run, iters, warmup=3)
    return {"parameters": parameter_counts(model)["total"], "inference_ms_per_img": seconds * 1e3}


def _mean_std(values: Sequence[Optional[float]]):
    """(mean, sample std or None) over the values; None if any is missing or not finite."""
    if not values or any(v is None or not math.isfinite(v) for v in values):
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def collect(args, trials: List[Trial], configs: Dict[str, object], size) -> List[dict]:
    """Per run: the config, every seed's numbers, their mean and std, parameters and timing."""
    rows = []
    for run in args.runs:
        mine = [t for t in trials if t.run is run]
        seeds = []
        for trial in mine:
            cfg = configs[trial.label]
            metrics = final_evaluation(cfg, trial.output_dir, run.num_gpus)
            seeds.append({"seed": trial.seed if trial.seed is not None else int(cfg.SEED),
                          "folder": os.path.relpath(trial.output_dir, args.output_dir),
                          **metrics, **read_log_times(trial.output_dir),
                          "loss": loss_curve(trial.output_dir)})
        first = mine[0]
        logger.info("timing %s at %dx%d", first.describe(), size[0], size[1])
        weights = os.path.join(first.output_dir, "model_final.pth")
        try:
            measured = measure_model(configs[first.label], weights, size, args.timing_iters)
        except (OSError, RuntimeError) as err:  # CheckpointError is a RuntimeError
            raise StudyError(f"{first.describe()}: timing {weights}: "
                             f"{' '.join(str(err).split())}") from None
        mean, std = {}, {}
        for key in METRIC_COLUMNS:
            mean[key], std[key] = _mean_std([s.get(key) for s in seeds])
        rows.append({"name": run.name, "config_file": run.config_file,
                     "overrides": list(run.overrides), "num_gpus": run.num_gpus,
                     "seeds": seeds, "mean": mean, "std": std,
                     **measured})
    return rows


def run_study(args, argv: Sequence[str]) -> dict:
    """Check every run's config, train what is not finished, then write the outputs."""
    os.makedirs(args.output_dir, exist_ok=True)
    trials = trials_of(args)
    # every config is read before any training: a typo fails in seconds, not after hours
    configs = {}
    for trial in trials:
        configs[trial.label] = cfg = trial_config(trial, args.common, trial.run.num_gpus)
        check_same_config(trial, cfg)
    for trial in trials:
        cfg = configs[trial.label]
        if final_evaluation(cfg, trial.output_dir, trial.run.num_gpus) is not None:
            logger.info("reusing run %s (%s)", trial.label, trial.output_dir)
            continue
        if args.skip_train:
            raise StudyError(f"{trial.describe()} is not finished in {trial.output_dir} "
                             f"(no model_final.pth with its evaluation) and --skip-train is set")
        train(trial, args.common, os.path.join(args.output_dir, "logs"))
        if final_evaluation(cfg, trial.output_dir, trial.run.num_gpus) is None:
            raise StudyError(f"{trial.describe()}: training ended but {trial.output_dir} has no "
                             f"model_final.pth with the final evaluation in metrics.json")
    first_cfg = configs[trials[0].label]
    size = tuple(args.size) if args.size else (first_cfg.INPUT.MIN_SIZE_TEST,) * 2
    rows = collect(args, trials, configs, size)
    return write_outputs(args, argv, rows, size)


def main(argv=None) -> dict:
    """Run the study of the command line ``argv``; returns what results.json holds."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_study_args(argv)
    setup_logger(os.path.join(args.output_dir, "study_log.txt"), name="study")
    try:
        return run_study(args, argv)
    except StudyError as err:
        raise SystemExit(f"study.py: error: {err}") from None


if __name__ == "__main__":
    main()
