"""The outputs of tools/study.py: results.md (the table), results.json, loss.png and ap.png."""
import json
import logging
import math
import os
import shlex
import statistics
from typing import List, Sequence

import torch

AP_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
METRIC_COLUMNS = AP_KEYS + ("train_time_s", "train_s_per_iter", "eval_s_per_img")

logger = logging.getLogger("study")


def _number(value, digits: int) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _cell(mean, std, digits: int, as_duration: bool = False) -> str:
    """``mean ± std``; a duration as h:mm:ss ± seconds; "–" for a missing value."""
    if as_duration and mean is not None:
        t = int(round(mean))
        text = f"{t // 3600}:{t // 60 % 60:02d}:{t % 60:02d}"
    else:
        text = _number(mean, digits)
    if std is not None and mean is not None:
        text += f" ± {std:.0f}s" if as_duration else f" ± {_number(std, digits)}"
    return text


def _metric_cells(mean: dict, std: dict) -> List[str]:
    cells = [_cell(mean.get(k), std.get(k), 2) for k in AP_KEYS]
    return cells + [_cell(mean.get("train_time_s"), std.get("train_time_s"), 0, True),
                    _cell(mean.get("train_s_per_iter"), std.get("train_s_per_iter"), 3),
                    _cell(mean.get("eval_s_per_img"), std.get("eval_s_per_img"), 4)]


def _table(header: List[str], rows: List[List[str]]) -> List[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def markdown(args, argv: Sequence[str], rows: List[dict], size) -> str:
    """results.md: the command, the table (mean ± std over seeds), per-seed values, the runs."""
    seeded = any(len(r["seeds"]) > 1 for r in rows)
    names = ["box AP", "AP50", "AP75", "APs", "APm", "APl", "train time", "train s/it",
             "eval s/img"]
    header = ["run", "processes", "seeds"] + names + [
        f"inference ms/img {size[0]}x{size[1]}", "params"]
    table = [[r["name"], str(r["num_gpus"]), str(len(r["seeds"]))]
             + _metric_cells(r["mean"], r["std"])
             + [_number(r["inference_ms_per_img"], 1), f"{r['parameters'] / 1e6:.3f}M"]
             for r in rows]
    out = [f"# {args.title or 'Study'}", "", "Produced by:", "", "```",
           "python tools/study.py " + shlex.join(argv), "```", ""]
    out += _table(header, table)
    out += ["", "Box AP (COCO, %) of the final model on the run's first test set. Train time "
            "summed over the run's sessions; eval s/img per process, warm-up excluded; "
            f"inference: median of {args.timing_iters} eval-mode forwards (batch 1, "
            "postprocessing included), "
            f"{torch.get_num_threads()} thread(s)."
            + (" Runs with several seeds: mean ± sample std over seeds." if seeded else "")]
    if seeded:
        per_seed = [[r["name"], str(s["seed"])] + _metric_cells(s, {}) for r in rows
                    for s in r["seeds"]]
        out += ["", "## Per seed", ""] + _table(["run", "seed"] + names, per_seed)
    out += ["", "## Runs", ""]
    if args.common:
        out += [f"Every run: `{shlex.join(args.common)}`", ""]
    for r in rows:
        overrides = f" `{shlex.join(r['overrides'])}`" if r["overrides"] else ""
        folders = ", ".join(s["folder"] for s in r["seeds"])
        out.append(f"- **{r['name']}**: `{r['config_file']}`{overrides} ({folders})")
    out += ["", "![total loss](loss.png)", "", "![box AP](ap.png)", ""]
    return "\n".join(out)


def _finite_or_none(tree):
    """NaN (e.g. APl without large objects) as null: results.json stays standard JSON."""
    if isinstance(tree, dict):
        return {k: _finite_or_none(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_finite_or_none(v) for v in tree]
    if isinstance(tree, float) and not math.isfinite(tree):
        return None
    return tree


def _moving_median(values: Sequence[float], window: int = 5) -> List[float]:
    half = window // 2
    return [statistics.median(values[max(0, i - half):i + half + 1]) for i in range(len(values))]


def _colours(count: int):
    import matplotlib

    return matplotlib.colormaps["tab10" if count <= 10 else "tab20"].colors


def plot_losses(rows: List[dict], path: str, title: str) -> None:
    """Every trial's total_loss (raw faint, moving median solid), one colour per run."""
    import matplotlib.pyplot as plt

    colours = _colours(len(rows))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for index, row in enumerate(rows):
        colour = colours[index % len(colours)]
        for k, seed in enumerate(row["seeds"]):
            its, loss = seed["loss"]["iteration"], seed["loss"]["total_loss"]
            ax.plot(its, loss, color=colour, alpha=0.25, linewidth=0.8)
            ax.plot(its, _moving_median(loss), color=colour, linewidth=1.6,
                    label=row["name"] if k == 0 else None)
    ax.set_xlabel("iteration")
    ax.set_ylabel("total loss (as logged: faint; moving median of 5: solid)")
    ax.set_title(f"{title}: training loss" if title else "Training loss")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def plot_ap(rows: List[dict], path: str, title: str) -> None:
    """Mean box AP per run as bars; with several seeds, the std as error bars and each seed."""
    import matplotlib.pyplot as plt

    colours = _colours(len(rows))
    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(rows) + 2), 4))
    for index, row in enumerate(rows):
        mean, std = row["mean"]["AP"], row["std"]["AP"]
        colour = colours[index % len(colours)]
        ax.bar(index, mean if mean is not None else 0.0, color=colour, alpha=0.8,
               yerr=std, capsize=4)
        values = [s.get("AP") for s in row["seeds"]]
        top = max([mean or 0.0, (mean or 0.0) + (std or 0.0)]
                  + [v for v in values if v is not None and math.isfinite(v)])
        ax.annotate(_number(mean, 2), (index, top), textcoords="offset points",
                    xytext=(0, 3), ha="center", va="bottom", fontsize="small")
        if len(values) > 1:
            ax.scatter([index] * len(values), values, color="black", s=10, zorder=3)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([r["name"] for r in rows], rotation=30 if len(rows) > 4 else 0,
                       ha="right" if len(rows) > 4 else "center")
    ax.set_xlabel("run")
    ax.set_ylabel("box AP (%)")
    seeded = any(len(r["seeds"]) > 1 for r in rows)
    seeded = "\n(mean ± std over seeds; dots: single seeds)" if seeded else ""
    ax.set_title((f"{title}: box AP" if title else "Box AP per run") + seeded, fontsize="medium")
    ax.set_ylim(bottom=0.0, top=max(1.0, ax.get_ylim()[1] * 1.08))
    ax.grid(True, axis="y", alpha=0.3)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def write_outputs(args, argv: Sequence[str], rows: List[dict], size) -> dict:
    """results.md, results.json, loss.png and ap.png in --output-dir; returns results.json's
    content."""
    import matplotlib

    matplotlib.use("Agg")
    result = _finite_or_none({"command": "python tools/study.py " + shlex.join(argv),
                              "title": args.title, "common": list(args.common),
                              "inference_size": list(size), "runs": rows})
    out = args.output_dir
    for name, text in (("results.md", markdown(args, argv, rows, size)),
                       ("results.json", json.dumps(result, indent=1) + "\n")):
        with open(os.path.join(out, name + ".tmp"), "w") as f:
            f.write(text)
        os.replace(os.path.join(out, name + ".tmp"), os.path.join(out, name))
    plot_losses(rows, os.path.join(out, "loss.png"), args.title)
    plot_ap(rows, os.path.join(out, "ap.png"), args.title)
    logger.info("wrote %s", ", ".join(os.path.join(out, n) for n in
                                      ("results.md", "results.json", "loss.png", "ap.png")))
    return result
