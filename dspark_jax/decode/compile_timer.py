"""Time JAX spends compiling while a block runs: what throughput figures subtract so that they exclude
compilation (a slot engine compiles as new shapes appear mid-run, so a warm-up pass cannot cover them all)."""

from __future__ import annotations

import jax

EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
          "/jax/core/compile/backend_compile_duration")


class CompileTimer:
    """``with CompileTimer() as t: ...`` -> ``t.seconds``: tracing, lowering and backend compilation (JAX's
    compile duration events; a persistent-cache hit counts the time it took)."""

    def __init__(self):
        self.seconds = 0.0

    def _listen(self, event, duration, **_):
        if event in EVENTS:
            self.seconds += duration

    def __enter__(self):
        jax.monitoring.register_event_duration_secs_listener(self._listen)
        return self

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_duration_listener(self._listen)


__all__ = ["CompileTimer"]
