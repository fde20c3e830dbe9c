"""Process-group helpers; every function also works when torch.distributed is not initialized."""
import torch
import torch.distributed as dist

__all__ = [
    "unwrap_model", "model_device",
    "get_world_size", "get_rank", "get_local_rank", "is_main_process", "synchronize",
    "all_gather", "gather", "reduce_dict", "all_reduce_sum", "loss_divisor",
]

_LOCAL_RANK = 0


def is_dist_ready() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    return dist.get_world_size() if is_dist_ready() else 1


def get_rank() -> int:
    return dist.get_rank() if is_dist_ready() else 0


def set_local_rank(rank: int) -> None:
    global _LOCAL_RANK
    _LOCAL_RANK = int(rank)


def get_local_rank() -> int:
    return _LOCAL_RANK


def is_main_process() -> bool:
    return get_rank() == 0


def synchronize() -> None:
    if get_world_size() > 1:
        dist.barrier()


def all_gather(data):
    """Gather any picklable object from every rank; returns a list indexed by rank."""
    if get_world_size() == 1:
        return [data]
    output = [None] * get_world_size()
    dist.all_gather_object(output, data)
    return output


def gather(data, dst: int = 0):
    """Gather picklable objects to rank ``dst``; other ranks get an empty list."""
    if get_world_size() == 1:
        return [data]
    output = [None] * get_world_size() if get_rank() == dst else None
    dist.gather_object(data, output, dst=dst)
    return output if get_rank() == dst else []


def reduce_dict(values: dict, average: bool = True) -> dict:
    """All-reduce a dict of scalar tensors (same keys on every rank)."""
    world = get_world_size()
    if world == 1:
        return values
    with torch.no_grad():
        names = sorted(values.keys())
        stacked = torch.stack([values[k].detach().float() for k in names])
        dist.all_reduce(stacked)
        if average:
            stacked /= world
        return {k: v for k, v in zip(names, stacked)}


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """A new tensor holding ``tensor`` summed over all ranks (the input is left untouched; no
    gradient flows through). With NCCL the tensor must be on this rank's GPU."""
    if get_world_size() == 1:
        return tensor.detach().clone()
    with torch.no_grad():
        total = tensor.detach().clone()
        dist.all_reduce(total)
        return total


def loss_divisor(counts: torch.Tensor, *, sum_over_ranks: bool) -> torch.Tensor:
    """Loss divisors (float) from per-process counts: ``max(count, 1)``, or with
    ``sum_over_ranks`` under W processes ``max(count summed over the processes, 1) / W``, so
    that DDP's averaged gradients are those of the whole batch on one process. A collective
    then: every rank must call it."""
    counts = counts.float()
    world_size = get_world_size()
    if sum_over_ranks and world_size > 1:
        return all_reduce_sum(counts).clamp(min=1.0) / world_size
    return counts.clamp(min=1.0)


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DistributedDataParallel / DataParallel wrapper (else ``model``)."""
    wrappers = (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)
    return model.module if isinstance(model, wrappers) else model


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of ``model``: its ``device`` attribute (the detectors have one), else that of
    its first parameter, else the CPU."""
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")
