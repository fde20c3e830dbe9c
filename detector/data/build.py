"""Data loaders for training and inference, built from the config."""
import logging
import random
import signal
from typing import Callable, List, Optional, Sequence, Union

import numpy as np
import torch

from detector.utils import comm

from .catalog import DatasetCatalog, MetadataCatalog
from .common import DataLoader, DatasetFromList, MapDataset, TrainingDataLoader, TrainingSamples
from .dataset_mapper import DatasetMapper
from .samplers import InferenceSampler, TrainingBatchSampler, shared_random_seed

__all__ = [
    "get_detection_dataset_dicts", "build_detection_train_loader", "build_detection_test_loader",
    "aspect_ratio_group_ids", "per_process_batch_size",
]

logger = logging.getLogger("detector.data")


def _has_usable_annotation(d: dict) -> bool:
    return any(not a.get("iscrowd", 0) for a in d.get("annotations", []))


def get_detection_dataset_dicts(
    names: Union[str, Sequence[str]], filter_empty: bool = True
) -> List[dict]:
    """Concatenate the dicts of the registered datasets ``names``; with ``filter_empty`` drop
    images without any non-crowd annotation (logged with the count). The datasets must agree on
    their classes, or contiguous ids would mean different things."""
    if isinstance(names, str):
        names = [names]
    names = list(names)
    if not names:
        raise ValueError("No dataset names given (is DATASETS.TRAIN / DATASETS.TEST empty?)")
    dataset_dicts: List[dict] = []
    for name in names:
        dicts = DatasetCatalog.get(name)
        if not dicts:
            raise ValueError(f"Dataset '{name}' has no images")
        dataset_dicts.extend(dicts)
    classes = {n: MetadataCatalog.get(n).get("thing_classes") for n in names}
    known = {n: c for n, c in classes.items() if c is not None}
    if len({tuple(c) for c in known.values()}) > 1:
        raise ValueError(
            "Datasets with different thing_classes cannot be concatenated: "
            + "; ".join(f"{n}: {len(c)} classes starting {c[:3]}" for n, c in known.items())
        )
    if filter_empty:
        before = len(dataset_dicts)
        dataset_dicts = [d for d in dataset_dicts if _has_usable_annotation(d)]
        logger.info("Removed %d of %d images without usable annotations from %s "
                    "(DATALOADER.FILTER_EMPTY_ANNOTATIONS)",
                    before - len(dataset_dicts), before, names)
        if not dataset_dicts:
            raise ValueError(f"No image of {names} has a non-crowd annotation")
    return dataset_dicts


def per_process_batch_size(total_batch_size: int, world_size: Optional[int] = None) -> int:
    """SOLVER.IMS_PER_BATCH split evenly over ``world_size`` processes (default: the current
    process group); a one-line ValueError when it is not positive or does not split evenly."""
    world = comm.get_world_size() if world_size is None else int(world_size)
    if total_batch_size <= 0:
        raise ValueError(f"SOLVER.IMS_PER_BATCH must be positive, got {total_batch_size}")
    if total_batch_size % world != 0:
        raise ValueError(
            f"SOLVER.IMS_PER_BATCH={total_batch_size} is not divisible by the world size {world} "
            f"(every process must get the same number of images)"
        )
    return total_batch_size // world


def _trivial_batch_collator(batch):
    """Batches stay lists of dicts; the model pads images itself."""
    return batch


def _seed_worker(worker_id: int) -> None:
    """Seed numpy/random inside a worker from its torch seed (derived from the loader's
    generator), for user mappers that use those global generators (such a mapper is
    reproducible for a fixed worker count, but not across a resume: see TrainingSamples). Workers ignore SIGINT: a
    terminal's Ctrl-C reaches the whole process group, and the main process alone decides to
    checkpoint and stop (a worker dying first would fail the batch it was preparing)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    seed = torch.initial_seed() % 2 ** 32
    np.random.seed(seed)
    random.seed(seed)


def aspect_ratio_group_ids(dataset_dicts: Sequence[dict]) -> np.ndarray:
    """1 for a landscape image (width > height), 0 otherwise, from the dicts' "height" and
    "width" (grouping must not read images: every rank computes every rank's batches). Dicts
    without a size go to group 0, counted in a warning."""
    ids = np.zeros(len(dataset_dicts), dtype=np.int64)
    unknown = 0
    for i, d in enumerate(dataset_dicts):
        h, w = d.get("height"), d.get("width")
        if h is None or w is None:
            unknown += 1
        else:
            ids[i] = int(w > h)
    if unknown:
        logger.warning("%d of %d training images have no height/width in their dataset dict: "
                       "aspect-ratio grouping puts them with the portrait images",
                       unknown, len(dataset_dicts))
    return ids


def build_detection_train_loader(cfg, mapper: Optional[Callable[[dict], dict]] = None):
    """Endless :class:`TrainingDataLoader` of per-process training batches (lists of
    ``SOLVER.IMS_PER_BATCH // world_size`` mapped dicts) over the concatenated DATASETS.TRAIN.

    The schedule (:class:`TrainingBatchSampler`) is seeded by SEED (a random seed shared by all
    ranks when SEED < 0) and computed alike by every rank; with DATALOADER.ASPECT_RATIO_GROUPING
    a batch holds only landscape or only portrait images. Each sample's augmentation draws from
    its global stream position (:mod:`detector.utils.seeding`), and the loader's
    ``state_dict`` is checkpointed, so a resumed run continues the stream exactly. Images that
    fail to load are replaced, logged and counted (see :class:`TrainingSamples`). With
    INPUT.STITCH > 0 batches are stitched (:mod:`detector.data.stitch`)."""
    dataset_dicts = get_detection_dataset_dicts(
        cfg.DATASETS.TRAIN, filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS
    )
    if mapper is None:
        mapper = DatasetMapper(**DatasetMapper.from_config(cfg, is_train=True))
    world_size = comm.get_world_size()
    batch_size = per_process_batch_size(cfg.SOLVER.IMS_PER_BATCH, world_size)
    seed = cfg.SEED if cfg.SEED >= 0 else shared_random_seed()
    group_ids = (aspect_ratio_group_ids(dataset_dicts)
                 if cfg.DATALOADER.ASPECT_RATIO_GROUPING else None)
    batch_sampler = TrainingBatchSampler(len(dataset_dicts), batch_size=batch_size, seed=seed,
                                         group_ids=group_ids)
    samples = TrainingSamples(DatasetFromList(dataset_dicts), mapper, seed=seed)
    logger.info("Training on %d images from %s: %d image(s) per batch per process, %d worker(s)",
                len(dataset_dicts), list(cfg.DATASETS.TRAIN), batch_size,
                cfg.DATALOADER.NUM_WORKERS)
    return TrainingDataLoader(samples, batch_sampler, num_workers=cfg.DATALOADER.NUM_WORKERS,
                              worker_init_fn=_seed_worker, stitch_prob=cfg.INPUT.STITCH)


def build_detection_test_loader(cfg, dataset_name: str,
                                mapper: Optional[Callable[[dict], dict]] = None):
    """Loader over every image of ``dataset_name`` (no filtering), one image per batch, this
    rank's contiguous shard only (InferenceSampler). Load errors propagate, from worker
    processes too with their original message (see ``common.unwrap_worker_error``)."""
    dataset_dicts = get_detection_dataset_dicts(dataset_name, filter_empty=False)
    if mapper is None:
        mapper = DatasetMapper(**DatasetMapper.from_config(cfg, is_train=False))
    dataset = MapDataset(DatasetFromList(dataset_dicts), mapper)
    return DataLoader(
        dataset,
        batch_size=1,
        sampler=InferenceSampler(len(dataset)),
        num_workers=cfg.DATALOADER.NUM_WORKERS,
        collate_fn=_trivial_batch_collator,
    )
