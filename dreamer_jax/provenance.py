"""Where a run came from: `<logdir>/run.json`, written at every start of the run.

    info = provenance(argv)               # this process: commit, versions, devices, ...
    record_start(logdir, info, step=0)    # run.json: the latest start, plus every start

`run.json` holds the latest start's fields at the top level and all starts, oldest first, in
`starts` (each with the policy step it began from), so a resumed run shows every machine,
commit and library set it ran with. Bit-identity depends on these (docs/reproducibility.md).
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import pathlib
import platform
import shlex
import socket
import subprocess
import sys
import warnings
from collections.abc import Sequence
from typing import Any

import jax

from dreamer_jax.paths import write_atomic

RUN_FILE = "run.json"
PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "envpool", "numpy")
_SOURCE = pathlib.Path(__file__).resolve().parent


def _git(*args: str) -> str | None:
    """Output of a git command in the package's source folder; None outside a checkout."""
    try:
        result = subprocess.run(
            ["git", *args], cwd=_SOURCE, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cuda_versions() -> dict[str, Any]:
    """CUDA and cuDNN versions jaxlib reports, when running on a GPU."""
    if jax.default_backend() != "gpu":
        return {}
    try:
        from jax._src.lib import cuda_versions  # jaxlib's only public-ish report of them
    except ImportError:
        return {}
    if cuda_versions is None:
        return {}
    return {
        "cuda_runtime": cuda_versions.cuda_runtime_get_version(),
        "cudnn": cuda_versions.cudnn_get_version(),
    }


def provenance(argv: Sequence[str]) -> dict[str, Any]:
    """This process's commit, command, library versions, devices and host, as JSON values.

    `git_commit`/`git_dirty` are None when the package is not run from a git checkout.
    """
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain") if commit else None
    versions = {"python": platform.python_version()}
    versions.update({package: _version(package) for package in PACKAGES})
    versions.update(_cuda_versions())
    return {
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": [sys.executable, "-m", "dreamer_jax.train", *argv],
        "git_commit": commit,
        "git_dirty": None if status is None else bool(status),
        "versions": versions,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "devices": [str(device) for device in jax.devices()],
        "backend": jax.default_backend(),
        "hostname": socket.gethostname(),
    }


def last_command(logdir: pathlib.Path) -> str | None:
    """The command line of the latest start of the run in `logdir` (from its run.json,
    shell-quoted: each start saves its config), or None if that cannot be read."""
    try:
        starts = json.loads((logdir / RUN_FILE).read_text(encoding="utf-8"))["starts"]
        return shlex.join(starts[-1]["command"])
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return None


def record_start(logdir: pathlib.Path, info: dict[str, Any], step: int) -> dict[str, Any]:
    """Adds this start (`info` and the policy `step` it begins from) to `<logdir>/run.json`
    atomically and returns the new content. An unreadable run.json is kept aside as
    `run.json.unreadable` (with a warning) and a new one begun."""
    path = logdir / RUN_FILE
    starts: list[dict[str, Any]] = []
    if path.exists():
        try:
            starts = json.loads(path.read_text(encoding="utf-8"))["starts"]
            if not isinstance(starts, list):
                raise ValueError("'starts' is not a list")
        except (ValueError, KeyError, TypeError) as error:
            aside = path.with_name(RUN_FILE + ".unreadable")
            os.replace(path, aside)
            warnings.warn(f"{path} is unreadable ({error}); moved it to {aside}", stacklevel=2)
            starts = []
    starts.append({**info, "step": step})
    content = {**info, "starts": starts}
    write_atomic(path, (json.dumps(content, indent=2) + "\n").encode())
    return content
