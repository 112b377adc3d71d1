"""Data parallelism across processes and nodes (`nestc run --nproc N`, or torchrun).

Gradients are averaged by `torch.nn.parallel.DistributedDataParallel` (bucketed, overlapped with
the backward pass). Everything else the processes must agree on goes through the few collectives
here: an error on one process during set-up becomes the same clear error on all of them (never a
hang in a collective the failed one never reaches), the first process decides what to resume and
sends the checkpoint's bytes to the others (so only its node needs the run directory), and a
Ctrl-C on any process stops all of them after the same step.
"""

from __future__ import annotations

import gc
import os

import torch


class SetupFailed(Exception):
    """Raised on every process when one of them could not set up: the message is that one's."""


def start(batch: int, device: str) -> tuple[int, int]:
    """(world size, rank) under torch.distributed's launcher, which sets WORLD_SIZE and RANK;
    gloo on the CPU, nccl on GPUs (each process on the GPU of its local rank)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 1, 0
    if batch % world:
        raise ValueError(f"the batch ({batch}) must divide evenly among {world} processes")
    if device.startswith("cuda"):
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    torch.distributed.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return world, torch.distributed.get_rank()


def _wire_device() -> torch.device:
    """Where collective tensors live: nccl moves only GPU tensors."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_bytes(data: bytes | None, source: int) -> bytes:
    """`data` from process `source` to every process (the others pass None)."""
    device = _wire_device()
    size = torch.tensor([len(data) if data is not None else 0], dtype=torch.int64, device=device)
    torch.distributed.broadcast(size, source)
    if data is not None:
        payload = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device) if data else \
            torch.empty(0, dtype=torch.uint8, device=device)
    else:
        payload = torch.empty(int(size.item()), dtype=torch.uint8, device=device)
    if payload.numel():
        torch.distributed.broadcast(payload, source)
    return bytes(payload.cpu().numpy().tobytes())


def agree(failure: Exception | None) -> None:
    """Every process calls this at the same point; if any of them failed, all raise SetupFailed
    with the message of the lowest-ranked one that failed, and leave the process group."""
    world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    first = torch.tensor([rank if failure is not None else world], dtype=torch.int64, device=_wire_device())
    torch.distributed.all_reduce(first, op=torch.distributed.ReduceOp.MIN)
    source = int(first.item())
    if source == world:
        return
    message = broadcast_bytes(str(failure).encode("utf-8") if rank == source else None, source).decode("utf-8")
    torch.distributed.destroy_process_group()
    raise SetupFailed(message if rank == source else f"process {source} of {world}: {message}")


def any_process(flag: bool) -> bool:
    """Whether `flag` holds on any process (a Ctrl-C that reached one of them)."""
    value = torch.tensor([int(flag)], dtype=torch.int64, device=_wire_device())
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return bool(value.item())


def mean(value: torch.Tensor) -> torch.Tensor:
    """The mean of a scalar over the processes (the loss each computed on its slice)."""
    total = value.detach().clone()
    torch.distributed.all_reduce(total)
    return total / torch.distributed.get_world_size()


def wrap(model: torch.nn.Module, device: str) -> torch.nn.Module:
    """The model under DistributedDataParallel; its constructor sends the first process's weights
    to the others, so every process starts from the same (possibly resumed) parameters."""
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [torch.cuda.current_device()] if device.startswith("cuda") else None
    return DistributedDataParallel(model, device_ids=device_ids)


def finish() -> None:
    """Leave the process group once every process is done (the caller has dropped its DDP wrapper).
    A process that tears its group down while another still works (the first one evaluating), or
    whose gloo work objects outlive the interpreter (they hold tensors, whose release then needs
    the GIL), aborts ("terminate called without an active exception"): hence the barrier, and the
    collection of the wrapper's reducer and its last works while Python is fully alive."""
    gc.collect()
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def launch(processes: int, arguments: list[str]) -> int:
    """Run `nestc run ARGUMENTS` in `processes` processes on this machine through torch's elastic
    launcher (what `torchrun --standalone` does); returns the exit code. Each process prints its
    own error; a failure is summarised in one line instead of the launcher's traceback."""
    import logging
    import sys
    import uuid

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # its warnings restate ours
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=processes, rdzv_backend="c10d",
                          rdzv_endpoint="localhost:0", run_id=str(uuid.uuid4()), max_restarts=0)
    try:
        elastic_launch(config, entrypoint=sys.executable)("-m", "nestc", "run", *arguments)
    except ChildFailedError as error:
        rank, failure = error.get_first_failure()
        print(f"process {rank} of {processes} failed (exit code {failure.exitcode})",
              file=sys.stderr)
        return failure.exitcode if failure.exitcode > 0 else 1
    return 0
