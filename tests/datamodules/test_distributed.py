"""Every process of a distributed run destroys its process group before it exits (`datamodules.distributed`): a gloo
process that exits with its group alive can abort and fail a run that finished."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import lightning as L
import pytest

from datamodules.distributed import ProcessGroupCleanup

SCRIPT = textwrap.dedent("""
    import atexit, sys, torch
    import torch.distributed as dist
    # registered first, so it runs last: what the process group looks like when the interpreter goes down
    atexit.register(lambda: print("alive at exit:", dist.is_initialized(), flush=True))
    dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)
    dist.all_reduce(torch.ones(3))
    if sys.argv[2] == "cleanup":
        from datamodules.distributed import destroy_at_exit
        destroy_at_exit()
        destroy_at_exit()  # once per process, however many trainers set up
""")


@pytest.mark.parametrize("mode, alive", [("cleanup", False), ("none", True)])
def test_the_process_group_is_destroyed_before_the_process_exits(tmp_path, mode, alive):
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "store"), mode], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == f"alive at exit: {alive}"


def test_every_trainer_xsilo_builds_carries_the_cleanup():
    from lightning_modules.lightning_cli import XsiloTrainer
    from lightning_modules.settings import DeviceSettings, build_trainer

    from tests.helpers import trainer

    for built in (XsiloTrainer(accelerator="cpu", logger=False), build_trainer(DeviceSettings(), 1), trainer()):
        assert isinstance(built, L.Trainer)
        assert sum(isinstance(c, ProcessGroupCleanup) for c in built.callbacks) == 1
