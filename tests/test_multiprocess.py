"""Users sharded over two processes (``jax.distributed`` on CPU, gloo
collectives): the fit and the private fit give the single-process results."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import lrs
from lrs import private

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import multiprocess_problem as problem  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Two more JAX processes next to the suite's two workers: about 80 s on 2
# cores, so a slow re-check (the sharded fits are checked on one process's
# virtual devices by the default suite).
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    out = tmp_path_factory.mktemp("multiprocess")
    port = str(_free_port())
    env = dict(os.environ, PYTHONPATH=str(HERE), JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false"  # one device each
    workers = [
        subprocess.Popen(
            [sys.executable, str(HERE / "multiprocess_worker.py"), str(i), "2", port]
            + [str(out)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    logs = []
    try:
        for w in workers:
            logs.append(w.communicate(timeout=240)[0])
    except subprocess.TimeoutExpired:
        for w in workers:
            w.kill()
        pytest.fail("a process of the 2-process fit hung (killed after 240 s)")
    for w, log in zip(workers, logs, strict=True):
        assert w.returncode == 0, log[-3000:]
    return [dict(np.load(out / f"process{i}.npz")) for i in range(2)]


def test_both_processes_saw_one_cluster(two_processes):
    for seen in two_processes:
        assert int(seen["processes"]) == 2
        assert int(seen["devices"]) == 2


def test_two_process_fit_equals_the_single_process_fit(two_processes):
    data, _ = problem.problem()
    params, _ = lrs.fit(data, problem.CONFIG, key=jax.random.key(1))
    for seen in two_processes:
        np.testing.assert_allclose(seen["U"], params.U, atol=1e-10)
        np.testing.assert_allclose(seen["V"], params.V, atol=1e-8)


def test_two_process_private_fit_equals_the_single_process_fit(two_processes):
    data, _ = problem.problem()
    params, _ = private.fit(data, problem.CONFIG, problem.DP, key=jax.random.key(2))
    for seen in two_processes:
        np.testing.assert_allclose(seen["private_U"], params.U, atol=1e-10)
        np.testing.assert_allclose(seen["private_V"], params.V, atol=1e-8)
