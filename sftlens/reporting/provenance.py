"""What a study session records of where it ran: the code version and the machine (the `study run`
driver writes both into `study.db`; the results page names the code that produced it)."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import sftlens


def code_version() -> str:
    """The git commit of the sftlens source that runs (`+dirty` with uncommitted changes), or its
    package version outside a checkout: a results page names the code that produced it."""
    source = Path(sftlens.__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(source), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(source), "status", "--porcelain", "--", "."], capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return f"sftlens {sftlens.__version__}"
    return commit + ("+dirty" if dirty else "")


def machine() -> str:
    """CPUs, GPU and torch of this machine, as a session records them."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"
    return f"{os.cpu_count()} CPUs ({cpu}){gpu}, torch {torch.__version__}, {platform.system()}"
