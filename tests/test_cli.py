"""The ``lrs`` command line, run in a subprocess as a user would."""

import json
import os
import subprocess
import sys

import pytest

from lrs._xla import DEADLOCK_FLAG


def _run(*args, timeout=240):
    env = dict(os.environ, XLA_FLAGS=DEADLOCK_FLAG, JAX_PLATFORMS="cpu")
    return subprocess.run(
        [sys.executable, "-m", "lrs.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return _run("demo", "--quick", "--out", str(out)), out


def test_quick_demo_succeeds(quick_demo):
    proc, out = quick_demo
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "final relative error" in proc.stdout
    assert str(out / "results.json") in proc.stdout


def test_quick_demo_results_json(quick_demo):
    proc, out = quick_demo
    assert proc.returncode == 0, proc.stderr
    results = json.loads((out / "results.json").read_text())
    for key in ("args", "seed", "jax_version", "backend", "diagnostics", "summary"):
        assert key in results
    assert results["args"]["quick"] is True
    assert results["seed"] == 0

    diag = results["diagnostics"]
    n = results["summary"]["iterations_run"] + 1
    for key in ("loss", "u_change", "cg_iters", "relative_error", "subspace_distance"):
        assert len(diag[key]) == n
    assert diag["iteration"] == list(range(n))

    summary = results["summary"]
    for key in (
        "final_relative_error",
        "final_subspace_distance",
        "support_recovery",
        "training_loss",
        "fit_wall_time_s",
        "linear_rate",
        "dtype",
    ):
        assert key in summary
    assert summary["dtype"] == "float32"
    assert summary["final_relative_error"] < 1e-3
    assert summary["final_relative_error"] == diag["relative_error"][-1]
    assert summary["support_recovery"] > 0.9
    assert 0 < summary["linear_rate"] < 1


def test_quick_demo_plot(quick_demo):
    proc, out = quick_demo
    assert proc.returncode == 0, proc.stderr
    png = out / "error_vs_iteration.png"
    assert png.stat().st_size > 1000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "args, words",
    [
        (["--r", "0"], ("--r", "rank")),
        (["--quick", "--k", "40"], ("--k", "sparsity")),
        (["--quick", "--r", "40"], ("--r", "rank")),
        (["--noise", "-1"], ("noise",)),
    ],
)
def test_bad_arguments_fail_cleanly(tmp_path, args, words):
    proc = _run("demo", *args, "--out", str(tmp_path), timeout=60)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    error = proc.stderr.strip().splitlines()[-1]
    assert error.startswith("lrs demo: error:")
    for word in words:
        assert word in error
    assert not (tmp_path / "results.json").exists()


def test_plot_convergence_handles_gaps(tmp_path):
    from lrs.studies.plotting import plot_convergence

    path = plot_convergence(
        {
            "relative_error": [0.5, 0.1, None, 0.0],
            "subspace_distance": [1.0, float("nan"), 0.01, 1e-3],
            "loss": [1.0, 0.1, 0.01, 0.001],
        },
        tmp_path / "p.png",
        title="gaps",
        floor=1e-5,
    )
    assert os.path.getsize(path) > 0
