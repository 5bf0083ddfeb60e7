"""Checkpoints that are whole or absent.

Each checkpoint is written by ``accelerator.save_state`` (model, optimizer, RNG states; sharded
under FSDP) into a hidden temporary folder; the trainer's own state file is written last and the
folder is then renamed into place. A crash, a full disk or Ctrl-C while saving leaves the previous
checkpoint as the latest one.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

from bitconvert.train.processes import wait_for_everyone
from bitconvert.utils.io import DiskFullError, atomic_write_json

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
_NAME = re.compile(r"^step-(\d+)$")


def checkpoints_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


class _TiedHeadNotice(logging.Filter):
    """accelerate warns at every save that it dropped a tied output head from the safetensors file;
    loading re-ties it (resume with tied embeddings is bit-exact), so the warning is only noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Removed shared tensor" not in record.getMessage()


_TIED_HEAD_NOTICE = _TiedHeadNotice()


def save_checkpoint(accelerator, run_dir: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Write checkpoint ``step`` atomically and keep only the newest ``keep`` ones."""
    logging.getLogger("accelerate.utils.other").addFilter(_TIED_HEAD_NOTICE)  # adding twice is a no-op
    root = checkpoints_dir(run_dir)
    final = root / f"step-{step:07d}"
    tmp = root / f".step-{step:07d}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        root.mkdir(parents=True, exist_ok=True)
    wait_for_everyone(accelerator)
    try:
        accelerator.save_state(str(tmp))
        wait_for_everyone(accelerator)
        if accelerator.is_main_process:
            atomic_write_json(tmp / STATE_FILE, state)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            for old in list_checkpoints(run_dir)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    except OSError as err:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = latest_checkpoint(run_dir)
        kept = f"the previous checkpoint {previous.name} is intact" if previous else "no earlier checkpoint exists"
        if err.errno == errno.ENOSPC or isinstance(err, DiskFullError):
            raise DiskFullError(errno.ENOSPC, f"disk full while saving checkpoint step {step}; {kept}") from err
        raise OSError(err.errno, f"could not save checkpoint step {step} ({err}); {kept}") from err
    wait_for_everyone(accelerator)
    return final


def load_checkpoint(accelerator, path: Path) -> dict[str, Any]:
    """Restore model, optimizer and RNG states; return the trainer state saved with them."""
    state = json.loads((path / STATE_FILE).read_text())
    accelerator.load_state(str(path))
    log.info("resumed from %s (step %d)", path, state["step"])
    return state
