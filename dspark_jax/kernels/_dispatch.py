"""Which implementation a kernel call uses: ``impl="auto"|"xla"|"pallas"``.

* ``"xla"``: the pure-jnp reference.
* ``"pallas"``: the Pallas kernel for the default backend: Mosaic on TPU, Triton on GPU; on CPU the kernel runs
  in Pallas interpret mode (slow; meant for tests). ``DSPARK_PALLAS_INTERPRET=tpu|gpu`` picks which backend's
  kernel the CPU interpreter runs (default ``tpu``).
* ``"auto"``: ``$DSPARK_KERNEL_IMPL`` when set (``xla`` or ``pallas``), else Pallas on TPU/GPU and XLA on CPU.

So the whole test suite can be run through the kernels with ``DSPARK_KERNEL_IMPL=pallas pytest ...``.
"""

from __future__ import annotations

import os

import jax

IMPLS = ("auto", "xla", "pallas")
ENV_IMPL = "DSPARK_KERNEL_IMPL"
ENV_INTERPRET = "DSPARK_PALLAS_INTERPRET"


def check_impl(impl: str, op: str = "kernel") -> None:
    if impl not in IMPLS:
        raise ValueError(f"{op} impl={impl!r} is not one of {IMPLS}")


def default_backend() -> str:
    return jax.default_backend()


def resolve(impl: str = "auto", op: str = "kernel") -> tuple[str, str | None]:
    """-> ``(kind, target)``: kind ``"xla"`` (target None) or ``"pallas"`` with target ``"tpu"|"gpu"`` (compiled)
    or ``"tpu-interpret"|"gpu-interpret"`` (CPU)."""
    check_impl(impl, op)
    backend = default_backend()
    if impl == "auto":
        env = os.environ.get(ENV_IMPL, "").strip().lower()
        if env:
            if env not in ("xla", "pallas"):
                raise ValueError(f"${ENV_IMPL}={env!r}: expected 'xla' or 'pallas'")
            impl = env
        else:
            impl = "pallas" if backend in ("tpu", "gpu") else "xla"
    if impl == "xla":
        return "xla", None
    if backend == "tpu":
        return "pallas", "tpu"
    if backend == "gpu":
        return "pallas", "gpu"
    which = os.environ.get(ENV_INTERPRET, "tpu").strip().lower()
    if which not in ("tpu", "gpu"):
        raise ValueError(f"${ENV_INTERPRET}={which!r}: expected 'tpu' or 'gpu'")
    return "pallas", f"{which}-interpret"
