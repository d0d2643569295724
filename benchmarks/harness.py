"""Measurement plumbing: repeated timing, resident-memory probes and one process per measurement.

Timing: warm-up runs, then repeats (cut short by a time budget), reported as median / min / max seconds.
Memory: Linux's ``VmRSS`` / ``VmHWM`` from ``/proc/self/status`` (the high-water mark can be reset by
writing ``5`` to ``/proc/self/clear_refs``, see https://docs.kernel.org/filesystems/proc.html), falling back
to ``resource.getrusage`` elsewhere. Isolation: each measurement runs in a child process (forked from the
harness, which has imported torch but never computed anything, so the child starts fast and its peak RSS
is its own; spawned instead where fork is unavailable or CUDA is used).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import multiprocessing
import os
import platform
import resource
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels, so wall-clock time covers the work (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call, queued device work included."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    synchronize(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def time_repeats(
    fn: Callable[[], Any],
    *,
    device: torch.device,
    warmup: int = 1,
    repeats: int = 5,
    budget_s: float = 30.0,
) -> dict:
    """Run ``fn`` ``warmup`` times, then up to ``repeats`` timed runs: wall-clock median / min / max seconds.

    Repeats stop early once ``budget_s`` seconds of timed runs have accumulated (at least one always runs).
    When a single warm-up run alone exceeds the budget, it is taken as the only sample (one-time costs are
    negligible next to such a long run) and ``warmup_reused`` is set. ``cpu_median_s`` is the median CPU
    time of this process (all threads) per run: unlike wall time it does not grow while other programs
    hold the cores, so with one thread it is the steadier figure on a shared machine.
    """
    warm = [timed(fn, device) for _ in range(warmup)]
    if warm and warm[-1][0] > budget_s:
        samples, reused = [warm[-1]], True
    else:
        samples, reused = [], False
        while len(samples) < repeats and (not samples or sum(w for w, _ in samples) < budget_s):
            samples.append(timed(fn, device))
    times = [w for w, _ in samples]
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "cpu_median_s": statistics.median(c for _, c in samples),
        "repeats": len(times),
        "warmup": warmup,
        "warmup_reused": reused,
    }


# ---------------------------------------------------------------------------------------------------------
# memory
# ---------------------------------------------------------------------------------------------------------


def _proc_status_mb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024  # reported in kB
    except OSError:
        return None
    return None


def current_rss_mb() -> float | None:
    """Resident set size of this process now, in MB (None where /proc is unavailable)."""
    return _proc_status_mb("VmRSS")


def peak_rss_mb() -> float:
    """High-water resident set size of this process in MB (since start or the last :func:`reset_peak_rss`)."""
    peak = _proc_status_mb("VmHWM")
    if peak is not None:
        return peak
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return max_rss / 2**20 if sys.platform == "darwin" else max_rss / 1024  # bytes on macOS, kB on Linux


def reset_peak_rss() -> bool:
    """Reset the high-water RSS to the current RSS (Linux >= 4.0); False where this is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def return_freed_memory_to_os() -> bool:
    """Make glibc serve every allocation over 64 kB with its own mmap, so a freed tensor leaves the RSS.

    By default glibc raises its mmap threshold after large frees and keeps freed blocks in the heap, so
    RSS would overstate live memory. Only the memory measurements call this (it slows allocation a little).
    """
    libc_name = ctypes.util.find_library("c")
    if libc_name is None or not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(libc_name)
    m_trim_threshold, m_mmap_threshold = -1, -3  # constants from <malloc.h>
    return bool(libc.mallopt(m_mmap_threshold, 64 * 1024)) and bool(libc.mallopt(m_trim_threshold, 128 * 1024))


class MemoryProbe:
    """Current / peak memory in MB where a training step lives: process RSS on CPU, allocator stats on CUDA."""

    def __init__(self, device: torch.device):
        self.device = device

    def now_mb(self) -> float | None:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device) / 2**20
        return current_rss_mb()

    def reset_peak(self) -> bool:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return True
        return reset_peak_rss()

    def peak_mb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        return peak_rss_mb()


# ---------------------------------------------------------------------------------------------------------
# environment and isolation
# ---------------------------------------------------------------------------------------------------------


def pick_device(requested: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; otherwise the named device."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def environment(device: torch.device) -> dict:
    """What the numbers depend on: torch version, thread count, device and processor."""
    info = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": str(device),
        "processor": platform.processor() or platform.machine(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    if hasattr(os, "getloadavg"):  # includes this measurement's own threads; more means others were running
        info["load_average_1m"] = round(os.getloadavg()[0], 2)
    return info


def _child_main(connection, target: Callable[..., dict], kwargs: dict, threads: int, device: str) -> None:
    try:
        torch.set_num_threads(threads)
        torch_device = torch.device(device)
        start_rss = current_rss_mb()
        result = target(device=torch_device, **kwargs)
        if torch_device.type == "cuda":
            result["peak_cuda_mb"] = torch.cuda.max_memory_allocated(torch_device) / 2**20
        result.setdefault("peak_rss_mb", peak_rss_mb())
        result["start_rss_mb"] = start_rss
        result.update(environment(torch_device))
        connection.send(("ok", result))
    except BaseException:  # report anything, including KeyboardInterrupt, to the parent
        connection.send(("error", traceback.format_exc()))
    finally:
        connection.close()


def run_isolated(
    target: Callable[..., dict], kwargs: dict, *, threads: int, device: torch.device, timeout_s: float
) -> dict:
    """Run ``target(device=..., **kwargs) -> dict`` in a fresh child process with ``threads`` threads.

    Returns the child's dict plus ``peak_rss_mb`` (the child's own high-water mark), or ``{"error": ...}``
    when it raised, crashed or ran past ``timeout_s``.
    """
    use_fork = device.type == "cpu" and "fork" in multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if use_fork else "spawn")
    receiver, sender = context.Pipe(duplex=False)
    env_backup = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    os.environ.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))  # for spawned children
    try:
        process = context.Process(target=_child_main, args=(sender, target, kwargs, threads, str(device)))
        process.start()
    finally:
        for key, value in env_backup.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    sender.close()
    outcome = None
    if receiver.poll(timeout_s):
        try:
            outcome = receiver.recv()
        except EOFError:
            outcome = None
    process.join(timeout=10)
    if process.is_alive():
        process.kill()
        process.join()
        if outcome is None:
            return {"error": f"timed out after {timeout_s:.0f} s"}
    if outcome is None:
        return {"error": f"child process died with exit code {process.exitcode}"}
    status, payload = outcome
    return payload if status == "ok" else {"error": payload}


def time_ddpm_vs_ddim(sample: Callable[[int | None], None], ddim_steps: int, device: torch.device,
                      budget_s: float) -> dict:
    """Time one sampler run over every timestep (DDPM, ``sample(None)``) against ``sample(ddim_steps)`` (DDIM).

    DDIM is warmed up once and repeated; DDPM runs once (many times the work, long enough to be steady).
    Returns the DDPM run as the case's time plus the DDIM median and the speed-up of one over the other."""  # fmt: skip

    def run(steps: int | None) -> float:
        return timed(lambda: sample(steps), device)[0]

    run(ddim_steps)  # warm-up: first-call allocations and kernel selection
    ddim = time_repeats(lambda: run(ddim_steps), device=device, warmup=0, repeats=5, budget_s=budget_s)
    ddpm_s = run(None)
    return {"median_s": ddpm_s, "min_s": ddpm_s, "max_s": ddpm_s, "repeats": 1, "ddim_s": ddim["median_s"],
            "ddim_runs": ddim["repeats"], "ddim_speedup": ddpm_s / ddim["median_s"]}  # fmt: skip
