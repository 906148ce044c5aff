"""Process-group plumbing for torchrun: who this process is, init/teardown and the few collectives trainers use.

    world = distributed.init()            # under torchrun: the process group from its env vars; else world size 1
    rows = world.share(global_rows)       # this rank's contiguous share of a global batch
    distributed.all_reduce_grads(params)  # every rank ends with the sum of all ranks' gradients
    if world.is_main: save(...)
    distributed.teardown()

Backend: NCCL when CUDA is available (rank r on cuda:LOCAL_RANK), else gloo (CPU). A plain `python script.py`
(no RANK / WORLD_SIZE in the environment) initialises nothing, and every collective is a no-op at world size 1.
"""

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0  # this process's rank, 0 .. size - 1
    size: int = 1  # number of processes (torchrun's WORLD_SIZE)
    local_rank: int = 0  # rank on this node (selects the GPU under NCCL)

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that logs, writes checkpoints and saves artifacts."""
        return self.rank == 0

    def owner(self, item: int) -> int:
        """The rank of work item i (a cache shard, a sampling batch): items are dealt out in snake order
        0, 1, .., N-1, N-1, .., 1, 0, 0, 1, .. so that items sorted by size give every rank a similar share."""
        turn, place = divmod(item, self.size)
        return place if turn % 2 == 0 else self.size - 1 - place

    def owns(self, item: int) -> bool:
        return self.owner(item) == self.rank

    def share(self, items: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous share of a global batch: rank r gets piece r of `tensor_split(size)`."""
        return items.tensor_split(self.size)[self.rank]


def launched() -> bool:
    """Is this process one of torchrun's workers (RANK and WORLD_SIZE set)?"""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def world() -> World:
    """This process's place in the initialised process group (world size 1 when there is none)."""
    if not (dist.is_available() and dist.is_initialized()):
        return World()
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def init() -> World:
    """Join torchrun's process group (env:// rendezvous: MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE); a no-op
    returning world size 1 outside torchrun."""
    if not launched():
        return World()
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            dist.init_process_group("nccl")
        else:
            dist.init_process_group("gloo")
    return world()


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def device() -> torch.device:
    """The device this rank computes on: cuda:LOCAL_RANK under NCCL, else the CPU."""
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", world().local_rank)
    return torch.device("cpu")


def barrier() -> None:
    if world().size > 1:
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of `tensor` over all ranks (a new tensor on tensor's device; a copy at world size 1)."""
    out = tensor.detach().to(device(), copy=True)
    if world().size > 1:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.to(tensor.device)


def broadcast(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Rank `src`'s `tensor` on every rank (a new tensor; a copy at world size 1)."""
    out = tensor.detach().to(device(), copy=True)
    if world().size > 1:
        dist.broadcast(out, src)
    return out.to(tensor.device)


def global_means(parts: list[torch.Tensor]) -> list[torch.Tensor]:
    """Means over a global batch of per-row values split across ranks: this rank's sums divided by the counts
    summed over all ranks (one all-reduce). The ranks' results add up to the global means, and their gradients
    to the global gradient; at world size 1 they are the plain means (0 for an empty part)."""
    counts = all_reduce_sum(torch.tensor([float(p.numel()) for p in parts], dtype=torch.float64))  # (n,)
    return [p.sum() / max(c, 1.0) for p, c in zip(parts, counts.tolist(), strict=True)]


def all_reduce_grads(params: list[torch.nn.Parameter]) -> None:
    """Replace every gradient by its sum over all ranks, in one flat all-reduce (a missing gradient counts as 0).

    With each rank's loss normalised by the global batch's counts, this sum is exactly the gradient of the
    global batch: DDP's all-reduce without its forward hooks (the trainers run several modules per step)."""
    if world().size == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = all_reduce_sum(torch.cat([g.reshape(-1) for g in grads]))
    at = 0
    for p in params:
        p.grad = flat[at : at + p.numel()].view_as(p).to(p.dtype).clone()
        at += p.numel()


@torch.no_grad()
def broadcast_params(params: list[torch.nn.Parameter], src: int = 0) -> None:
    """Start every rank from rank `src`'s weights (as DDP does when it wraps a module)."""
    if world().size == 1:
        return
    for p in params:
        p.copy_(broadcast(p.data, src))


def check_shards(directory: Path, entries: list[dict], what: str) -> list[Path]:
    """The shard files an index lists ({"name", "rank"} entries); a missing one raises, naming it and its rank."""
    paths = [Path(directory) / e["name"] for e in entries]
    for entry, path in zip(entries, paths, strict=True):
        if not path.is_file():
            raise FileNotFoundError(
                f"{what} shard {path.name} (rank {entry['rank']} writes it) is missing from {directory}: "
                f"that rank did not finish; rerun the sampling (it skips the shards already written)"
            )
    return paths
