"""CPU training: keep XLA:CPU's per-step temporary buffer between steps instead of mapping it afresh.

XLA:CPU allocates a program's temporaries as one buffer per execution with ``posix_memalign``. glibc serves an
allocation above its mmap threshold (adaptive, at most 32 MiB) with a fresh ``mmap`` and unmaps it on ``free``,
so a train step whose temporaries pass that size page-faults and zero-fills all of them on every step: issue 28's
h256 step (120.7 MB of temporaries) took ~30k page faults a step, 11-20 ms of ~180 ms on a 2-vCPU VM. A fixed
threshold above the buffer makes glibc serve it from the heap and reuse it, but only the main arena's heap can
grow that large (a thread arena's heap is at most 64 MiB), and with asynchronous dispatch the CPU client runs, and
allocates for, each program on its worker threads. So this makes the CPU client synchronous (the host waits for
each step: on CPU the two share the same cores anyway) and raises glibc's mmap and trim thresholds.

Process-wide, so only entry points call it (``dspark train``, ``scripts/bench_train_step.py``), never library
code; and only where the CPU is the device that trains (no accelerator plugin installed, or ``JAX_PLATFORMS``
naming cpu first) and before JAX has started its backends (the CPU client reads the dispatch mode once).
Not adopted: one malloc arena for all threads, which also removes the faults but serialises every thread's
malloc (tiny train step 1.5-1.9x and batch-32 decode loop 15-35% slower; BENCHMARKS.md).
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import re
import sys

import jax

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3   # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD_BYTES = 1 << 30
"""Allocations below this come from the heap; XLA:CPU's temporaries of a CPU-sized step stay well under it."""
TRIM_THRESHOLD_BYTES = 1 << 31
"""Free memory at the top of the heap kept for reuse (up to this much) instead of returned to the system."""
ADAPTIVE_MMAP_MAX_BYTES = 32 << 20
"""glibc's adaptive mmap threshold stops here (64-bit): temporaries at most this large are reused already."""


def local_cpu_devices(environ=None) -> int:
    """The CPU devices this process will have (``--xla_force_host_platform_device_count`` in ``XLA_FLAGS``, else
    1), read without starting a backend."""
    flags = (environ if environ is not None else os.environ).get("XLA_FLAGS", "")
    m = re.search(r"--xla_force_host_platform_device_count=(\d+)", flags)
    return int(m.group(1)) if m else 1


MODES = ("auto", "keep", "default")
"""``dspark train --cpu-step-buffers`` values (see :func:`choose`)."""


def choose(mode: str, temporaries_bytes: float | None) -> tuple[bool, str]:
    """``--cpu-step-buffers`` -> (apply?, why): ``keep`` / ``default`` as said; ``auto`` keeps them only when the
    step's temporaries (the dry run's activation estimate per device) pass glibc's adaptive threshold: below it
    they are reused anyway, and a synchronous CPU client costs a small step its dispatch overlap (issue 28's tiny
    step: ~10-18% slower with both settings)."""
    if mode not in MODES:
        raise ValueError(f"cpu step buffers must be one of {', '.join(MODES)}, got {mode!r}")
    if mode != "auto":
        return mode == "keep", f"--cpu-step-buffers {mode}"
    if temporaries_bytes is None:
        return False, "auto: no estimate of the step's temporaries"
    mib = temporaries_bytes / 2 ** 20
    if temporaries_bytes <= ADAPTIVE_MMAP_MAX_BYTES:
        return False, f"auto: ~{mib:.0f} MiB of step temporaries, reused by glibc as is"
    return True, f"auto: ~{mib:.0f} MiB of step temporaries > glibc's {ADAPTIVE_MMAP_MAX_BYTES >> 20} MiB"


ACCELERATOR_MODULES = ("jax_cuda13_plugin", "jax_cuda12_plugin", "jax_rocm7_plugin", "jax_rocm60_plugin", "libtpu",
                       "jax_plugins")
"""Modules whose presence means JAX may pick an accelerator (its CUDA / ROCm / TPU plugins, any ``jax_plugins``)."""


def cpu_trains(platforms: str | None = None) -> bool:
    """True when JAX's default device will be the CPU: ``platforms`` (default: ``jax_platforms``, i.e.
    ``JAX_PLATFORMS``) names cpu first, or it is unset and none of :data:`ACCELERATOR_MODULES` is installed. Starts
    no backend."""
    if platforms is None:
        platforms = jax.config.jax_platforms
    if platforms:
        return platforms.split(",")[0].strip().lower() == "cpu"
    return not any(importlib.util.find_spec(m) for m in ACCELERATOR_MODULES)


def _backends_started() -> bool:
    from jax._src import xla_bridge

    started = getattr(xla_bridge, "backends_are_initialized", None)
    return bool(started()) if started is not None else bool(getattr(xla_bridge, "_backends", {}))


def keep_cpu_step_buffers() -> str:
    """Applies the settings above when they can help -> ``"on"``, or why not (``"off: ..."``); never raises.

    Call before anything starts JAX's backends (``jax.devices()``, the first array); after
    ``jax.distributed.initialize`` is fine."""
    if not sys.platform.startswith("linux"):
        return f"off: not Linux ({sys.platform})"
    try:
        libc_version = os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (ValueError, OSError):
        libc_version = ""
    if not libc_version.startswith("glibc"):
        return "off: not glibc"
    if not cpu_trains():
        return "off: an accelerator trains"
    if _backends_started():
        return "off: JAX's backends already started"
    try:
        libc = ctypes.CDLL(None)   # the C library already loaded (find_library would start a subprocess)
        ok = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) and libc.mallopt(M_TRIM_THRESHOLD,
                                                                                 TRIM_THRESHOLD_BYTES)
    except (OSError, AttributeError) as e:
        return f"off: mallopt unavailable ({e})"
    if not ok:
        return "off: glibc refused the thresholds"
    jax.config.update("jax_cpu_enable_async_dispatch", False)
    return "on"
