"""tools/study.py: the command-line grammar, the outputs from finished run folders, reuse, and the
one-line errors; a slow test trains two tiny runs for real in child processes."""
import json
import math
import os

import pytest
import torch

from detector.checkpoint import DetectionCheckpointer
from detector.modeling import build_model
from log_capture import CollectLogs
from tool_loader import load_tool

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "configs", "demo", "retinanet_tiny_shapes.yaml")
MAX_ITER = 6


def tiny_common():
    """The demo config shrunk: 64 px, few channels, no flip, 0 workers, a few iterations."""
    return [
        "MODEL.TINYNET.CHANNELS", "[8, 16, 16, 32, 32]", "MODEL.NECK.OUT_CHANNELS", "32",
        "MODEL.GN.NUM_GROUPS", "8", "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64",
        "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64", "INPUT.RANDOM_FLIP", "none",
        "DATALOADER.NUM_WORKERS", "0", "SOLVER.IMS_PER_BATCH", "4",
        "SOLVER.MAX_ITER", str(MAX_ITER), "SOLVER.WARMUP_ITERS", "0", "LOG_PERIOD", "1",
        "TEST.VIS_NUM_IMAGES", "0",
    ]


@pytest.fixture(scope="module")
def study():
    return load_tool("study")


def study_argv(out_dir, *extra):
    return (["--output-dir", str(out_dir), "--config-file", CONFIG, "--common"] + tiny_common()
            + ["--run", "gn", "--run", "bn", "MODEL.RETINANET.NORM", "BN", "--timing-iters", "2"]
            + list(extra))


# ------------------------------------------------------------------------------------------------
# grammar
# ------------------------------------------------------------------------------------------------
def test_grammar_runs_common_and_flags_anywhere(study):
    args = study.parse_study_args([
        "--output-dir", "out", "--common", "SOLVER.MAX_ITER", "10", "SEED", "-1",
        "--run", "a", "--config-file", "a.yaml", "MODEL.X", "1",
        "--run", "b", "MODEL.Y", "-2", "--config-file", "b.yaml", "MODEL.Z", "[1, 2]",
        "--seeds", "1", "2", "--run", "c", "--config-file", "c.yaml", "--size", "96", "128",
        "--skip-train", "--title", "T", "--num-gpus", "3",
    ])
    assert [(r.name, r.config_file, r.overrides) for r in args.runs] == [
        ("a", "a.yaml", ["MODEL.X", "1"]),
        ("b", "b.yaml", ["MODEL.Y", "-2", "MODEL.Z", "[1, 2]"]),
        ("c", "c.yaml", []),
    ]
    assert args.common == ["SOLVER.MAX_ITER", "10", "SEED", "-1"]
    assert (args.seeds, args.size, args.skip_train, args.title, args.num_gpus) == (
        [1, 2], [96, 128], True, "T", 3)


def test_grammar_shared_config_and_folders(study, tmp_path):
    args = study.parse_study_args(["--output-dir", str(tmp_path), "--config-file", "base.yaml",
                                   "--run", "x", "A", "1", "--run", "y", "--seeds", "3", "4"])
    assert [r.config_file for r in args.runs] == ["base.yaml", "base.yaml"]
    # inside a run's overrides, --config-file is that run's
    own = study.parse_study_args(["--output-dir", "o", "--run", "x", "A", "1", "--config-file",
                                  "x.yaml", "--run", "y", "--config-file", "y.yaml"])
    assert [(r.config_file, r.overrides) for r in own.runs] == [("x.yaml", ["A", "1"]),
                                                                 ("y.yaml", [])]
    trials = study.trials_of(args)
    assert [(t.label, t.seed) for t in trials] == [("x_seed3", 3), ("x_seed4", 4),
                                                   ("y_seed3", 3), ("y_seed4", 4)]
    assert trials[0].output_dir == os.path.join(str(tmp_path), "runs", "x_seed3")
    # SEED and OUTPUT_DIR come last so that they win over every override
    assert study.trial_overrides(trials[1], ["B", "2"]) == [
        "B", "2", "A", "1", "SEED", "4", "OUTPUT_DIR", trials[1].output_dir]
    unseeded = study.trials_of(study.parse_study_args(
        ["--output-dir", "o", "--config-file", "c.yaml", "--run", "x"]))
    assert [(t.label, t.seed) for t in unseeded] == [("x", None)]
    assert study.trial_overrides(unseeded[0], [])[-2:] == ["OUTPUT_DIR", unseeded[0].output_dir]


def test_grammar_per_run_processes_and_seeds(study):
    args = study.parse_study_args([
        "--output-dir", "o", "--config-file", "c.yaml", "--num-gpus", "2", "--seeds", "7",
        "--run", "base", "--run-seeds", "1", "2", "3", "A", "1",
        "--run", "wide", "A", "2", "--run-num-gpus", "3", "B", "-1",
        "--run", "plain",
    ])
    assert [(r.name, r.overrides, r.num_gpus, r.seeds) for r in args.runs] == [
        ("base", ["A", "1"], 2, [1, 2, 3]),
        ("wide", ["A", "2", "B", "-1"], 3, [7]),
        ("plain", [], 2, [7]),
    ]
    assert [t.label for t in study.trials_of(args)] == [
        "base_seed1", "base_seed2", "base_seed3", "wide_seed7", "plain_seed7"]


@pytest.mark.parametrize("argv, fragment", [
    (["--output-dir", "o", "--config-file", "c"], "no --run given"),
    (["--output-dir", "o", "--run", "a"], "run 'a' has no --config-file"),
    (["--output-dir", "o", "--config-file", "c", "--run", "a", "K"], "run 'a': overrides need"),
    (["--output-dir", "o", "--config-file", "c", "--common", "K", "--run", "a"],
     "--common needs KEY VALUE pairs"),
    (["--output-dir", "o", "--config-file", "c", "--run", "a", "--run", "a"], "given twice"),
    (["--output-dir", "o", "--config-file", "c", "--run", "a/b"], "names a folder"),
    (["--output-dir", "o", "--config-file", "c", "--run"], "--run needs a NAME"),
    (["--output-dir", "o", "--config-file", "c", "--run", "a", "--seeds", "1", "1"], "repeated"),
    (["--output-dir", "o", "--config-file", "c", "--run", "a", "--run-seeds", "2", "2"],
     "repeated"),
    (["--output-dir", "o", "--config-file", "c", "--run", "a", "--run-seeds"], "--run-seeds needs"),
    (["--output-dir", "o", "--config-file", "c", "--run", "a", "--run-num-gpus", "x"],
     "--run-num-gpus needs a number"),
    (["--output-dir", "o", "--config-file", "c", "--run", "a", "--run-num-gpus", "0"],
     "--run-num-gpus must be at least 1"),
    (["--output-dir", "o", "--config-file", "c", "--run", "a", "--bogus"], "unrecognized"),
    (["--output-dir", "o", "--config-file", "c", "--run=a"], "with spaces, not '='"),
])
def test_grammar_errors(study, capsys, argv, fragment):
    with pytest.raises(SystemExit) as info:
        study.parse_study_args(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("study.py: error:") and fragment in err, err


def test_help_shows_the_grammar(study, capsys):
    with pytest.raises(SystemExit):
        study.parse_study_args(["--help"])
    out = capsys.readouterr().out
    assert "--run NAME [--config-file FILE] [--run-num-gpus N] [--run-seeds K ...] [KEY VALUE ...]" in out
    assert "--seeds 1 2 3" in out


# ------------------------------------------------------------------------------------------------
# finished run folders prepared without training (the slow test trains for real)
# ------------------------------------------------------------------------------------------------
def _log_lines(train_seconds, s_per_it, eval_s_per_img):
    return [
        "[01/01 10:00:00] det.engine.hooks INFO: Overall training speed: 4 iterations in "
        f"0:00:01 ({s_per_it:.4f} s / it)",
        f"[01/01 10:00:00] det.engine.hooks INFO: Total training time: {train_seconds} "
        "(0:00:00 on hooks)",
        "[01/01 10:00:00] det.evaluation.evaluator INFO: Total inference time: 0:00:02 for 200 "
        "images (0.0100 s/img per process)",
        "[01/01 10:00:00] det.evaluation.evaluator INFO: Inference speed over 195 images after 5 "
        f"warm-up batch(es): {eval_s_per_img:.4f} s/img per process (model 0.0061, data loading "
        "0.0019, evaluator 0.0000)",
    ]


def prepare_finished_run(study, args, trial, ap, interrupted_once=False):
    """A run folder as tools/train_net.py leaves it: config.yaml, model_final.pth, metrics.json
    with losses and the final evaluation, log.txt; optionally resumed once (two sessions)."""
    cfg = study.trial_config(trial, args.common)
    os.makedirs(trial.output_dir)
    with open(os.path.join(trial.output_dir, "config.yaml"), "w") as f:
        f.write(cfg.dump())
    torch.manual_seed(0)
    DetectionCheckpointer(build_model(cfg), save_dir=trial.output_dir).save("model_final")
    lines = [{"iteration": i, "total_loss": 2.0 - 0.1 * i + 0.01 * ap, "lr": 0.01}
             for i in range(MAX_ITER)]
    if interrupted_once:
        # iterations 3-4 were logged before the interruption and again after the resume
        lines = lines[:5] + [dict(lines[3], total_loss=9.0), dict(lines[4], total_loss=9.0)] \
            + lines[3:]
    lines.append({"iteration": 3, "bbox/AP": 99.0, "bbox/AP50": 99.0})  # a periodic evaluation
    lines.append({"iteration": MAX_ITER, "bbox/AP": ap, "bbox/AP50": 2 * ap, "bbox/AP75": 0.0,
                  "bbox/APs": ap, "bbox/APm": ap / 2, "bbox/APl": float("nan"),
                  "bbox/AP-circle": ap})
    with open(os.path.join(trial.output_dir, "metrics.json"), "w") as f:
        f.write("".join(json.dumps(line) + "\n" for line in lines))
    log = _log_lines("0:00:10", 0.5, 0.9)  # the interrupted session's evaluation is not final
    log = (log if interrupted_once else []) + _log_lines("0:01:05", 0.25, 0.0123)
    with open(os.path.join(trial.output_dir, "log.txt"), "w") as f:
        f.write("\n".join(log) + "\n")
    return cfg


def test_outputs_from_finished_runs(study, tmp_path):
    out = tmp_path / "study"
    argv = study_argv(out, "--seeds", "1", "2", "--skip-train", "--title", "Norms", "--size",
                      "64", "96")
    args = study.parse_study_args(argv)
    aps = {"gn_seed1": 10.0, "gn_seed2": 14.0, "bn_seed1": 3.0, "bn_seed2": 5.0}
    for trial in study.trials_of(args):
        prepare_finished_run(study, args, trial, aps[trial.label],
                             interrupted_once=trial.label == "gn_seed1")
    with CollectLogs("study") as logs:
        result = study.main(argv)
    assert logs.text.count("reusing run") == 4

    assert set(os.listdir(out)) >= {"results.md", "results.json", "loss.png", "ap.png", "runs"}
    assert "logs" not in os.listdir(out)  # nothing was trained
    with open(out / "results.json") as f:
        assert json.load(f) == result  # standard JSON: NaN written as null
    gn, bn = result["runs"]
    assert (gn["name"], bn["name"]) == ("gn", "bn")
    assert bn["overrides"] == ["MODEL.RETINANET.NORM", "BN"]
    assert gn["mean"]["AP"] == pytest.approx(12.0) and bn["mean"]["AP"] == pytest.approx(4.0)
    assert gn["std"]["AP"] == pytest.approx(math.sqrt(8.0))
    assert gn["mean"]["APl"] is None
    seed1 = gn["seeds"][0]
    assert (seed1["seed"], seed1["folder"]) == (1, os.path.join("runs", "gn_seed1"))
    assert seed1["train_time_s"] == 75.0 and seed1["train_s_per_iter"] == 0.25
    assert seed1["eval_s_per_img"] == pytest.approx(0.0123)
    # the values logged after the resume replace those of the interrupted session
    assert seed1["loss"]["iteration"] == list(range(MAX_ITER))
    assert max(seed1["loss"]["total_loss"]) < 9.0
    assert gn["seeds"][1]["train_time_s"] == 65.0
    num_params = sum(p.numel() for p in build_model(
        study.trial_config(study.trials_of(args)[0], args.common)).parameters())
    assert gn["parameters"] == num_params
    assert gn["inference_ms_per_img"] > 0 and result["inference_size"] == [64, 96]

    text = (out / "results.md").read_text()
    assert text.startswith("# Norms\n") and "python tools/study.py " + " ".join(argv[:4]) in text
    table = [line for line in text.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in table[0].strip("|").split("|")]
    assert header == ["run", "processes", "seeds", "box AP", "AP50", "AP75", "APs", "APm", "APl",
                      "train time", "train s/it", "eval s/img", "inference ms/img 64x96",
                      "params"]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")]
            for line in table[1:3]}
    assert rows["gn"][1:5] == ["1", "2", "12.00 ± 2.83", "24.00 ± 5.66"] and rows["gn"][8] == "–"
    assert rows["gn"][9] == "0:01:10 ± 7s" and rows["bn"][3] == "4.00 ± 1.41"
    assert "## Per seed" in text and "| gn | 1 | 10.00 |" in text and "| bn | 2 | 5.00 |" in text
    assert "`MODEL.RETINANET.NORM BN` (runs/bn_seed1, runs/bn_seed2)" in text

    import matplotlib.image

    for name in ("loss.png", "ap.png"):
        image = matplotlib.image.imread(str(out / name))
        assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 200


def test_bad_key_names_the_run_and_finished_runs_stay(study, tmp_path, capsys):
    out = tmp_path / "study"
    args = study.parse_study_args(study_argv(out, "--skip-train"))
    for trial, ap in zip(study.trials_of(args), (7.0, 8.0)):
        prepare_finished_run(study, args, trial, ap)
    final = out / "runs" / "gn" / "model_final.pth"
    before = final.stat().st_mtime_ns
    with pytest.raises(SystemExit) as info:
        study.main(study_argv(out, "--run", "typo", "MODEL.RETINANET.NROM", "BN"))
    message = str(info.value)
    assert message.startswith("study.py: error: run 'typo': Unknown config key "
                              "'MODEL.RETINANET.NROM'") and "\n" not in message, message
    assert not (out / "runs" / "typo").exists() and not (out / "results.md").exists()
    result = study.main(study_argv(out, "--skip-train"))
    assert [r["mean"]["AP"] for r in result["runs"]] == [7.0, 8.0]
    assert final.stat().st_mtime_ns == before


def test_changed_config_and_unfinished_run_are_errors(study, tmp_path):
    out = tmp_path / "study"
    args = study.parse_study_args(study_argv(out))
    gn, bn = study.trials_of(args)
    prepare_finished_run(study, args, gn, 7.0)
    with pytest.raises(SystemExit) as info:
        study.main(study_argv(out, "--skip-train"))
    assert str(info.value) == (f"study.py: error: run 'bn' is not finished in {bn.output_dir} (no "
                               f"model_final.pth with its evaluation) and --skip-train is set")
    with pytest.raises(SystemExit) as info:
        study.main(study_argv(out, "--common", "SOLVER.BASE_LR", "0.5", "--skip-train"))
    message = str(info.value)
    assert message.startswith(f"study.py: error: run 'gn': {gn.output_dir}/config.yaml was "
                              "written for another config (SOLVER.BASE_LR: 0.05 there, 0.5 now)")
    assert "\n" not in message


# ------------------------------------------------------------------------------------------------
# real training in child processes
# ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_tiny_study_trains_reuses_and_reports_a_failed_run(study, tmp_path):
    from detector.data.datasets import ensure_shapes_dataset

    # generated once here, not by each child process
    ensure_shapes_dataset("train")
    ensure_shapes_dataset("val")
    out = tmp_path / "study"
    with CollectLogs("study") as logs:
        result = study.main(study_argv(out))
    assert "training run 'gn'" in logs.text and "training run 'bn'" in logs.text
    for run in result["runs"]:
        seed = run["seeds"][0]
        assert math.isfinite(seed["AP"]) and 0.0 <= seed["AP"] <= 100.0
        assert seed["train_time_s"] is not None and seed["train_s_per_iter"] > 0
        assert 0 < seed["eval_s_per_img"] < 10
        assert seed["loss"]["iteration"] == list(range(MAX_ITER))
    with open(out / "runs" / "bn" / "config.yaml") as f:
        assert "NORM: BN" in f.read()
    table = [line for line in (out / "results.md").read_text().splitlines()
             if line.startswith("| ")]
    assert [line.split("|")[1].strip() for line in table[1:]] == ["gn", "bn"]

    finals = [out / "runs" / name / "model_final.pth" for name in ("gn", "bn")]
    before = [p.stat().st_mtime_ns for p in finals]
    # a run that passes the config check but fails in training
    with CollectLogs("study") as logs, pytest.raises(SystemExit) as info:
        study.main(study_argv(out, "--run", "broken", "DATASETS.TRAIN", '("missing_set",)'))
    assert logs.text.count("reusing run") == 2 and "training run 'gn'" not in logs.text
    message = str(info.value)
    assert message.startswith("study.py: error: run 'broken' failed (exit status 1): "
                              "train_net.py: error:") and "missing_set" in message, message
    assert "\n" not in message
    again = study.main(study_argv(out))
    assert [p.stat().st_mtime_ns for p in finals] == before
    assert [r["seeds"][0]["AP"] for r in again["runs"]] == [
        r["seeds"][0]["AP"] for r in result["runs"]]


def test_final_evaluation_is_at_the_scaled_last_iteration(study, tmp_path):
    """tools/train_net.py scales SOLVER.MAX_ITER to its world size after saving config.yaml."""
    args = study.parse_study_args(study_argv(tmp_path, "--common", "SOLVER.REFERENCE_WORLD_SIZE",
                                             "1"))
    cfg = study.trial_config(study.trials_of(args)[0], args.common, num_gpus=2)
    (tmp_path / "metrics.json").write_text(
        json.dumps({"iteration": MAX_ITER // 2, "bbox/AP": 5.0}) + "\n"
        + json.dumps({"iteration": MAX_ITER, "bbox/AP": 6.0}) + "\n")
    assert study.final_evaluation(cfg, str(tmp_path), num_gpus=2) is None  # no model_final.pth
    (tmp_path / "model_final.pth").write_bytes(b"")
    assert study.final_evaluation(cfg, str(tmp_path), num_gpus=2) == {"AP": 5.0}
    assert study.final_evaluation(cfg, str(tmp_path), num_gpus=1) == {"AP": 6.0}


def test_keys_added_to_the_defaults_later_do_not_block_reuse(study, tmp_path):
    args = study.parse_study_args(study_argv(tmp_path))
    trial = study.trials_of(args)[0]
    cfg = study.trial_config(trial, args.common)
    os.makedirs(trial.output_dir)
    with open(os.path.join(trial.output_dir, "config.yaml"), "w") as f:
        f.write(cfg.dump().replace("VIS_NUM_IMAGES: 0\n", ""))
    study.check_same_config(trial, cfg)
    with open(os.path.join(trial.output_dir, "config.yaml"), "w") as f:
        f.write(cfg.dump().replace("VIS_NUM_IMAGES: 0\n", "VIS_NUM_IMAGES: 2\n"))
    with pytest.raises(study.StudyError, match=r"TEST\.VIS_NUM_IMAGES: 2 there, 0 now\)"):
        study.check_same_config(trial, cfg)
