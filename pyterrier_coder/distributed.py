"""Data-parallel training under ``torchrun`` (torch.distributed): every trainer's loop uses it, nothing else does.

Launch any training script with ``torchrun --nproc_per_node=N script.py``: each process builds the same
components and calls ``fit`` as usual. The shared :class:`~pyterrier_coder.training.TrainingLoop` then

- draws the *same* global batches on every rank (same seed) and gives each rank a strided shard of it;
- weights each rank's loss by its share of the global batch and sums the gradients over ranks (all-reduce in
  buckets), so an optimiser step sees exactly the gradient of one process on the whole global batch;
- validates on rank 0 only and broadcasts the value (best-checkpoint and early-stopping decisions agree);
- draws progress bars and writes resumable checkpoints on rank 0 only.

Gradients are reduced explicitly after backward rather than through ``DistributedDataParallel``'s forward hooks
because the trainers' losses call into several modules (encoder, candidate store, optional head) instead of one
``module(batch)`` forward; the arithmetic is the same as DDP's (NCCL on GPUs, gloo on CPU).

Where CUDA is present the process group has both backends (``cpu:gloo,cuda:nccl``): a run that trains on the
GPUs reduces with NCCL, one that trains on CPU on the same machine (``device='cpu'``) with gloo, and picklable
objects (rank 0's validation value) always travel over gloo.
"""
from __future__ import annotations

import atexit
import os
import sys
from datetime import timedelta
from typing import Iterable, Optional

import torch
import torch.distributed as dist

#: elements per all-reduce bucket: bounds the extra memory of the flattened gradients
BUCKET_ELEMENTS = 1 << 24

#: how long a rank waits in a collective before the job is aborted. Rank 0 validates alone while the others wait
#: for its value, and NCCL's default of 10 minutes is shorter than a validation by retrieval over a large index.
TIMEOUT = timedelta(hours=2)


def launched() -> bool:
    """True in a process started by torchrun (or any launcher setting WORLD_SIZE > 1)."""
    return int(os.environ.get('WORLD_SIZE', '1')) > 1


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else int(os.environ.get('RANK', '0'))


def world_size() -> int:
    return dist.get_world_size() if active() else int(os.environ.get('WORLD_SIZE', '1'))


def local_rank() -> int:
    return int(os.environ.get('LOCAL_RANK', '0'))


def local_gpu(count: Optional[int] = None) -> int:
    """The index of this rank's GPU among the visible ones: ``LOCAL_RANK`` modulo their number, because launchers
    that bind one GPU per process (Slurm's GPU binding) show each process only its own GPU, as device 0."""
    count = torch.cuda.device_count() if count is None else count
    return local_rank() % max(1, count)


def is_main_process() -> bool:
    """Rank 0 (or not distributed): the process that should save models and write reports."""
    return rank() == 0


def init(device: Optional[torch.device] = None) -> bool:
    """Joins the process group set up by torchrun; no-op otherwise. Returns whether training is distributed.

    ``device`` is the training device: a CUDA device becomes this process's current GPU (NCCL works on it). The
    group uses gloo for CPU tensors and, where CUDA is present, NCCL for CUDA tensors."""
    if launched() and dist.is_available() and not dist.is_initialized():
        if device is not None and torch.device(device).type == 'cuda':
            torch.cuda.set_device(torch.device(device))
        backend = 'cpu:gloo,cuda:nccl' if torch.cuda.is_available() else 'gloo'
        dist.init_process_group(backend=backend, timeout=TIMEOUT)
        # the group is ours, so is its teardown: a process that exits with it still up can abort in gloo's
        # threads ("terminate called without an active exception", SIGABRT: 5 of 36 two-rank runs here), and
        # torchrun then kills the other ranks, perhaps while rank 0 still saves the model
        atexit.register(_destroy_at_exit)
    return active()


def _destroy_at_exit() -> None:
    # not after an uncaught exception: NCCL's teardown waits for pending collectives, which the other ranks,
    # still training, would never complete (a hang instead of torchrun stopping the job)
    if getattr(sys, 'last_value', None) is not None or getattr(sys, 'last_exc', None) is not None:
        return
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class DataParallel:
    """What the training loop needs from torch.distributed; with one process every method is a no-op."""

    def __init__(self, device: Optional[torch.device] = None):
        self.device = torch.device(device) if device is not None else torch.device('cpu')
        self.enabled = init(self.device)
        self.rank = rank() if self.enabled else 0
        self.world = world_size() if self.enabled else 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, batch):
        """This rank's part of a global batch (strided, so shard sizes differ by at most one)."""
        return batch if self.world == 1 else batch[self.rank::self.world]

    def any(self, flag: bool) -> bool:
        if not self.enabled:
            return flag
        t = torch.tensor([int(flag)], device=self._reduce_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def broadcast(self, value):
        """``value`` of rank 0, on every rank (any picklable object)."""
        if not self.enabled:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _reduce_device(self) -> torch.device:
        """Where the gradients are, so the group's backend for that device reduces them (NCCL / gloo)."""
        return self.device if self.device.type == 'cuda' else torch.device('cpu')

    def sum_scalar(self, value: float) -> float:
        """Sum of a float over ranks (works with NCCL and gloo)."""
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self._reduce_device())
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return float(t.item())

    def sum_gradients(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """Sums ``.grad`` over ranks in flattened buckets. A parameter that got a gradient on some rank only gets
        zeros elsewhere first; one that got none anywhere keeps ``grad=None`` (as in a single process, so the
        optimiser skips it there too)."""
        if not self.enabled:
            return
        params = [p for p in parameters if p.requires_grad]
        if not params:
            return
        device = self._reduce_device()
        has = torch.tensor([p.grad is not None for p in params], dtype=torch.uint8, device=device)
        dist.all_reduce(has, op=dist.ReduceOp.MAX)
        used = [p for p, h in zip(params, has.tolist()) if h]
        for p in used:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        bucket, size = [], 0
        for p in used:
            bucket.append(p)
            size += p.numel()
            if size >= BUCKET_ELEMENTS:
                self._reduce_bucket(bucket)
                bucket, size = [], 0
        if bucket:
            self._reduce_bucket(bucket)

    @staticmethod
    def _reduce_bucket(params) -> None:
        grads = [p.grad for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for g in grads:
            n = g.numel()
            g.copy_(flat[offset:offset + n].view_as(g))
            offset += n

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def device_for_rank(device: Optional[str]) -> Optional[str]:
    """Under torchrun with CUDA, a bare ``'cuda'`` (or the default) means this rank's GPU."""
    if launched() and torch.cuda.is_available() and (device is None or str(device) == 'cuda'):
        return f'cuda:{local_gpu()}'
    return device
