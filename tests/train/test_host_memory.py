"""Keeping XLA:CPU's step temporaries between steps (dspark_jax/host_memory.py, ``dspark train --cpu-step-buffers``).

The settings are process-wide and must precede the CPU client, so what they do is checked in fresh interpreters: a
program with 64 MiB of temporaries page-faults its whole buffer on every call by default (glibc maps it afresh) and
not at all once the buffers are kept; the result is the same.
"""

import json
import os
import subprocess
import sys

import pytest

from dspark_jax import host_memory
from dspark_jax.train import cli as train_cli
from dspark_jax.train.config import load_train_config
from dspark_jax.train.memory import estimate_memory

linux_glibc = pytest.mark.skipif(not sys.platform.startswith("linux") or not (os.confstr("CS_GNU_LIBC_VERSION") or
                                                                            "").startswith("glibc"),
                                 reason="the settings are glibc's (Linux)")

_CHILD = r"""
import json, resource, sys
mode = sys.argv[1]
from dspark_jax import host_memory
status = host_memory.keep_cpu_step_buffers() if mode == "keep" else "off"
import jax, jax.numpy as jnp
x = jnp.linspace(-1.0, 1.0, 4096 * 512, dtype=jnp.float32).reshape(4096, 512)
f = jax.jit(lambda x: jnp.sum(jnp.sin(x @ x.T)) + jnp.sum(jnp.cos(x.T @ x)))   # [4096, 4096] fp32 scores: 64 MiB
temp = f.lower(x).compile().memory_analysis().temp_size_in_bytes
out = float(f(x))
faults = []
for _ in range(5):
    r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    out = float(f(x))
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
again = host_memory.keep_cpu_step_buffers()
print(json.dumps(dict(status=status, again=again, temp=temp, out=out, faults=faults,
                      async_dispatch=bool(jax.config.values["jax_cpu_enable_async_dispatch"]))))
"""


def _child(mode: str) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    proc = subprocess.run([sys.executable, "-c", _CHILD, mode], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@linux_glibc
def test_kept_buffers_stop_the_per_call_page_faults_and_change_nothing_else():
    default, kept = _child("default"), _child("keep")
    assert default["temp"] > host_memory.ADAPTIVE_MMAP_MAX_BYTES          # the case the settings are for
    assert kept["status"] == "on" and not kept["async_dispatch"] and default["async_dispatch"]
    # glibc maps the 64 MiB afresh on every call by default (4 KiB pages: ~16k faults); kept, most calls reuse the
    # heap's block (a call after other allocations split the heap's free top grows it again: seen 1-2 calls in 5)
    assert min(default["faults"]) > 0.5 * default["temp"] / 4096, default["faults"]
    assert sorted(kept["faults"])[2] < 0.02 * kept["temp"] / 4096, kept["faults"]
    assert kept["out"] == default["out"]
    # once the backend runs, the dispatch mode is fixed: the call says so instead of half-applying
    assert kept["again"] == default["again"] == "off: JAX's backends already started"


def test_auto_keeps_them_only_for_temporaries_glibc_would_map_afresh():
    mib = 2 ** 20
    assert host_memory.choose("auto", 20 * mib)[0] is False
    assert host_memory.choose("auto", 33 * mib)[0] is True
    assert host_memory.choose("auto", None)[0] is False
    assert host_memory.choose("keep", None) == (True, "--cpu-step-buffers keep")
    assert host_memory.choose("default", 10 ** 12)[0] is False
    with pytest.raises(ValueError, match="one of auto, keep, default"):
        host_memory.choose("always", None)


def test_local_cpu_devices_reads_xla_flags_without_a_backend():
    assert host_memory.local_cpu_devices({}) == 1
    assert host_memory.local_cpu_devices({"XLA_FLAGS": "--foo=1 --xla_force_host_platform_device_count=4"}) == 4


def test_cpu_trains_follows_jax_platforms():
    assert host_memory.cpu_trains("cpu") and host_memory.cpu_trains(" CPU,cuda")
    assert not host_memory.cpu_trains("cuda,cpu") and not host_memory.cpu_trains("tpu")


def test_train_cli_decides_from_the_dry_run_estimate(capsys, monkeypatch):
    """The tiny preset's step on one CPU device holds ~43 MiB of temporaries (the dry run's estimate), so ``auto``
    keeps them; in this process the backend already runs, so it reports that and changes nothing. On 8 devices
    each holds ~5 MiB: left alone."""
    import jax

    jax.devices()   # this test must not change the test process's dispatch mode: start the backend first
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
    cfg = load_train_config("tiny", [])
    assert estimate_memory(cfg, 1, device="cpu").activations > host_memory.ADAPTIVE_MMAP_MAX_BYTES
    train_cli._cpu_step_buffers(cfg, "auto")
    out = capsys.readouterr().out
    assert "CPU step buffers: off: JAX's backends already started (auto: ~" in out, out
    train_cli._cpu_step_buffers(cfg, "default")
    assert capsys.readouterr().out == ""
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    train_cli._cpu_step_buffers(cfg, "auto")
    assert "CPU step buffers: off (auto: ~5 MiB of step temporaries" in capsys.readouterr().out


def test_a_bad_environment_value_is_an_error_naming_it():
    cfg = load_train_config("tiny", [])
    with pytest.raises(SystemExit, match="DSPARK_CPU_STEP_BUFFERS must be one of auto, keep, default, got 'on'"):
        train_cli._cpu_step_buffers(cfg, "on")
