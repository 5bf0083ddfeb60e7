"""The processes of a run, as accelerate sees them, made to behave the same on every accelerate this
package accepts and in a Python session that runs more than one conversion."""

from __future__ import annotations

import torch
from accelerate.utils import DistributedType


def wait_for_everyone(accelerator) -> None:
    """``accelerator.wait_for_everyone()``, except that CPU processes meet on their gloo group alone.

    accelerate before 1.16 passes ``device_ids=[local rank]`` to the barrier of CPU processes too. On a
    machine that has a GPU, torch then runs that barrier on ``cuda:<local rank>``, which fails on every
    rank past the machine's GPU count: a 2-process CPU run on a 1-GPU machine lost its second process.
    """
    if accelerator.distributed_type == DistributedType.MULTI_CPU:
        torch.distributed.barrier()
    else:
        accelerator.wait_for_everyone()


def release_other_settings(*, cpu: bool, mixed_precision: str) -> None:
    """Let a new Accelerator take other settings than an earlier one of the same single process.

    accelerate keeps one state per process. It refuses an Accelerator whose mixed precision differs from the
    first one's, or that asks for the CPU after a GPU, and it silently keeps the CPU when a GPU is asked for
    after it. So ``quantize()`` on the CPU and then on a GPU, in one notebook, would fail or train on the
    wrong device. A launch of several processes shares that state with its process group, so it is left alone.
    """
    from accelerate.state import AcceleratorState, PartialState

    if not PartialState._shared_state:
        return
    processes = PartialState()
    if processes.num_processes > 1:
        return
    state = AcceleratorState() if AcceleratorState._shared_state else None
    if (processes.device.type == "cpu") == cpu and (state is None or str(state.mixed_precision) == mixed_precision):
        return
    AcceleratorState._reset_state(reset_partial_state=True)
