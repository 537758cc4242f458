"""Every process of a distributed run destroys its process group before the interpreter exits.

Lightning registers that clean-up at exit for NCCL only. A gloo process (DDP on CPU) that exits with its process
group alive can abort (SIGABRT, "terminate called without an active exception"): gloo's worker threads are torn
down during interpreter finalisation (pytorch/pytorch#179291). A spawned worker then fails a run that finished. So
every Trainer xsilo builds carries `ProcessGroupCleanup`: once the group exists in a process, its destruction is
registered to run at that process's exit.
"""
from __future__ import annotations

import atexit

import lightning as L
import torch

_registered = False


def destroy_process_group() -> None:
    """Destroy the default process group when one is alive (a no-op otherwise)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def destroy_at_exit() -> None:
    """Register `destroy_process_group` to run when this process exits (once per process)."""
    global _registered
    if not _registered:
        atexit.register(destroy_process_group)
        _registered = True


class ProcessGroupCleanup(L.Callback):
    """In a run of more than one process, each process destroys its process group at exit (module docstring)."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if trainer.world_size > 1:
            destroy_at_exit()
