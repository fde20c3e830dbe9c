"""The trainer built from a config: model, optimizer, data, scheduler, checkpointer, hooks and
evaluation (the command-line helpers are in :mod:`detector.engine.cli`)."""
import inspect
import logging
import os
from collections import OrderedDict

from torch.nn.parallel import DistributedDataParallel

from detector.checkpoint import (
    CheckpointError,
    DetectionCheckpointer,
    load_backbone_weights_from_config,
)
from detector.data import (
    DatasetCatalog,
    MetadataCatalog,
    build_detection_test_loader,
    build_detection_train_loader,
)
from detector.data.build import per_process_batch_size
from detector.data.samplers import shared_random_seed
from detector.evaluation import COCOEvaluator, DatasetEvaluators, inference_on_dataset
from detector.modeling import build_model
from detector.solver import ModelEMA, build_gradient_clipper, build_lr_scheduler, build_optimizer
from detector.utils import comm
from detector.utils.events import CommonMetricPrinter, JSONWriter, TensorboardXWriter

from . import hooks
from .train_loop import AMPTrainer, SimpleTrainer, TrainerBase
from .visualization_hook import EvalImages

__all__ = ["DefaultTrainer", "check_num_classes"]


# torch 2.13 renamed broadcast_buffers (which also skipped the initial sync) to
# forward_sync_buffers (which keeps it)
_DDP_NO_FORWARD_BUFFER_SYNC = (
    {"forward_sync_buffers": False}
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
    else {"broadcast_buffers": False}
)


class DefaultTrainer(TrainerBase):
    """Model, optimizer, data, scheduler, checkpointer and the standard hooks, all from a config."""

    def __init__(self, cfg):
        super().__init__()
        logger = logging.getLogger("detector")
        self.cfg = cfg
        batch = per_process_batch_size(cfg.SOLVER.IMS_PER_BATCH)
        logger.info("IMS_PER_BATCH=%d over %d process(es): %d image(s) per process",
                    cfg.SOLVER.IMS_PER_BATCH, comm.get_world_size(), batch)
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        # every rank keeps its own average: DDP keeps the parameters equal, so the averages are too
        self.ema = ModelEMA(model, decay=cfg.SOLVER.EMA.DECAY) if cfg.SOLVER.EMA.ENABLED else None
        model = self._wrap_ddp(model)
        trainer_cls = AMPTrainer if cfg.SOLVER.AMP.ENABLED else SimpleTrainer
        seed = cfg.SEED if cfg.SEED >= 0 else shared_random_seed()
        self._trainer = trainer_cls(
            model, data_loader, optimizer, grad_clipper=build_gradient_clipper(cfg), seed=seed
        )
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        extra = {"ema": self.ema} if self.ema is not None else {}
        # the position of the data stream: a resume continues it (a custom loader without
        # state restarts its stream)
        if callable(getattr(data_loader, "state_dict", None)):
            extra["data_loader"] = data_loader
        self._batch_record = _TotalBatchRecord(cfg.SOLVER.IMS_PER_BATCH)
        extra["total_batch"] = self._batch_record
        # a model's training-time random sampling (GeneralizedRCNN) resumes where it stopped
        sampling_rng = getattr(comm.unwrap_model(model), "sampling_rng", None)
        if sampling_rng is not None:
            extra["sampling_rng"] = sampling_rng
        self.checkpointer = DetectionCheckpointer(
            model, cfg.OUTPUT_DIR, optimizer=optimizer, scheduler=self.scheduler,
            trainer=self._trainer, **extra,
        )
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.register_hooks(self.build_hooks())

    @staticmethod
    def _wrap_ddp(model):
        """DDP copies rank 0's parameters and buffers to every rank once; buffers (BN running
        statistics) are not re-broadcast every forward (each rank keeps its own, SyncBN keeps
        them equal). Gradients are averaged over ranks; the losses are normalised so that the
        average equals the single-process gradient (see detector.modeling.losses)."""
        if comm.get_world_size() == 1:
            return model
        kwargs = dict(_DDP_NO_FORWARD_BUFFER_SYNC)
        if model.device.type == "cuda":
            kwargs["device_ids"] = [comm.get_local_rank()]
        return DistributedDataParallel(model, **kwargs)

    @property
    def model(self):
        return self._trainer.model

    @property
    def optimizer(self):
        return self._trainer.optimizer

    @property
    def data_loader(self):
        return self._trainer.data_loader

    def resume_or_load(self, resume: bool = True):
        """With ``resume``, continue from the newest checkpoint in OUTPUT_DIR that can be read
        (model, optimizer, scheduler, iteration; unreadable ones are skipped with a warning);
        otherwise, or if there is none, load MODEL.WEIGHTS (if any), else the backbone's
        MODEL.BACKBONE.WEIGHTS, and start at iteration 0. A resumed run never reads the backbone
        file, so a requeued job does not need it."""
        logger = logging.getLogger("detector")
        fresh_base_lrs = list(self.scheduler.base_lrs)
        checkpoint = self.checkpointer.resume_or_load(self.cfg.MODEL.WEIGHTS, resume=resume)
        if self.checkpointer.resumed_from is not None:
            self.start_iter = checkpoint.get("iteration", -1) + 1
            self._continue_with_another_total_batch(fresh_base_lrs)
            logger.info("Resuming at iteration %d", self.start_iter)
        else:
            load_backbone_weights_from_config(self.cfg, self.model)
        if comm.get_world_size() > 1:
            starts = comm.all_gather(self.start_iter)
            if len(set(starts)) > 1:
                raise RuntimeError(f"Ranks would start at different iterations {starts}: every "
                                   f"process must see the same OUTPUT_DIR ({self.cfg.OUTPUT_DIR})")
        if self.start_iter > 0 and "data_loader" in self.checkpointer.checkpointables \
                and "data_loader" not in self.checkpointer.restored:
            logger.warning("The checkpoint has no data-stream position: the training data "
                           "restart from the beginning of the stream at iteration %d",
                           self.start_iter)
        if self.ema is not None and "ema" not in self.checkpointer.restored:
            # the average starts from the weights training starts from, not the initialization
            if self.start_iter > 0:
                logger.warning("The checkpoint has no EMA weights: the average restarts from the "
                               "current weights at iteration %d", self.start_iter)
            self.ema.reset(self.model)

    def _continue_with_another_total_batch(self, fresh_base_lrs):
        """A checkpoint written with another SOLVER.IMS_PER_BATCH (a restart on another number
        of processes with SOLVER.REFERENCE_WORLD_SIZE scaling): continue after the same number
        of images, at the iteration and learning rate of this run's (scaled) schedule."""
        saved = self._batch_record.loaded
        total = int(self.cfg.SOLVER.IMS_PER_BATCH)
        if saved is None or saved == total or self.start_iter == 0:
            return
        images = self.start_iter * saved
        start_iter = (images + total // 2) // total
        logging.getLogger("detector").warning(
            "The checkpoint was trained with %d images per iteration, this run has %d: "
            "iteration %d (%d images) continues as iteration %d of %d", saved, total,
            self.start_iter, images, start_iter, self.max_iter)
        self.start_iter = start_iter
        self.scheduler.base_lrs = list(fresh_base_lrs)
        for group, base_lr in zip(self.optimizer.param_groups, fresh_base_lrs):
            group["initial_lr"] = base_lr
        # the scheduler is stepped after every iteration: at the start of iteration i it is at i
        self.scheduler.last_epoch = start_iter
        for group, lr in zip(self.optimizer.param_groups, self.scheduler.get_lr()):
            group["lr"] = lr

    def build_hooks(self):
        cfg = self.cfg
        ret = [hooks.IterationTimer(), hooks.LRScheduler(self.optimizer, self.scheduler)]
        if self.ema is not None:
            ret.append(hooks.EMAUpdate(self.ema))
        if comm.is_main_process():
            ret.append(hooks.PeriodicCheckpointer(
                self.checkpointer, cfg.SOLVER.CHECKPOINT_PERIOD,
                max_iter=cfg.SOLVER.MAX_ITER, max_to_keep=cfg.SOLVER.CHECKPOINT_MAX_TO_KEEP or None,
            ))

        def test_and_save_results():
            # with SOLVER.EMA.ENABLED the averaged weights are the ones evaluated, as in effdet
            model = self.ema.module if self.ema is not None else self.model
            self._last_eval_results = self.test(self.cfg, model)
            return self._last_eval_results

        if len(cfg.DATASETS.TEST) > 0:
            eval_hook = hooks.EvalHook(cfg.TEST.EVAL_PERIOD, test_and_save_results)
            ret.append(eval_hook)
            if comm.is_main_process() and cfg.SOLVER.BEST_CHECKPOINT.METRIC:
                # right after the evaluation, to see its newest results
                ret.append(hooks.BestCheckpointer(
                    eval_hook, self.checkpointer, metric=cfg.SOLVER.BEST_CHECKPOINT.METRIC,
                    mode=cfg.SOLVER.BEST_CHECKPOINT.MODE,
                ))
            if comm.is_main_process() and cfg.TEST.VIS_NUM_IMAGES > 0:
                # pictures of the model just evaluated (the EMA copy if any)
                ret.append(EvalImages.from_config(
                    cfg, eval_hook,
                    model_fn=lambda: self.ema.module if self.ema is not None else self.model))
        if comm.is_main_process():
            ret.append(hooks.PeriodicWriter(self.build_writers(), period=cfg.LOG_PERIOD))
        # last: its handlers stay until the checkpoint of an early stop is written
        ret.append(hooks.StopOnSignal(hooks.parse_signals(
            cfg.SOLVER.CHECKPOINT_ON_SIGNALS, key="SOLVER.CHECKPOINT_ON_SIGNALS")))
        return ret

    def build_writers(self):
        return [
            CommonMetricPrinter(self.max_iter),
            JSONWriter(os.path.join(self.cfg.OUTPUT_DIR, "metrics.json")),
            TensorboardXWriter(self.cfg.OUTPUT_DIR),
        ]

    def train(self):
        super().train(self.start_iter, self.max_iter)
        return getattr(self, "_last_eval_results", None)

    def run_step(self):
        self._trainer.iter = self.iter
        self._trainer.run_step()

    def state_dict(self):
        ret = super().state_dict()
        ret["_trainer"] = self._trainer.state_dict()
        return ret

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        self._trainer.load_state_dict(state_dict["_trainer"])

    @classmethod
    def build_model(cls, cfg):
        model = build_model(cfg)
        logger = logging.getLogger("detector")
        num_params = sum(p.numel() for p in model.parameters())
        logger.info("Model %s: %.2fM parameters", cfg.MODEL.META_ARCHITECTURE, num_params / 1e6)
        return model

    @classmethod
    def load_for_evaluation(cls, cfg, model, resume: bool = False):
        """Load MODEL.WEIGHTS (or, with ``resume``, the newest checkpoint in OUTPUT_DIR that can
        be read) into ``model`` for --eval-only. With SOLVER.EMA.ENABLED and an "ema" entry in the
        checkpoint, the averaged weights are the ones loaded."""
        logger = logging.getLogger("detector")
        checkpointer = DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR)
        # entries other than "model"
        rest = checkpointer.resume_or_load(cfg.MODEL.WEIGHTS, resume=resume)
        path = checkpointer.resumed_from or cfg.MODEL.WEIGHTS
        if cfg.SOLVER.EMA.ENABLED:
            ema_state = rest.get("ema")
            if isinstance(ema_state, dict) and "module" in ema_state:
                try:
                    model.load_state_dict(ema_state["module"])
                except RuntimeError as err:
                    raise CheckpointError(f"Checkpoint {path}: cannot load its EMA weights: "
                                          f"{str(err).splitlines()[0]}") from None
                logger.info("Evaluating the EMA weights of the checkpoint")
            else:
                logger.warning("SOLVER.EMA.ENABLED but the checkpoint has no EMA weights: "
                               "evaluating its model weights")
        return model

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer(cfg, model)

    @classmethod
    def build_lr_scheduler(cls, cfg, optimizer):
        return build_lr_scheduler(cfg, optimizer)

    @classmethod
    def build_train_loader(cls, cfg):
        return build_detection_train_loader(cfg)

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return build_detection_test_loader(cfg, dataset_name)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_dir=None):
        """A COCOEvaluator for a registered dataset (its metadata gives the GT json and ids)."""
        meta = MetadataCatalog.get(dataset_name)
        json_file = meta.get("json_file")
        if not (json_file and os.path.isfile(json_file) and meta.get("thing_classes")):
            # generated datasets write their json, custom ones set their classes, when loaded;
            # test() builds the loader first, so the annotations are not read a second time
            DatasetCatalog.get(dataset_name)
        if getattr(meta, "evaluator_type", "coco") != "coco":
            raise NotImplementedError(f"No evaluator for dataset '{dataset_name}'")
        id_map = {v: k for k, v in meta.thing_dataset_id_to_contiguous_id.items()}
        return COCOEvaluator(
            gt_json=meta.json_file,
            contiguous_id_to_dataset_id=id_map,
            class_names=list(meta.thing_classes),
            output_dir=output_dir or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name),
            backend=cfg.TEST.COCO_EVAL_BACKEND,
            iou_types=("bbox", "segm") if cfg.MODEL.MASK_ON else ("bbox",),
        )

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        """Evaluate ``model`` on every dataset in DATASETS.TEST; returns {dataset: results}."""
        logger = logging.getLogger("detector")
        # ranks run different numbers of images: no DDP forward logic (collectives) wanted
        model = comm.unwrap_model(model)
        results = OrderedDict()
        for idx, dataset_name in enumerate(cfg.DATASETS.TEST):
            data_loader = cls.build_test_loader(cfg, dataset_name)
            check_num_classes(model, dataset_name)
            evaluator = (evaluators[idx] if evaluators is not None
                         else cls.build_evaluator(cfg, dataset_name))
            if isinstance(evaluator, (list, tuple)):
                evaluator = DatasetEvaluators(evaluator)
            results[dataset_name] = inference_on_dataset(
                model, data_loader, evaluator, amp=cfg.TEST.AMP.ENABLED
            )
            if comm.is_main_process():
                logger.info("Evaluation results for %s: %s", dataset_name,
                            _format_results(results[dataset_name]))
        if len(results) == 1:
            results = list(results.values())[0]
        return results


class _TotalBatchRecord:
    """The images per iteration (over all processes) a checkpoint was trained with, so that a
    run resumed with another total batch can continue after the same number of images."""

    def __init__(self, ims_per_batch: int):
        self.ims_per_batch = int(ims_per_batch)
        self.loaded = None  # the value in the checkpoint last loaded

    def state_dict(self) -> dict:
        return {"ims_per_batch": self.ims_per_batch}

    def load_state_dict(self, state: dict) -> None:
        value = int(state["ims_per_batch"])
        if value <= 0:
            raise ValueError(f"ims_per_batch {value} is not positive")
        self.loaded = value


def check_num_classes(model, dataset_name: str) -> None:
    """A one-line ValueError when ``model`` predicts a different number of classes than the
    dataset has: its predictions would be labelled with the wrong categories."""
    num_classes = getattr(comm.unwrap_model(model), "num_classes", None)
    classes = MetadataCatalog.get(dataset_name).get("thing_classes")
    if num_classes is None or classes is None or int(num_classes) == len(classes):
        return
    key = getattr(comm.unwrap_model(model), "num_classes_key", "the model's NUM_CLASSES")
    raise ValueError(f"The model predicts {num_classes} classes ({key}) but dataset "
                     f"'{dataset_name}' has {len(classes)}; set {key} {len(classes)} for this "
                     f"dataset, or evaluate on a dataset with {num_classes} classes")


def _format_results(results):
    parts = []
    for task, metrics in results.items():
        if isinstance(metrics, dict):
            main = {k: v for k, v in metrics.items() if not k.startswith("AP-")}
            parts.append(task + ": " + ", ".join(f"{k}={v:.3f}" for k, v in main.items()))
    return "; ".join(parts)
