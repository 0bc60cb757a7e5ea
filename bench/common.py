"""Shared bench helpers: a real server process, percentiles, peak RSS, Prometheus scraping, machine info."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import re
from pathlib import Path
from typing import Sequence

import numpy as np

from advgrpo.common.process import ServerProcess

REPO = Path(__file__).resolve().parents[1]

__all__ = ["ServerProcess"]  # re-exported for the benchmarks


def proc_status_kib(pid: int, field: str) -> int:
    """A ``kB`` field of /proc/<pid>/status (VmHWM: peak RSS, VmRSS: current RSS), in KiB."""
    text = Path(f"/proc/{pid}/status").read_text()
    m = re.search(rf"^{field}:\s+(\d+)\s+kB", text, re.M)
    if not m:
        raise RuntimeError(f"/proc/{pid}/status has no {field}")
    return int(m.group(1))


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (/proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks  # utime, stime


def scrape_metrics(http: str) -> dict[str, float]:
    """The server's /metrics as {"name{labels}": value} (no Prometheus client needed)."""
    import httpx

    text = httpx.get(f"{http}/metrics", timeout=10).text
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            try:
                out[key] = float(value)
            except ValueError:
                pass
    return out


def summary_ms(seconds: Sequence[float]) -> dict[str, float]:
    a = np.asarray(seconds, dtype=np.float64) * 1000.0
    return {
        "n": int(a.size),
        "median_ms": round(float(np.median(a)), 2),
        "p90_ms": round(float(np.percentile(a, 90)), 2),
        "min_ms": round(float(a.min()), 2),
        "mean_ms": round(float(a.mean()), 2),
    }


def machine_info() -> dict:
    cpu = platform.processor() or "unknown"
    cpuid: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = (part.strip() for part in line.partition(":"))
            if key in ("model name", "vendor_id", "cpu family", "model", "stepping") and key not in cpuid:
                cpuid[key] = value
            if not line.strip() and cpuid:
                break  # the first processor's block is enough
        cpu = cpuid.get("model name", cpu)
    except OSError:
        pass
    try:
        import torch

        torch_version = torch.__version__
        cuda = torch.cuda.is_available()
        torch_threads = torch.get_num_threads()
    except Exception:  # pragma: no cover - torch is a server dependency
        torch_version, cuda, torch_threads = "n/a", False, None
    import grpc

    mem_kib = None
    try:
        m = re.search(r"^MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text(), re.M)
        mem_kib = int(m.group(1)) if m else None
    except OSError:
        pass
    return {
        "cpu_model": cpu,
        "cpu_id": ", ".join(f"{k} {cpuid[k]}" for k in ("vendor_id", "cpu family", "model", "stepping") if k in cpuid),
        "cpu_cores": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_gib": round(mem_kib / 2**20, 1) if mem_kib else None,
        "gpu": "cuda" if cuda else "none",
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": torch_version,
        "torch_threads": torch_threads,
        "grpcio": grpc.__version__,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def minor_faults(pid: int) -> int:
    """Minor page faults of a process so far (/proc/<pid>/stat): fresh pages the kernel handed out."""
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[7])


def thread_cpu_seconds(pid: int) -> dict[str, float]:
    """CPU seconds per thread of a process: {"main" or tid: seconds}. (Python 3.11 does not name
    OS threads, so the event loop shows up as "main" and the others by id.)"""
    ticks = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the thread ended
        out["main" if int(task.name) == pid else task.name] = (int(fields[11]) + int(fields[12])) / ticks
    return out


def thread_cpu_cores(before: dict[str, float], after: dict[str, float], wall_s: float, top: int = 4) -> list:
    """The busiest threads between two thread_cpu_seconds() readings, in cores: [[thread, cores]]."""
    busy = {k: (v - before.get(k, 0.0)) / wall_s for k, v in after.items()}
    return [[k, round(v, 2)] for k, v in sorted(busy.items(), key=lambda kv: -kv[1])[:top]]
