"""Data loaders for training and inference, built from the config."""
import logging
import random
import signal
from typing import Callable, List, Optional, Sequence, Union

import numpy as np
import torch
import torch.utils.data as torchdata

from detector.utils import comm

from .catalog import DatasetCatalog, MetadataCatalog
from .common import DataLoader, DatasetFromList, MapDataset, MappedTrainingStream
from .dataset_mapper import DatasetMapper
from .samplers import (
    AspectRatioGroupedDataset,
    InferenceSampler,
    TrainingSampler,
    shared_random_seed,
)

__all__ = [
    "get_detection_dataset_dicts", "build_detection_train_loader", "build_detection_test_loader",
    "build_batch_data_loader", "per_process_batch_size",
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


def _identity(item):
    return item


def _seed_worker(worker_id: int) -> None:
    """Seed numpy/random inside a worker from its torch seed (derived from the loader's
    generator), for user mappers that use those global generators. Workers ignore SIGINT: a
    terminal's Ctrl-C reaches the whole process group, and the main process alone decides to
    checkpoint and stop (a worker dying first would fail the batch it was preparing)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    seed = torch.initial_seed() % 2 ** 32
    np.random.seed(seed)
    random.seed(seed)


def build_batch_data_loader(
    stream: torchdata.IterableDataset,
    batch_size: int,
    *,
    num_workers: int,
    aspect_ratio_grouping: bool,
    seed: int,
):
    """Iterable of lists of ``batch_size`` mapped dicts from an endless ``stream``."""
    common = dict(num_workers=num_workers, worker_init_fn=_seed_worker,
                  generator=torch.Generator().manual_seed(seed))
    if aspect_ratio_grouping:
        loader = DataLoader(stream, batch_size=None, collate_fn=_identity, **common)
        return AspectRatioGroupedDataset(loader, batch_size)
    return DataLoader(stream, batch_size=batch_size, drop_last=True,
                                collate_fn=_trivial_batch_collator, **common)


def build_detection_train_loader(cfg, mapper: Optional[Callable[[dict], dict]] = None):
    """Endless iterable of per-process training batches (lists of
    ``SOLVER.IMS_PER_BATCH // world_size`` mapped dicts) over the concatenated DATASETS.TRAIN.

    Sampling is seeded by SEED (shared by all ranks; a random shared seed when SEED < 0), sharded
    by rank and then by worker. Images that fail to load are skipped with a warning
    (see ``MappedTrainingStream``)."""
    dataset_dicts = get_detection_dataset_dicts(
        cfg.DATASETS.TRAIN, filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS
    )
    if mapper is None:
        mapper = DatasetMapper(**DatasetMapper.from_config(cfg, is_train=True))
    world_size = comm.get_world_size()
    batch_size = per_process_batch_size(cfg.SOLVER.IMS_PER_BATCH, world_size)
    seed = cfg.SEED if cfg.SEED >= 0 else shared_random_seed()
    sampler = TrainingSampler(len(dataset_dicts), shuffle=True, seed=seed)
    stream = MappedTrainingStream(DatasetFromList(dataset_dicts), mapper, sampler, seed=seed)
    logger.info("Training on %d images from %s: %d image(s) per batch per process, %d worker(s)",
                len(dataset_dicts), list(cfg.DATASETS.TRAIN), batch_size,
                cfg.DATALOADER.NUM_WORKERS)
    return build_batch_data_loader(
        stream, batch_size,
        num_workers=cfg.DATALOADER.NUM_WORKERS,
        aspect_ratio_grouping=cfg.DATALOADER.ASPECT_RATIO_GROUPING,
        seed=seed,
    )


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
