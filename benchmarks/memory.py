"""Peak resident memory of one call, measured from inside a (child) process on Linux.

``reset_peak()`` sets the kernel's high-water mark (``VmHWM``) to the current RSS (writing
``5`` to ``/proc/self/clear_refs``); ``peak_mb()`` reads it back. Children are started with
glibc's mmap threshold fixed (``MALLOC_MMAP_THRESHOLD_``), so every large tensor is its own
mapping, returned to the kernel when freed: RSS then follows live tensor memory instead of
whatever the allocator keeps from earlier calls.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def _status(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB -> MB
    raise RuntimeError(f"/proc/self/status has no {field}; peak memory needs Linux.")


def rss_mb() -> float:
    return _status("VmRSS")


def peak_mb() -> float:
    return _status("VmHWM")


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def run_child(script: Path, *args: str) -> dict[str, Any]:
    """Run ``script --child ARGS`` in a fresh interpreter; it prints one JSON line last."""
    env = {**os.environ, **CHILD_ENV}
    done = subprocess.run([sys.executable, str(script), "--child", *args], env=env,
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"child {script.name} {args} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])
