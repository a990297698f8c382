"""Errors a user can act on, for the command lines (``vrn.train``, ``vrn.demo``, ``vrn.evaluate``),
and their output folders: checked before any work, no empty folder left after a failure
(:func:`prepare_output_dir`, :func:`remove_empty`).

:func:`run_cli` runs a command's body; an expected error (:data:`EXPECTED`: a bad config value,
a missing or damaged file, no GPU, a wrong checkpoint, an unreadable input) prints one line
``<command>: error: <message>`` on stderr and exits with status 2, without a traceback.
``HYDRA_FULL_ERROR=1`` lets the exception through, traceback and all. Anything else (a bug)
keeps its traceback.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
from hydra.errors import InstantiationException
from lightning_fabric.utilities.exceptions import MisconfigurationException
from omegaconf.errors import MissingMandatoryValue

__all__ = [
    "EXPECTED",
    "EXIT_USER_ERROR",
    "UserError",
    "check_device",
    "cuda_device_count",
    "one_line",
    "prepare_output_dir",
    "remove_empty",
    "run_cli",
]

T = TypeVar("T")

#: exit status of an expected (user) error
EXIT_USER_ERROR = 2


class UserError(ValueError):
    """An error the user can fix; the message names the thing and what to do."""


#: exception types reported in one line (ValueError covers the project's own checks:
#: LayoutMismatchError, ImageReadError, CheckpointIntegrityError, ... subclass it)
EXPECTED: tuple[type[BaseException], ...] = (
    ValueError,
    OSError,
    MisconfigurationException,
    MissingMandatoryValue,
    InstantiationException,
)


def one_line(e: BaseException) -> str:
    """The exception as one line; a Hydra instantiation error is reported by its cause."""
    cause = e.__cause__ if isinstance(e, InstantiationException) and e.__cause__ is not None else e
    if isinstance(cause, OSError) and cause.strerror and cause.filename:
        msg = f"{cause.strerror}: {cause.filename}"
    else:
        msg = str(cause).strip() or type(cause).__name__
    return " ".join(part.strip() for part in msg.splitlines() if part.strip())


def cuda_device_count() -> int:
    """CUDA GPUs this process can use (0 with a CPU build of torch)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def check_device(device: str, key: str = "device") -> None:
    """Stop with one line when ``device`` (``cpu``, ``cuda``, ``cuda:N``) names a GPU this machine lacks.

    Raises:
        UserError: ``key=cuda...`` without an available CUDA GPU (or with fewer GPUs than ``N + 1``).
    """
    d = str(device).strip().lower()
    if not d.startswith("cuda"):
        return
    n = cuda_device_count()
    index = int(d.split(":", 1)[1]) if ":" in d and d.split(":", 1)[1].isdigit() else 0
    if n == 0:
        raise UserError(f"{key}={device} but no CUDA GPU is available (or torch is a CPU build): use {key}=cpu")
    if index >= n:
        raise UserError(f"{key}={device} but this machine has {n} GPU(s) (cuda:0 .. cuda:{n - 1}): pick one of those")


def run_cli(command: str, body: Callable[[], T]) -> T:
    """``body()``; an expected error exits 2 with one line (see the module doc)."""
    try:
        return body()
    except EXPECTED as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"{command}: error: {one_line(e)}", file=sys.stderr, flush=True)
        sys.exit(EXIT_USER_ERROR)


def make_dirs(folder: Path) -> list[Path]:
    """``mkdir -p folder``; returns the folders it made, deepest first."""
    made = []
    p = folder
    while not p.exists():
        made.append(p)
        p = p.parent
    folder.mkdir(parents=True, exist_ok=True)
    return made


def remove_empty(folders: list[Path]) -> None:
    """Remove those of ``folders`` (deepest first) that are empty."""
    for d in sorted(set(folders), key=lambda p: len(p.parts), reverse=True):
        try:
            d.rmdir()
        except OSError:
            pass  # not empty (or gone)


def prepare_output_dir(out_root: Path) -> list[Path]:
    """Make ``output_dir`` and check it is writable, before any work; returns the folders made.

    Raises:
        UserError: it cannot be made or written to.
    """
    fix = "choose another output_dir= or fix its permissions"
    if out_root.exists() and not out_root.is_dir():
        raise UserError(f"output_dir={out_root} is a file, not a folder: {fix}")
    try:
        made = make_dirs(out_root)
    except OSError as e:
        raise UserError(f"output_dir={out_root} cannot be created ({e.strerror or e}): {fix}") from e
    try:
        with tempfile.TemporaryFile(dir=out_root, prefix=".vrn_write_check_"):
            pass
    except OSError as e:
        remove_empty(made)
        raise UserError(f"output_dir={out_root} is not writable ({e.strerror or e}): {fix}") from e
    return made
