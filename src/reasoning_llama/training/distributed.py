"""Data-parallel training through PyTorch's own engine: DDP or FSDP2 under `torchrun`.

`torchrun` starts one process per device and sets RANK, WORLD_SIZE and LOCAL_RANK; `setup` joins the
group (NCCL on CUDA, gloo on CPU) and says which device this process owns. `wrap` then gives the
`ModelWithLoss` its data-parallel form:

- ddp: every rank holds the whole model; gradients are averaged by all-reduce during backward.
- fsdp: `fully_shard` on each decoder layer, then the root (embedding, final norm and block, head):
  parameters, gradients and optimizer state are split across ranks and gathered layer by layer.
  On CUDA the gathered parameters are bf16 and gradients are reduced in fp32.

Both average gradients over ranks, so each rank scales its loss by the world size: the result is
the token-level mean over the whole global batch, as in one process (see `Trainer.step`).
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from reasoning_llama.errors import ConfigError

Mode = Literal["none", "ddp", "fsdp"]
MODES = ("auto", "none", "ddp", "fsdp")
T = TypeVar("T")
E = TypeVar("E", bound=BaseException)


@dataclass(frozen=True)
class World:
    """This process's place in the run: its rank, the number of processes, the data-parallel mode."""

    mode: Mode = "none"
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that logs, writes metrics and shows progress."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 or self.mode != "none"


SINGLE = World()  # one process, no group


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ


def elastic_restart_count() -> int:
    """How often `torchrun --max-restarts` has restarted this group (0 on the first attempt)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def resolve_mode(requested: str) -> Mode:
    """`train.distributed`: auto = ddp under torchrun with more than one process, else none."""
    if requested not in MODES:
        raise ConfigError(f"train.distributed must be one of {', '.join(MODES)}, got {requested!r}")
    if requested == "auto":
        return "ddp" if launched_by_torchrun() and int(os.environ["WORLD_SIZE"]) > 1 else "none"
    if requested != "none" and not launched_by_torchrun():
        raise ConfigError(
            f"train.distributed={requested} needs the processes torchrun starts, e.g. "
            "torchrun --nproc_per_node 2 -m reasoning_llama train ..."
        )
    if requested == "none" and launched_by_torchrun() and int(os.environ["WORLD_SIZE"]) > 1:
        # Every process would train alone as rank 0, writing the same files.
        raise ConfigError(
            f"train.distributed=none with {os.environ['WORLD_SIZE']} torchrun processes; "
            "pass --set train.distributed=auto (or ddp, fsdp)"
        )
    return requested  # type: ignore[return-value]


def setup(requested: str, device_name: str) -> tuple[World, torch.device]:
    """Join the process group when there is one to join; return the world and this process's device."""
    from reasoning_llama.generation import resolve_device

    mode = resolve_mode(requested)
    device = resolve_device(device_name, use_cpu="--set train.device=cpu")
    if mode == "none":
        return SINGLE, device
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        # A rank that dies mid-collective must not leave the others waiting for the default 30 minutes.
        timeout = datetime.timedelta(minutes=10)
        store = _attempt_store(rank, timeout)
        # Naming the GPU binds NCCL's barriers to it (without, each barrier guesses and warns).
        device_id = device if device.type == "cuda" else None
        dist.init_process_group(
            backend, store=store, rank=rank, world_size=world_size, timeout=timeout, device_id=device_id
        )
    return World(mode, rank, world_size, local_rank), device


def _attempt_store(rank: int, timeout: datetime.timedelta) -> dist.Store:
    """torchrun's key-value store, with keys of their own for this restart attempt.

    With the default `env://` set-up, a group restarted by `torchrun --max-restarts` found the
    previous attempt's gloo addresses in the store and tried to connect to the dead processes
    (torch 2.13: "connectFullMesh failed ... Connection refused"), so every attempt gets a prefix.
    """
    agent_hosts_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world_size=int(os.environ["WORLD_SIZE"]),
        is_master=rank == 0 and not agent_hosts_store,
        timeout=timeout,
    )
    return dist.PrefixStore(f"reasoning-llama/attempt-{elastic_restart_count()}", store)


def teardown(*, together: bool = True) -> None:
    """Leave the group; `together` first waits for every rank (a rank that tears its connections down
    while another still uses them can make gloo abort the process at exit). After an error, don't wait."""
    if dist.is_initialized():
        if together:
            dist.barrier()
        dist.destroy_process_group()


def wrap(module: nn.Module, layers: nn.ModuleList, world: World, device: torch.device) -> nn.Module:
    """The data-parallel form of `module` (a ModelWithLoss whose decoder layers are `layers`)."""
    if world.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=device_ids)
    if world.mode == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = (
            MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            if device.type == "cuda"
            else MixedPrecisionPolicy()
        )
        for layer in layers:
            fully_shard(layer, mp_policy=policy)
        fully_shard(module, mp_policy=policy)
    return module


def gradient_sync(wrapped: nn.Module, world: World, enabled: bool) -> Any:
    """A context in which backward does (or, for all but the last micro-batch, skips) the gradient sync."""
    from contextlib import nullcontext

    if world.mode == "ddp" and not enabled:
        return wrapped.no_sync()  # type: ignore[operator]
    if world.mode == "fsdp":
        wrapped.set_requires_gradient_sync(enabled)  # type: ignore[operator]
    return nullcontext()


def all_reduce_sum(tensor: torch.Tensor, world: World) -> torch.Tensor:
    if world.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_from_main(value: T, world: World) -> T:
    """Rank 0's `value` on every rank (any picklable object; rank 0's own ranks' values are ignored)."""
    if not world.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class StopVote:
    """Whether any rank was asked to stop (Ctrl-C), agreed at every step without waiting for it: each
    step starts a vote on a gloo group of its own (CPU tensors: no device sync, no wait on the
    training's collectives) and reads the previous step's, so every rank stops after the same step."""

    def __init__(self, world: World) -> None:
        self.world = world
        self._group = dist.new_group(backend="gloo") if world.distributed else None
        self._pending: tuple[torch.Tensor, Any] | None = None

    def cast(self, wants_stop: bool) -> bool:
        """This step's vote; True on every rank alike once a vote said stop (one step later when distributed)."""
        if not self.world.distributed:
            return wants_stop
        decided = self.close()
        ballot = torch.tensor([float(wants_stop)])
        self._pending = (ballot, dist.all_reduce(ballot, group=self._group, async_op=True))
        return decided

    def close(self) -> bool:
        """Wait for the vote in flight (before the group goes away); whether it said stop."""
        if self._pending is None:
            return False
        ballot, work = self._pending
        self._pending = None
        work.wait()
        return bool(ballot.item() > 0)


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def left_to_main(error: E, world: World) -> E:
    """`error`, met alike by every rank, marked so that only rank 0 prints it (see `cli.main`)."""
    error.told_by_main = not world.is_main  # type: ignore[attr-defined]
    return error


def on_every(world: World, action: Callable[[], T]) -> T:
    """Run `action` on every rank (each reads its own files, say) and agree on the outcome: if any
    rank failed, the first such error is raised on every rank (rank 0 prints it, naming the rank)."""
    try:
        outcome: tuple[bool, Any] = (True, action())
    except Exception as e:
        if not world.distributed:
            raise
        outcome = (False, e)
    if not world.distributed:
        return outcome[1]
    failures: list[Any] = [None] * world.world_size
    dist.all_gather_object(failures, None if outcome[0] else _portable(outcome[1]))
    failed = next((rank for rank, error in enumerate(failures) if error is not None), None)
    if failed is None:
        return outcome[1]
    if failed == world.rank:
        error = outcome[1]
        # Rank 0 prints it; so does this rank if it runs on another machine (whose terminal shows it).
        error.told_by_main = not world.is_main and os.environ.get("GROUP_RANK", "0") == "0"
        raise error
    error = failures[failed]
    with contextlib.suppress(Exception):  # the same kind of error, saying where it happened
        error = type(error)(f"on rank {failed}: {error}")
    raise left_to_main(error, world)


def _portable(error: Exception) -> Exception:
    """`error` if it survives pickling (to reach the other ranks), else a RuntimeError saying it."""
    import pickle

    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")


def on_main(world: World, action: Callable[[], T]) -> T | None:
    """Run `action` on rank 0 and share its outcome: its value, or its error raised on every rank."""
    outcome: tuple[bool, Any] = (True, None)
    if world.is_main:
        try:
            outcome = (True, action())
        except Exception as e:  # re-raised below, on every rank, so no rank waits for the others
            outcome = (False, e)
    ok, value = broadcast_from_main(outcome, world)
    if not ok:
        raise left_to_main(value, world)
    return value
