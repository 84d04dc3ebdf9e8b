"""Shared test set-up: 8 fake CPU devices, tiny HF reference models, launchers for real multi-process runs."""

import os

# LLVM's expensive passes are much of the suite's compile time and the tests' programs are tiny: without them
# test_scheduler.py + test_eagle3.py run cold in ~175 s instead of 241-286 s. Not the backend's -O0 as well: under it
# the Gemma4 chunked softcap loss's gradients come out NaN (tests/drafts/test_gemma4_draft.py; finite and equal to
# the reference at the default level and with this flag) and Gemma4-MoE taps move by 3e-4. Nor do the train tests pass
# it in their compiler_options any more: a CI run's worker aborted natively inside an -O0 compile of
# test_checkpoint.py's sharded step (not reproduced on a fresh clone here), and users never run -O0 programs.
LIGHT_XLA = "--xla_llvm_disable_expensive_passes=true"
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {LIGHT_XLA}")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

# The test processes' persistent compilation cache is opt-in (DSPARK_TEST_JAX_CACHE=dir, e.g. .jax_cache for warm
# reruns while developing); a fresh clone, as CI runs, gains little from it in-process. (It was turned off while
# workers crashed natively in XLA:CPU's compile path, with and without it: the cause was the memory-mapping limit,
# handled at the end of this file.) The processes that
# the multi-process and kill/resume tests start keep a cache of their own: they repeat each other's programs.
_CACHE = os.environ.get("DSPARK_TEST_JAX_CACHE")
if _CACHE:
    jax.config.update("jax_compilation_cache_dir", os.path.abspath(_CACHE))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def _tiny_hf(kind: str):
    """(transformers config, model class) of the tiny reference models used across the suite."""
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    common = dict(vocab_size=96, max_position_embeddings=512, rms_norm_eps=1e-6, attention_dropout=0.0)
    if kind == "dense":
        cfg = Qwen3Config(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=8, rope_theta=10000.0, tie_word_embeddings=False,
                          initializer_range=0.2, **common)
        return cfg, Qwen3ForCausalLM
    if kind == "odd":
        # head_dim != hidden/heads, one KV head, tied embeddings, attention bias, yarn rope
        cfg = Qwen3Config(hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=3,
                          num_key_value_heads=1, head_dim=12, tie_word_embeddings=True, attention_bias=True,
                          initializer_range=0.2,
                          rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0,
                                           "original_max_position_embeddings": 128}, **common)
        return cfg, Qwen3ForCausalLM
    if kind == "moe":
        # a dense layer (mlp_only_layers) among MoE layers, renormalised top-k
        cfg = Qwen3MoeConfig(hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=6,
                             num_experts_per_tok=2, norm_topk_prob=True, mlp_only_layers=[1],
                             decoder_sparse_step=1, tie_word_embeddings=False, initializer_range=0.2, **common)
        return cfg, Qwen3MoeForCausalLM
    raise KeyError(kind)


@pytest.fixture(scope="session")
def hf_models(tmp_path_factory):
    """kind -> (checkpoint dir, transformers model in eval mode, fp32). Built once per session."""
    torch = pytest.importorskip("torch", reason="torch (test extra) builds the reference models")
    out = {}
    for i, kind in enumerate(("dense", "odd", "moe")):
        torch.manual_seed(1234 + i)
        cfg, cls = _tiny_hf(kind)
        model = cls(cfg).eval()
        path = tmp_path_factory.mktemp(f"hf_{kind}")
        model.save_pretrained(path)
        out[kind] = (str(path), model)
    return out


@pytest.fixture(scope="session")
def jax_targets(hf_models):
    """kind -> our target loaded from the same checkpoint (fp32)."""
    import dspark_jax as dj

    return {kind: dj.load_target(path) for kind, (path, _) in hf_models.items()}


@pytest.fixture
def rng():
    return np.random.default_rng(0)


# ---- several real JAX processes on the loopback address (multi-host stand-ins) -----------------------------
class ProcessLauncher:
    """Starts ``python -m dspark_jax.cli ...`` processes that stand in for hosts: CPU, ``devices`` devices each,
    fast-compile XLA flags, one compilation cache shared by every multi-process test of the session."""

    FAST_XLA = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"

    def __init__(self, cache_dir: str):
        self.cache_dir = cache_dir

    @staticmethod
    def free_port() -> int:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    def env(self, devices: int) -> dict:
        # every compilation is cached (not only those over 1 s): the processes repeat the same small programs
        return dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=self.cache_dir,
                    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                    XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {self.FAST_XLA}",
                    PYTHONUNBUFFERED="1")

    def start(self, args: list[str], log_path, *, devices: int, env: dict | None = None):
        import subprocess
        import sys

        log = open(log_path, "wb")
        proc = subprocess.Popen([sys.executable, "-m", "dspark_jax.cli", *args],
                                env={**self.env(devices), **(env or {})}, stdout=log, stderr=subprocess.STDOUT)
        proc.log_path = str(log_path)
        log.close()
        return proc

    def start_group(self, args: list[str], log_dir, *, processes: int = 2, devices: int = 2, port=None,
                    extra=("--heartbeat-timeout", "10", "--initialization-timeout", "60")):
        """``processes`` processes of one run (``--coordinator-address/--num-processes/--process-id`` added)."""
        port = port or self.free_port()
        return [self.start([*args, "--coordinator-address", f"127.0.0.1:{port}", "--num-processes", str(processes),
                            "--process-id", str(i), *extra], os.path.join(log_dir, f"process{i}.log"),
                           devices=devices)
                for i in range(processes)]

    def start_slurm_group(self, args: list[str], log_dir, *, processes: int = 2, devices: int = 2):
        """``processes`` processes of one run that learn everything from the variables a SLURM job step sets
        (JAX's cluster detection; the coordinator port is derived from the job id), given only --distributed."""
        import socket

        for job_id in range(int.from_bytes(os.urandom(2), "little"), 1 << 20):
            with socket.socket() as s:  # JAX's SLURM port: job id mod 4096 + 61440
                try:
                    s.bind(("127.0.0.1", job_id % 4096 + 61440))
                    break
                except OSError:
                    continue
        return [self.start([*args, "--distributed", "--heartbeat-timeout", "10"],
                           os.path.join(log_dir, f"process{i}.log"), devices=devices,
                           env={"SLURM_JOB_ID": str(job_id), "SLURM_STEP_NODELIST": "127.0.0.1",
                                "SLURM_NTASKS": str(processes), "SLURM_PROCID": str(i), "SLURM_LOCALID": str(i)})
                for i in range(processes)]

    @staticmethod
    def output(proc) -> str:
        with open(proc.log_path, "rb") as f:
            return f.read().decode(errors="replace")

    def finish(self, procs, timeout: float = 300) -> list[str]:
        """Waits for every process; fails the test (with the logs) on a timeout or a non-zero exit."""
        import subprocess
        import time

        deadline = time.monotonic() + timeout
        try:
            for p in procs:
                p.wait(max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pytest.fail(f"processes still running after {timeout}s:\n" + "\n".join(self.output(p)[-3000:]
                                                                                 for p in procs))
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        outs = [self.output(p) for p in procs]
        for p, out in zip(procs, outs):
            assert p.returncode == 0, f"exit {p.returncode}:\n{out[-4000:]}"
        return outs


@pytest.fixture(scope="session")
def multiprocess(tmp_path_factory):
    """A :class:`ProcessLauncher` whose processes share this session's compilation cache."""
    return ProcessLauncher(str(tmp_path_factory.mktemp("multiprocess_jax_cache")))


# ---- per-test timings, written as they happen (DSPARK_TEST_TIMINGS=path): survives a run that is killed -----
_TIMINGS = os.environ.get("DSPARK_TEST_TIMINGS")


def pytest_runtest_logreport(report):
    # under xdist the controller sees every worker's reports: write there only, once per phase
    if _TIMINGS and "PYTEST_XDIST_WORKER" not in os.environ:
        with open(_TIMINGS, "a", encoding="utf-8") as f:
            f.write(f"{report.duration:.2f}\t{report.when}\t{report.nodeid}\t{report.outcome}\n")


# ---- resuming a run a native crash cut short (scripts/test.sh): DSPARK_TEST_SKIP_DONE=path of a timings file -----
_SKIP_DONE = os.environ.get("DSPARK_TEST_SKIP_DONE")


def _finished_tests(path: str) -> set[str]:
    """Tests a timings file records as passed (call phase) or skipped (setup phase)."""
    done = set()
    with open(path, encoding="utf-8") as f:
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if len(parts) == 4 and ((parts[1] == "call" and parts[3] == "passed") or
                                    (parts[1] == "setup" and parts[3] == "skipped")):
                done.add(parts[2])
    return done


def pytest_collection_modifyitems(config, items):
    if not _SKIP_DONE:
        return
    done = _finished_tests(_SKIP_DONE)
    keep = [it for it in items if it.nodeid not in done]
    config.hook.pytest_deselected(items=[it for it in items if it.nodeid in done])
    items[:] = keep


# ---- a long-lived test process runs out of memory mappings, not memory ------------------------------------------
# Every program XLA:CPU compiles is loaded into memory mappings of its own (~700 per test of the decode files), and
# jax's caches keep them for the life of the process. An xdist worker that runs a third of the suite passes Linux's
# vm.max_map_count (65530 by default); the next mmap inside LLVM's loader fails and the compile dies with SIGSEGV
# (backend_compile_and_load). Reproduced at will with the limit lowered to 5000: test_speculative.py alone crashes
# there after 4 tests. So once a process holds more than half its allowance, jax's caches are dropped (the programs
# a later test needs again are recompiled).
def _map_count_limit() -> int | None:
    try:
        with open("/proc/sys/vm/max_map_count", encoding="ascii") as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


_MAP_LIMIT = _map_count_limit()


def mapped_regions() -> int | None:
    """Memory mappings this process holds now (None where /proc is not there)."""
    try:
        with open("/proc/self/maps", "rb") as f:
            return sum(1 for _ in f)
    except OSError:
        return None


@pytest.fixture(autouse=True)
def _release_compiled_programs():
    yield
    held = mapped_regions() if _MAP_LIMIT else None
    if held is not None and held > _MAP_LIMIT // 2:
        import gc

        jax.clear_caches()
        gc.collect()
