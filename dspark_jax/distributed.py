"""Multi-process start-up, shared by every entry point (``dspark train``, ``generate-data``, ``eval``,
``prepare-cache``, ``calibrate``, ``profile``).

:func:`initialize` must run before anything touches the JAX backend (``jax.devices()``, ``jax.process_count()``,
any array): JAX refuses ``jax.distributed.initialize()`` afterwards. The CLI calls it right after parsing.

Where the values come from, first match wins:
  1. explicit: ``distributed.coordinator_address / num_processes / process_id`` (train config or overrides) or
     ``--coordinator-address / --num-processes / --process-id`` (every command);
  2. the environment: ``DSPARK_COORDINATOR_ADDRESS`` (or JAX's ``JAX_COORDINATOR_ADDRESS``),
     ``DSPARK_NUM_PROCESSES``, ``DSPARK_PROCESS_ID`` (for clusters JAX does not detect);
  3. JAX's cluster detection: TPU pods, SLURM, Open MPI, Kubernetes (nothing to pass).

Failure behaviour (all bounded in time):
  - bad or inconsistent values (a process id out of range, one of num_processes/process_id without the other,
    a malformed address) raise :class:`DistributedError` before any connection is tried;
  - a coordinator that cannot be reached within ``initialization_timeout_s`` raises :class:`DistributedError`
    naming the address (we probe the TCP port first: JAX's own failure is an abort without the address);
  - once running, a process that stops (killed, crashed, hung) stops sending heartbeats; after
    ``heartbeat_timeout_s`` JAX's coordination service ends every other process with
    ``The following tasks are unhealthy (stopped sending heartbeats): <process ids>``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import socket
import sys
import time
import traceback
from typing import Mapping

import jax
from jax.experimental import multihost_utils

ENV_VARS = {"coordinator_address": ("DSPARK_COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS"),
            "num_processes": ("DSPARK_NUM_PROCESSES",), "process_id": ("DSPARK_PROCESS_ID",)}
"""Environment variables read (first set one wins) when a value is not given explicitly."""


class DistributedError(RuntimeError):
    """Multi-process start-up failed; the message says which value or which peer."""


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """How this process joins a multi-process run.

    enabled: join one (``distributed=true``); implied when any of the three values below is given.
    coordinator_address: ``host:port`` of process 0's coordination service (every process names the same one).
    num_processes / process_id: the run's size and this process's index, ``0 <= process_id < num_processes``.
    initialization_timeout_s: how long to wait for the coordinator and for every peer to join.
    heartbeat_timeout_s: a peer silent this long is declared dead and the run ends (JAX's default: 100).
    """

    enabled: bool = False
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    initialization_timeout_s: int = 300
    heartbeat_timeout_s: int = 100

    def resolved(self, environ: Mapping[str, str] | None = None) -> DistributedConfig:
        """This config with missing values filled from the environment (:data:`ENV_VARS`), checked; raises
        :class:`DistributedError` on bad or inconsistent values. An explicit value or a ``DSPARK_*`` variable
        implies ``enabled``; ``JAX_COORDINATOR_ADDRESS`` alone does not (it may be set for other programs)."""
        env = os.environ if environ is None else environ
        values = {}
        implied = any(getattr(self, name) is not None for name in ENV_VARS)
        implied = implied or any(env.get(v, "").strip() for vs in ENV_VARS.values() for v in vs
                                 if v.startswith("DSPARK_"))
        for name, variables in ENV_VARS.items():
            value = getattr(self, name)
            var = next((v for v in variables if env.get(v, "").strip()), None)
            if value is None and var is not None:
                text = env[var].strip()
                if name == "coordinator_address":
                    value = text
                else:
                    try:
                        value = int(text)
                    except ValueError:
                        raise DistributedError(f"{var}={text!r} is not an integer") from None
            values[name] = value
        out = dataclasses.replace(self, **values, enabled=self.enabled or implied)
        out.check()
        return out

    def check(self) -> None:
        n, i = self.num_processes, self.process_id
        if (n is None) != (i is None):
            given, missing = ("num_processes", "process_id") if i is None else ("process_id", "num_processes")
            raise DistributedError(f"distributed.{given} is set but distributed.{missing} is not: give both (or "
                                   "neither, to let JAX detect them on TPU pods / SLURM / Open MPI)")
        if n is not None:
            if n < 1:
                raise DistributedError(f"distributed.num_processes must be >= 1, got {n}")
            if not 0 <= i < n:
                raise DistributedError(f"distributed.process_id={i} is out of range for num_processes={n} "
                                       f"(expected 0..{n - 1})")
            if n > 1 and self.coordinator_address is None:
                raise DistributedError(f"num_processes={n} needs distributed.coordinator_address (host:port of "
                                       "process 0), or DSPARK_COORDINATOR_ADDRESS / JAX_COORDINATOR_ADDRESS")
        if self.coordinator_address is not None:
            split_address(self.coordinator_address)
        for name in ("initialization_timeout_s", "heartbeat_timeout_s"):
            if getattr(self, name) < 1:
                raise DistributedError(f"distributed.{name} must be >= 1 second, got {getattr(self, name)}")


def split_address(address: str) -> tuple[str, int]:
    """``"host:port"`` (``"[v6]:port"`` too) -> ``(host, port)``; :class:`DistributedError` if malformed."""
    host, sep, port = address.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise DistributedError(f"distributed.coordinator_address={address!r} is not host:port (e.g. 10.0.0.1:1234)")
    return host, int(port)


def is_initialized() -> bool:
    """Whether ``jax.distributed.initialize`` has run in this process."""
    from jax._src import distributed  # the public API has no query

    return distributed.global_state.client is not None


def _backend_started() -> bool:
    from jax._src import xla_bridge

    return xla_bridge.backends_are_initialized()


def _wait_for_coordinator(address: str, timeout_s: float, who: str) -> None:
    """Blocks until ``address`` accepts a TCP connection; :class:`DistributedError` after ``timeout_s``."""
    host, port = split_address(address)
    deadline = time.monotonic() + timeout_s
    last = None
    while True:
        try:
            with socket.create_connection((host, port), timeout=min(5.0, timeout_s)):
                return
        except OSError as e:
            last = e
        if time.monotonic() >= deadline:
            raise DistributedError(f"{who}: the coordinator {address} was not reachable within {timeout_s:g} s "
                                   f"({last}); start process 0 there, or check the address, port and firewall")
        time.sleep(0.2)


def _check_port_free(address: str, who: str) -> None:
    _, port = split_address(address)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("", port))
        except OSError as e:
            raise DistributedError(f"{who}: cannot serve the coordinator on port {port} ({e}); another run may "
                                   "be using it: pick another distributed.coordinator_address port") from None


def initialize(config: DistributedConfig, *, environ: Mapping[str, str] | None = None,
               log=None) -> DistributedConfig:
    """Joins the multi-process run ``config`` describes (no-op when not enabled). Returns the resolved config.

    Idempotent: a second call with the same values does nothing; different values are an error."""
    cfg = config.resolved(environ)
    if not cfg.enabled:
        return cfg

    if is_initialized():
        n, i = jax.process_count(), jax.process_index()
        if (cfg.num_processes, cfg.process_id) not in ((None, None), (n, i)):
            raise DistributedError(f"already initialised as process {i} of {n}, now asked for process "
                                   f"{cfg.process_id} of {cfg.num_processes}")
        return cfg
    if _backend_started():
        raise DistributedError("distributed: the JAX backend was started before jax.distributed.initialize(); "
                               "call dspark_jax.distributed.initialize() first thing in the program")
    # CPU collectives across processes need gloo (the default has none); harmless on GPU/TPU.
    if jax.config.jax_cpu_collectives_implementation in (None, "", "none"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    who = (f"process {cfg.process_id} of {cfg.num_processes}" if cfg.process_id is not None
           else "this process (cluster-detected)")
    if cfg.coordinator_address is not None and cfg.process_id is not None:
        if cfg.process_id == 0:
            _check_port_free(cfg.coordinator_address, who)
        else:
            _wait_for_coordinator(cfg.coordinator_address, cfg.initialization_timeout_s, who)
    (log or _stderr)(f"[distributed] {who}: joining coordinator {cfg.coordinator_address or '(auto-detected)'}; "
                     f"waiting up to {cfg.initialization_timeout_s} s for all processes; a peer silent for "
                     f"{cfg.heartbeat_timeout_s} s ends the run")
    try:
        jax.distributed.initialize(coordinator_address=cfg.coordinator_address, num_processes=cfg.num_processes,
                                   process_id=cfg.process_id, initialization_timeout=cfg.initialization_timeout_s,
                                   heartbeat_timeout_seconds=cfg.heartbeat_timeout_s)
    except ValueError as e:  # JAX found no cluster to detect and no address was given
        raise DistributedError(f"distributed: {str(e).rstrip('.')}. Outside TPU pods / SLURM / Open MPI give "
                               "distributed.coordinator_address, num_processes and process_id (or the "
                               "--coordinator-address/--num-processes/--process-id flags, or DSPARK_* "
                               "variables)") from None
    global _joined
    _joined = cfg
    if cfg.num_processes is not None and (jax.process_count(), jax.process_index()) != (cfg.num_processes,
                                                                                        cfg.process_id):
        raise DistributedError(f"joined as process {jax.process_index()} of {jax.process_count()}, expected "
                               f"{cfg.process_id} of {cfg.num_processes}")
    return cfg


_joined: DistributedConfig | None = None  # what this process joined with (heartbeat timeout for failing_fast)


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def is_main_process() -> bool:
    """Process 0: the one that writes shared outputs."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Every process waits here until all have arrived (no-op with one process). Put one wherever one process
    writes a file another reads."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def broadcast_from_main(value):
    """Process 0's ``value`` (a numpy-able pytree) on every process, so all take the same branch."""
    if jax.process_count() == 1:
        return value

    return multihost_utils.broadcast_one_to_all(value)


@contextlib.contextmanager
def failing_fast():
    """Around a command: when it fails in a multi-process run, print the error and leave at once.

    A normal exit would wait (up to JAX's shutdown timeout) at the distributed shutdown barrier while the other
    processes sit in a collective waiting for this one: a silent hang. Leaving without it stops this process's
    heartbeats, and the coordination service then ends the others within ``heartbeat_timeout_s``, naming it."""
    try:
        yield
    except BaseException as e:  # noqa: BLE001 -- re-raised unless it must end the process
        if isinstance(e, SystemExit) and e.code in (0, None) or not is_initialized():
            raise
        code = e.code if isinstance(e, SystemExit) and isinstance(e.code, int) else 1
        if isinstance(e, SystemExit):
            print(e.code if not isinstance(e.code, int) else "", file=sys.stderr)
        else:
            traceback.print_exc()
        me, n = jax.process_index(), jax.process_count()
        if isinstance(e, jax.errors.JaxRuntimeError) and any(m in str(e) for m in _LOST_PEER_MESSAGES):
            # a collective that lost a peer (gloo: "Connection closed by peer"): name the peer
            gone = _wait_for_dead_peers(n, _joined.heartbeat_timeout_s + 5 if _joined else 105)
            if gone:
                print(f"[distributed] process(es) {gone} of {n} stopped (killed, crashed or unreachable); process "
                      f"{me} ends too", file=sys.stderr, flush=True)
                sys.stdout.flush()
                os._exit(code)
        print(f"[distributed] process {me} of {n} failed; leaving now so the other processes stop at their next "
              "heartbeat check", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(code)


# runtime errors that mean a peer went away (others, e.g. out of memory, are this process's own failure)
_LOST_PEER_MESSAGES = ("closed by peer", "Connection reset", "Connection refused", "UNAVAILABLE", "unhealthy")


def _wait_for_dead_peers(process_count: int, timeout_s: float) -> list[int]:
    """The processes the coordination service no longer counts as live, waiting up to ``timeout_s`` for it to
    notice (it may also end this process itself, with its own message naming them)."""
    from jax._src import distributed

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            live = distributed.global_state.client.get_live_nodes(list(range(process_count)))
        except Exception:  # noqa: BLE001 -- the service itself is gone (process 0 died): it is the one
            return [0]
        gone = sorted(set(range(process_count)) - set(live))
        if gone:
            return gone
        time.sleep(0.5)
    return []


# ---- command-line flags ---------------------------------------------------------------------------------
def add_distributed_args(parser: argparse.ArgumentParser) -> None:
    """``--distributed``, ``--coordinator-address``, ``--num-processes``, ``--process-id`` and the timeouts."""
    g = parser.add_argument_group("multi-process (TPU pods, GPU clusters; see docs/DISTRIBUTED.md)")
    g.add_argument("--distributed", action="store_true", default=None,
                   help="join a multi-process run (auto-detected on TPU pods, SLURM, Open MPI)")
    g.add_argument("--coordinator-address", default=None, help="host:port of process 0 (implies --distributed)")
    g.add_argument("--num-processes", type=int, default=None, help="processes in the run (implies --distributed)")
    g.add_argument("--process-id", type=int, default=None, help="this process's index, 0..num_processes-1")
    g.add_argument("--initialization-timeout", type=int, default=None,
                   help="seconds to wait for the coordinator and every peer (default 300)")
    g.add_argument("--heartbeat-timeout", type=int, default=None,
                   help="seconds of silence after which a peer counts as dead and the run ends (default 100)")


def config_from_args(args: argparse.Namespace, base: DistributedConfig | None = None) -> DistributedConfig:
    """``base`` (e.g. a train config's section) with the flags that were given laid over it."""
    base = base or DistributedConfig()
    flags = {"enabled": getattr(args, "distributed", None),
             "coordinator_address": getattr(args, "coordinator_address", None),
             "num_processes": getattr(args, "num_processes", None),
             "process_id": getattr(args, "process_id", None),
             "initialization_timeout_s": getattr(args, "initialization_timeout", None),
             "heartbeat_timeout_s": getattr(args, "heartbeat_timeout", None)}
    return dataclasses.replace(base, **{k: v for k, v in flags.items() if v is not None})


__all__ = ["DistributedConfig", "DistributedError", "ENV_VARS", "initialize", "is_initialized", "is_main_process",
           "failing_fast",
           "barrier", "broadcast_from_main", "split_address", "add_distributed_args", "config_from_args"]
