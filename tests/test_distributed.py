"""Joining a multi-process run (dspark_jax/distributed.py): where the values come from, and bad input failing
fast with a clear message (checked values in-process; an unreachable coordinator with a real CLI process)."""

import os
import socket
import subprocess
import sys
import time

import jax
import pytest

from dspark_jax import cli
from dspark_jax.distributed import DistributedConfig, DistributedError, config_from_args, initialize
from dspark_jax.train.config import ConfigError, load_train_config


def test_values_come_from_config_then_environment():
    env = {"DSPARK_COORDINATOR_ADDRESS": "10.0.0.1:1234", "DSPARK_NUM_PROCESSES": "4", "DSPARK_PROCESS_ID": "3"}
    got = DistributedConfig().resolved(env)
    assert (got.enabled, got.coordinator_address, got.num_processes, got.process_id) == (True, "10.0.0.1:1234", 4, 3)
    got = DistributedConfig(num_processes=2, process_id=0).resolved(env)  # explicit values win over the env
    assert (got.coordinator_address, got.num_processes, got.process_id) == ("10.0.0.1:1234", 2, 0)
    assert not DistributedConfig().resolved({}).enabled
    got = DistributedConfig().resolved({"JAX_COORDINATOR_ADDRESS": "h:2", "DSPARK_NUM_PROCESSES": "2",
                                        "DSPARK_PROCESS_ID": "1"})  # JAX's own variable counts too
    assert (got.enabled, got.coordinator_address, got.num_processes, got.process_id) == (True, "h:2", 2, 1)
    assert not DistributedConfig().resolved({"JAX_COORDINATOR_ADDRESS": "h:2"}).enabled  # set for others
    # the train config's section: distributed=true is the old boolean form; flags lie over the section
    cfg = load_train_config("tiny", ["distributed=true", "distributed.num_processes=2",
                                     "distributed.process_id=1", "distributed.coordinator_address=h:5"])
    assert cfg.distributed == DistributedConfig(enabled=True, coordinator_address="h:5", num_processes=2,
                                                process_id=1)

    class Args:
        distributed, coordinator_address, num_processes, process_id = None, None, 8, 7
        initialization_timeout, heartbeat_timeout = 5, None

    got = config_from_args(Args, cfg.distributed)
    assert (got.num_processes, got.process_id, got.initialization_timeout_s, got.coordinator_address) == \
        (8, 7, 5, "h:5")


@pytest.mark.parametrize("values,match", [
    (dict(num_processes=2, process_id=2, coordinator_address="h:1"), r"process_id=2 is out of range.*0\.\.1"),
    (dict(num_processes=2, process_id=-1, coordinator_address="h:1"), "out of range"),
    (dict(process_id=1, coordinator_address="h:1"), "process_id is set but distributed.num_processes is not"),
    (dict(num_processes=2, process_id=0), "needs distributed.coordinator_address"),
    (dict(num_processes=2, process_id=0, coordinator_address="nohost"), "is not host:port"),
    (dict(num_processes=2, process_id=0, coordinator_address="h:99999"), "is not host:port"),
    (dict(enabled=True, heartbeat_timeout_s=0), "heartbeat_timeout_s must be >= 1"),
])
def test_bad_values_are_refused_before_connecting(values, match):
    with pytest.raises(DistributedError, match=match):
        DistributedConfig(**values).resolved({})
    with pytest.raises(DistributedError, match="DSPARK_PROCESS_ID='x' is not an integer"):
        DistributedConfig().resolved({"DSPARK_PROCESS_ID": "x"})


def test_bad_values_in_a_train_config():
    with pytest.raises(ConfigError, match="out of range"):
        load_train_config("tiny", ["distributed.num_processes=2", "distributed.process_id=3",
                                   "distributed.coordinator_address=h:1"])


def test_every_entry_point_takes_the_flags():
    parser = cli.build_parser()
    for command in ("train", "prepare-cache", "generate-data", "eval", "calibrate", "profile"):
        assert "--coordinator-address" in parser._subparsers._group_actions[0].choices[command].format_help()


def test_refused_once_the_backend_has_started():
    jax.devices()  # this test process's backend is up
    with pytest.raises(DistributedError, match="backend was started before"):
        initialize(DistributedConfig(num_processes=2, process_id=1, coordinator_address="127.0.0.1:1"), environ={})


def _cli(*args, timeout=60):
    t0 = time.monotonic()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_", "DSPARK_"))}
    out = subprocess.run([sys.executable, "-m", "dspark_jax.cli", *args], capture_output=True, text=True,
                         timeout=timeout, env={**env, "JAX_PLATFORMS": "cpu"})
    return out.returncode, out.stdout + out.stderr, time.monotonic() - t0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.multiprocess
def test_unreachable_coordinator_and_bad_process_id_fail_fast():
    port = _free_port()
    rc, out, seconds = _cli("train", "--config", "tiny", "--coordinator-address", f"127.0.0.1:{port}",
                            "--num-processes", "2", "--process-id", "1", "--initialization-timeout", "2")
    assert rc != 0 and f"the coordinator 127.0.0.1:{port} was not reachable within 2 s" in out, out[-2000:]
    assert seconds < 30
    with pytest.raises(SystemExit, match="process_id=2 is out of range for num_processes=2"):
        cli.main(["eval", "--target", "x", "--draft", "y", "--data-dir", "z", "--coordinator-address",
                  f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", "2"])
    # distributed=true where JAX detects no cluster (no SLURM / MPI / TPU pod here) and no values are given
    rc, out, _ = _cli("train", "--config", "tiny", "distributed=true", "output_dir=unused")
    assert rc != 0 and "Outside TPU pods / SLURM / Open MPI give distributed.coordinator_address" in out, out[-2000:]
    with socket.socket() as busy:  # process 0 cannot serve on a port that is taken
        busy.bind(("", port))
        busy.listen()
        rc, out, seconds = _cli("train", "--config", "tiny", "--coordinator-address", f"127.0.0.1:{port}",
                                "--num-processes", "2", "--process-id", "0")
    assert rc != 0 and f"cannot serve the coordinator on port {port}" in out, out[-2000:]
