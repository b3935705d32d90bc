"""Training across processes: ``torchrun --nproc_per_node=N train.py ...`` (also finetune.py and ema.py).

Every process (rank) runs the same script with the same config. :func:`setup` joins the process group torchrun
describes in the environment (gloo on CPU, NCCL on CUDA, one GPU per local rank); Hydra's submitit launcher on
SLURM starts its tasks without torchrun, so there the same variables are derived from SLURM's
(``submitit.helpers.TorchDistributedEnvironment``). Then

- every rank builds the same data and the same batches of each epoch (they are a pure function of the seed and the
  epoch), and trains on its contiguous shard of every global batch (:func:`shard`); ``train.batch_size`` stays the
  global batch. DistributedDataParallel averages the ranks' gradients, and the average of equal shards' mean losses
  is the global batch's mean loss, so N processes take the steps one process takes, up to float summation order;
- the EMA, evaluation, checkpoints, TensorBoard and results.json are rank 0's alone (:func:`is_main`);
- ``train.sync_bn=true`` converts BatchNorm to SyncBatchNorm, whose statistics are those of the global batch
  (without it each rank normalises with its shard's statistics: equivalent to one process only without BatchNorm).

A rank that dies takes the job down: torchrun stops the other ranks, each survivor prints one line (:func:`lost`)
and the job exits non-zero; checkpoints are written atomically, so the last one stays readable and ``resume=``
continues from it.
"""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from mergelab.errors import UserError


class RankLost(Exception):
    """Another rank of the job died (the collective failed, or torchrun stopped this rank)."""


def launched() -> bool:
    """Whether this process is one rank of a multi-process job (torchrun, or a multi-task submitit job)."""
    tasks = os.environ.get("SUBMITIT_LOCAL_NTASKS") or os.environ.get("SLURM_NTASKS") or "1"
    if "RANK" not in os.environ and os.environ.get("SUBMITIT_EXECUTOR") and int(tasks) > 1:
        _export_submitit_environment()
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _export_submitit_environment() -> None:
    """A SLURM/submitit task of a multi-task job: MASTER_ADDR, RANK, WORLD_SIZE, LOCAL_RANK... from SLURM's."""
    try:
        from submitit.helpers import TorchDistributedEnvironment

        TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    except (ImportError, RuntimeError, KeyError):
        pass  # not inside a submitit job after all: stays one process


def setup(device: torch.device) -> torch.device:
    """Join the job's process group (once) and return this rank's device: ``cuda:<local rank>`` for CUDA runs."""
    if not launched():
        return device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        # torchrun stops the surviving ranks with SIGTERM when one dies: end with one line, not a traceback.
        signal.signal(signal.SIGTERM, _terminated)
    return device


def _terminated(signum, frame):
    raise RankLost("torchrun stopped this rank because another rank of the job failed")


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    """Rank 0 (or a single process): the one that evaluates, logs and writes files."""
    return rank() == 0


def check_batch_size(batch_size: int) -> None:
    if batch_size % world_size():
        raise UserError(f"train.batch_size={batch_size} is not divisible by the {world_size()} processes; "
                        f"use a multiple of {world_size()} (it is the global batch, split evenly across ranks)")


def shard(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's contiguous share of a global batch (the whole batch in a single process)."""
    n = world_size()
    if n == 1:
        return x, y
    size = len(x) // n
    start = rank() * size
    return x[start:start + size], y[start:start + size]


def wrap(model: nn.Module, sync_bn: bool = False) -> nn.Module:
    """The module to train: ``model`` itself in a single process, else a DistributedDataParallel around it
    (BatchNorm converted to SyncBatchNorm in place first when ``sync_bn``). Parameters stay ``model``'s."""
    if world_size() == 1:
        return model
    if sync_bn and not next(model.parameters()).is_cuda:
        raise UserError("train.sync_bn=true needs CUDA: PyTorch's SyncBatchNorm runs on GPUs only; "
                        "drop train.sync_bn on CPU")
    if sync_bn:
        for name, child in list(model.named_children()):
            setattr(model, name, nn.SyncBatchNorm.convert_sync_batchnorm(child))
    device_ids = [torch.cuda.current_device()] if next(model.parameters()).is_cuda else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def agree(value):
    """Rank 0's ``value`` (any picklable object) on every rank."""
    if world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def discard_folder(folder: Path) -> None:
    """Remove a run folder that Hydra made for this rank and that rank 0's replaces (its clock named it by another
    second), if it holds nothing but Hydra's own files."""
    if folder.is_dir() and all(p.name == ".hydra" or p.suffix == ".log" for p in folder.iterdir()):
        shutil.rmtree(folder, ignore_errors=True)


def lost(exc: BaseException) -> bool:
    """Whether ``exc`` means another rank died: torchrun's SIGTERM, or a collective whose peer is gone."""
    if isinstance(exc, RankLost):
        return True
    return world_size() > 1 and isinstance(exc, (RuntimeError, dist.DistBackendError)) and any(
        word in str(exc) for word in ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
                                      "NCCL communicator was aborted", "failed to recv", "Socket Timeout"))


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
