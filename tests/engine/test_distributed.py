"""Data-parallel training and evaluation give the single-process results.

Multi-process runs go through ``detector.engine.launch`` (gloo on CPU), each bounded twice: by the
collective timeout DIST.TIMEOUT_MINUTES and by a watchdog that kills the spawned processes, so a
hang fails the test instead of blocking the session. All runs use the synthetic shapes data at
64 px, no flip and no loader workers, so every run sees the same images.
"""
import contextlib
import json
import math
import os
import socket
import subprocess
import sys
import time

import pytest
import torch

from detector.data import DatasetCatalog, MetadataCatalog
from detector.engine import DefaultTrainer, default_argument_parser, default_setup, launch
from detector.engine import setup_cfg
from detector.engine.hooks import CallbackHook
from detector.modeling import BoxCoder
from detector.modeling.losses import retinanet_losses
from detector.utils import comm

import process_watchdog

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "configs", "demo", "retinanet_tiny_shapes.yaml")
WATCHDOG_S = 240
REL_TOL = 1e-4


def tiny_opts(out_dir, *extra):
    """The demo config shrunk: 64 px, few channels, no flip, 0 workers, a short cosine run."""
    return [
        "MODEL.TINYNET.CHANNELS", "[8, 16, 16, 32, 32]", "MODEL.NECK.OUT_CHANNELS", "32",
        "MODEL.GN.NUM_GROUPS", "8", "MODEL.BACKBONE.NORM", "FrozenBN", "MODEL.RETINANET.NORM", "GN",
        "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64", "INPUT.MIN_SIZE_TEST", "64",
        "INPUT.MAX_SIZE_TEST", "64", "INPUT.RANDOM_FLIP", "none", "DATALOADER.NUM_WORKERS", "0",
        "SOLVER.IMS_PER_BATCH", "4", "SOLVER.MAX_ITER", "10", "SOLVER.BASE_LR", "0.02",
        "SOLVER.WARMUP_ITERS", "0", "SOLVER.CHECKPOINT_PERIOD", "1000", "DATASETS.TEST", "()",
        "DIST.TIMEOUT_MINUTES", "2", "SEED", "7", "LOG_PERIOD", "100", "OUTPUT_DIR", str(out_dir),
    ] + [str(x) for x in extra]


# an odd number of images, so that the two ranks get unequal shards (26 + 25)
EVAL_SUBSET = "shapes_val_first51"


def _register_eval_subset():
    """The first 51 shapes_val images with shapes_val's metadata. Registered on import, so the
    spawned processes (which import this module to find their main function) have it too."""
    if EVAL_SUBSET in DatasetCatalog:
        return
    DatasetCatalog.register(EVAL_SUBSET, lambda: DatasetCatalog.get("shapes_val")[:51])
    full = MetadataCatalog.get("shapes_val")
    MetadataCatalog.get(EVAL_SUBSET).set(
        thing_classes=list(full.thing_classes), evaluator_type="coco",
        thing_dataset_id_to_contiguous_id=dict(full.thing_dataset_id_to_contiguous_id),
    ).set_lazy("json_file", lambda: MetadataCatalog.get("shapes_val").json_file)


_register_eval_subset()


def parse_args(out_dir, *extra):
    return default_argument_parser().parse_args(
        ["--config-file", CONFIG] + tiny_opts(out_dir, *extra))


def max_relative_difference(a, b):
    return max(abs(x - y) / max(abs(x), 1e-12) for x, y in zip(a, b))


@contextlib.contextmanager
def one_thread():
    """In-process reference runs use one thread, like each spawned rank (and it is faster)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def watchdog(seconds=WATCHDOG_S):
    """:func:`process_watchdog.watchdog` with this module's bound."""
    return process_watchdog.watchdog(seconds)


def child_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


@pytest.fixture
def shapes_data():
    """Generate the shapes splits once in this process, not concurrently in every rank."""
    from detector.data.datasets import ensure_shapes_dataset

    ensure_shapes_dataset("train")
    ensure_shapes_dataset("val")


def train_and_record(args, losses_path, loss_keys=None):
    """A main function for launch(): the standard trainer plus a hook that records the raw
    (rank-averaged) total loss of every iteration, or with ``loss_keys`` a dict of those losses;
    rank 0 writes them to ``losses_path``."""
    cfg = setup_cfg(args)
    default_setup(cfg, args)
    trainer = DefaultTrainer(cfg)
    losses = []

    def record(t):
        latest = t.storage.history
        losses.append(latest("total_loss").latest() if loss_keys is None
                      else {k: latest(k).latest() for k in loss_keys})

    trainer.register_hooks([CallbackHook(after_step=record)])
    trainer.resume_or_load(resume=False)
    trainer.train()
    if comm.is_main_process():
        with open(losses_path, "w") as f:
            json.dump(losses, f)


def evaluate(args, results_path):
    """A main function for launch(): evaluate MODEL.WEIGHTS on DATASETS.TEST."""
    from detector.checkpoint import DetectionCheckpointer

    cfg = setup_cfg(args)
    default_setup(cfg, args)
    model = DefaultTrainer.build_model(cfg)
    DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    results = DefaultTrainer.test(cfg, model)
    if comm.is_main_process():
        with open(results_path, "w") as f:
            json.dump(results, f)


# --------------------------------------------------------------------------------------------
# loss normalisation: pure-function check of the gradient identity DDP relies on
# --------------------------------------------------------------------------------------------
def _random_batch(num_images=4, num_anchors=50, num_classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    anchors = torch.rand(num_anchors, 2, generator=g) * 50
    anchors = torch.cat([anchors, anchors + 5 + torch.rand(num_anchors, 2, generator=g) * 20], 1)
    labels = torch.randint(-1, num_classes + 1, (num_images, num_anchors), generator=g)
    labels[0, :45] = num_classes  # image 0 has far fewer foreground anchors than the others
    gt_boxes = anchors[None] + torch.randn(num_images, num_anchors, 4, generator=g)
    logits = torch.randn(num_images, num_anchors, num_classes, generator=g)
    deltas = torch.randn(num_images, num_anchors, 4, generator=g) * 0.1
    return logits, deltas, anchors, labels, gt_boxes


def _loss_grads(logits, deltas, anchors, labels, gt_boxes, **kwargs):
    logits = logits.clone().requires_grad_(True)
    deltas = deltas.clone().requires_grad_(True)
    losses = retinanet_losses(logits, deltas, anchors, labels, gt_boxes, num_classes=3,
                              box_coder=BoxCoder(), smooth_l1_beta=0.1, **kwargs)
    total = sum(losses.values())
    total.backward()
    return total.detach(), logits.grad, deltas.grad


@pytest.mark.parametrize("normalization", ["batch", "per_image"])
def test_two_rank_gradient_average_equals_one_process(normalization):
    logits, deltas, anchors, labels, gt_boxes = _random_batch()
    loss_all, g_logits, g_deltas = _loss_grads(logits, deltas, anchors, labels, gt_boxes,
                                               normalization=normalization)
    num_fg = int(((labels >= 0) & (labels < 3)).sum())
    halves = [slice(0, 2), slice(2, 4)]
    per_rank = [_loss_grads(logits[h], deltas[h], anchors, labels[h], gt_boxes[h],
                            normalization=normalization,
                            normalizer=max(1, num_fg) / 2) for h in halves]
    # what DDP does: average the gradients (and we log the average loss)
    assert torch.stack([r[0] for r in per_rank]).mean() == pytest.approx(float(loss_all),
                                                                          rel=1e-6)
    assert torch.allclose(torch.cat([r[1] for r in per_rank]) / 2, g_logits, rtol=1e-5,
                          atol=1e-9)
    assert torch.allclose(torch.cat([r[2] for r in per_rank]) / 2, g_deltas, rtol=1e-5,
                          atol=1e-9)
    if normalization == "batch":
        # each rank normalising by its own foreground count would be a different update
        naive = [_loss_grads(logits[h], deltas[h], anchors, labels[h], gt_boxes[h],
                             normalization="batch") for h in halves]
        assert not torch.allclose(torch.cat([r[1] for r in naive]) / 2, g_logits, rtol=1e-3)


# --------------------------------------------------------------------------------------------
# end-to-end: 2-process DDP training follows the 1-process loss trajectory
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("norms", [
    pytest.param(("FrozenBN", "GN"), id="FrozenBN-GN"),
    pytest.param(("SyncBN", "GN"), id="SyncBN-GN"),
])
def test_ddp_loss_trajectory_equals_single_process(tmp_path, shapes_data, norms):
    backbone_norm, head_norm = norms
    norm_opts = ("MODEL.BACKBONE.NORM", backbone_norm, "MODEL.RETINANET.NORM", head_norm)
    with watchdog(), one_thread():
        for world, name in ((1, "single"), (2, "ddp")):
            launch(train_and_record, world, timeout_minutes=2,
                   args=(parse_args(tmp_path / name, *norm_opts),
                         str(tmp_path / f"losses_{world}.json")))
    single = json.loads((tmp_path / "losses_1.json").read_text())
    ddp = json.loads((tmp_path / "losses_2.json").read_text())
    assert len(single) == len(ddp) == 10
    assert all(math.isfinite(x) for x in single + ddp)
    assert max(single) - min(single) > 1e-3, "the loss must move for the comparison to mean much"
    diff = max_relative_difference(single, ddp)
    print(f"{backbone_norm}/{head_norm}: max relative loss difference over 10 iterations "
          f"{diff:.3g}")
    assert diff <= REL_TOL, list(zip(single, ddp))
    # the final weights agree as well
    w1 = torch.load(tmp_path / "single" / "model_final.pth", weights_only=True)["model"]
    w2 = torch.load(tmp_path / "ddp" / "model_final.pth", weights_only=True)["model"]
    assert w1.keys() == w2.keys()
    for k in w1:
        if w1[k].is_floating_point():
            assert torch.allclose(w1[k], w2[k], rtol=1e-3, atol=1e-5), k


# --------------------------------------------------------------------------------------------
# distributed evaluation: same AP on 2 ranks as on 1
# --------------------------------------------------------------------------------------------
def test_two_rank_evaluation_equals_single_process(tmp_path, shapes_data):
    eval_opts = ("MODEL.RETINANET.SCORE_THRESH_TEST", "0.0",
                 "MODEL.RETINANET.TOPK_CANDIDATES_TEST", "50", "TEST.DETECTIONS_PER_IMAGE", "20")
    with watchdog(), one_thread():
        # the fixed model: briefly trained here, saved once, loaded by both evaluations
        train_and_record(parse_args(tmp_path / "train", *eval_opts),
                         str(tmp_path / "losses.json"))
        weights = str(tmp_path / "train" / "model_final.pth")
        for world in (1, 2):
            args = parse_args(tmp_path / f"eval_{world}", *eval_opts, "MODEL.WEIGHTS", weights,
                              "DATASETS.TEST", f"('{EVAL_SUBSET}',)")
            launch(evaluate, world, args=(args, str(tmp_path / f"results_{world}.json")),
                   timeout_minutes=2)
    one = json.loads((tmp_path / "results_1.json").read_text())
    two = json.loads((tmp_path / "results_2.json").read_text())
    assert one["bbox"]["AR100"] > 0, "the fixed model must detect something"
    assert one.keys() == two.keys() == {"bbox"} and one["bbox"].keys() == two["bbox"].keys()
    for name, value in one["bbox"].items():  # exactly equal; NaN (e.g. APl: no large objects)
        other = two["bbox"][name]
        assert value == other or (math.isnan(value) and math.isnan(other)), (name, value, other)
    print(f"AP on 1 rank {one['bbox']['AP']:.4f}, on 2 ranks {two['bbox']['AP']:.4f}; "
          f"AP50 {one['bbox']['AP50']:.4f} / {two['bbox']['AP50']:.4f}")
    records = [json.loads((tmp_path / f"eval_{world}" / "inference" / EVAL_SUBSET /
                           "coco_instances_results.json").read_text()) for world in (1, 2)]
    key = lambda r: (r["image_id"], r["category_id"], r["score"], r["bbox"])  # noqa: E731
    assert len(records[0]) > 0
    assert sorted(records[0], key=key) == sorted(records[1], key=key)
    # both ranks' shards are in the gathered results
    assert len({r["image_id"] for r in records[1]}) == 51


# --------------------------------------------------------------------------------------------
# two torchrun "nodes" on this machine, c10d rendezvous
# --------------------------------------------------------------------------------------------
def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_two_torchrun_nodes(out_dir, rendezvous, script_args, timeout=WATCHDOG_S):
    """Start two torchrun agents (one process each); returns [(returncode, output)] per node.
    ``rendezvous`` is "c10d" (node ranks assigned) or "static" (--node_rank 0/1)."""
    port = _free_port()
    procs = []
    for node in range(2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
               "--max-restarts=0"]
        if rendezvous == "c10d":
            cmd += ["--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
                    f"--rdzv-id=test{port}"]
        else:
            cmd += [f"--node_rank={node}", "--master_addr=127.0.0.1", f"--master_port={port}"]
        cmd += [os.path.join(ROOT, "tools", "train_net.py")] + script_args
        log = open(os.path.join(out_dir, f"agent{node}.log"), "w")
        procs.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                       env=child_env(), start_new_session=True), log))
    deadline = time.monotonic() + timeout
    results = []
    try:
        for proc, log in procs:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for proc, log in procs:
            if proc.poll() is None:  # only our own agents and their workers
                os.killpg(proc.pid, 9)
                proc.wait()
            log.close()
            with open(log.name) as f:
                results.append((proc.returncode, f.read()))
    return results


@pytest.mark.parametrize("rendezvous", [
    "c10d", pytest.param("static", marks=pytest.mark.slow)])
def test_two_node_torchrun_trains_and_evaluates(tmp_path, shapes_data, rendezvous):
    out = tmp_path / "run"
    script_args = ["--config-file", CONFIG] + tiny_opts(
        out, "SOLVER.MAX_ITER", "4", "DATASETS.TEST", "('shapes_val',)",
        "MODEL.RETINANET.SCORE_THRESH_TEST", "0.0", "MODEL.RETINANET.TOPK_CANDIDATES_TEST", "50",
        "TEST.DETECTIONS_PER_IMAGE", "10", "LOG_PERIOD", "1")
    results = run_two_torchrun_nodes(str(tmp_path), rendezvous, script_args)
    for node, (code, output) in enumerate(results):
        assert code == 0, f"node {node}:\n{output[-4000:]}"
    assert (out / "model_final.pth").exists()
    log = (out / "log.txt").read_text()
    assert "Rank 0 of world size 2" in log
    assert "IMS_PER_BATCH=4 over 2 process(es): 2 image(s) per process" in log
    assert "Evaluation results for shapes_val" in log
    assert "Rank 1 of world size 2" in (out / "log.txt.rank1").read_text()
    metrics = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    assert [m["iteration"] for m in metrics if "total_loss" in m] == [0, 1, 2, 3]
    assert any("bbox/AP" in m for m in metrics)
