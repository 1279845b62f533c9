"""What the numbers were measured on: device, versions, threads, load, build of ucgm_fast."""
from __future__ import annotations

import ctypes
import ctypes.util
import datetime
import os
import platform
import subprocess
import sys

import torch


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def steady_malloc() -> str:
    """Keeps glibc from handing freed memory back to the OS between calls; returns what was done.

    glibc serves blocks over its (adaptive) mmap threshold with fresh pages and trims the heap top
    once more than its trim threshold is free, so in some heap states every call's outputs
    page-fault again: a 1 MiB-output op then runs up to 15x slower than with the pages kept (seen on this
    project's CPU rows, for eager, compile and fused alike). Fixed thresholds of 1 GiB keep the
    pages, as a long-running training process does; the rows then measure the ops, not the heap.
    """
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        if libc is None or not hasattr(libc, "mallopt") or not hasattr(libc, "gnu_get_libc_version"):
            return "unchanged (not glibc)"
        ok = libc.mallopt(M_TRIM_THRESHOLD, 1 << 30) == 1 and libc.mallopt(M_MMAP_THRESHOLD, 1 << 30) == 1
    except OSError:
        return "unchanged (libc not loadable)"
    return "glibc trim and mmap thresholds 1 GiB" if ok else "unchanged (mallopt failed)"


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()


def _git_commit(path: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", path, "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5)
        dirty = subprocess.run(["git", "-C", path, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def environment(device: torch.device, repo: str) -> dict:
    """Metadata recorded with every result file."""
    import ucgm_fast

    info = {
        "device": device.type,
        "device_name": device_name(device),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "ucgm_fast": getattr(ucgm_fast, "__version__", None),
        "build_info": ucgm_fast.build_info(),
        "git_commit": _git_commit(repo),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "cpu_name": cpu_name(),
        "load_average_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update({
            "gpu_capability": f"{props.major}.{props.minor}",
            "gpu_memory_gib": round(props.total_memory / 2**30, 1),
            "gpu_multiprocessors": props.multi_processor_count,
            "gpu_l2_mib": round(int(getattr(props, "L2_cache_size", 0)) / 2**20, 1),
            "cuda_driver": _driver_version(),
        })
    return info


def _driver_version() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def slug(name: str) -> str:
    """A file-name stem for a device name: 'NVIDIA H100 80GB HBM3' -> 'nvidia-h100'.

    Memory size and packaging words are dropped so runs on one card model share a file.
    """
    import re

    words = re.findall(r"[a-z0-9]+", name.lower())
    drop = re.compile(r"^(\d+gb|hbm\d*e?|sxm\d*|pcie|nvl|gen\d+)$")
    kept = [w for w in words if not drop.match(w)]
    return "-".join(kept) or "device"
