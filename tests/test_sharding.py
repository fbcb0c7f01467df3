"""Specification of the sharded fit: ``lrs.fit(..., mesh=mesh)``.

Several CPU devices exist only if XLA_FLAGS says so before JAX starts, so the
multi-device check runs in a subprocess (with the deadlock flag kept and a
timeout, so a hang fails fast).
"""

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

import lrs
from lrs import sharding

pytestmark = pytest.mark.usefixtures("cheap_compiles")

# t = 21 users over 4 devices: blocks of 6, the last one half padding; chunks of
# 4 users do not divide a block either. rescue_fraction 0.2: 5 users rescued,
# chosen over all devices.
_SCRIPT = textwrap.dedent(
    """
    import json
    import jax
    jax.config.update("jax_enable_x64", True)
    jax.config.update("jax_disable_most_optimizations", True)
    import numpy as np
    import lrs

    assert jax.device_count() == 4, jax.devices()
    data, truth = lrs.synthetic.make_problem(
        jax.random.key(3), d=12, t=21, m=12, r=2, k=1, dtype="float64"
    )
    config = lrs.AMHTConfig(
        rank=2, sparsity=1, num_iters=3, tol=0.0, rescue_fraction=0.2,
        user_chunk_size=4,
    )
    X_before = np.array(data.X)
    one, d1 = lrs.fit(data, config, truth=truth)
    seen = []
    mesh = jax.make_mesh((4,), ("users",))
    four, d4 = lrs.fit(
        data, config, truth=truth, mesh=mesh, callback=lambda i, _: seen.append(i)
    )
    host = lrs.UserData.from_host(*(np.asarray(a) for a in data))
    # chunks of 5 users become 8 (two per device); 21 users: 3 chunks
    streamed, ds = lrs.fit_streamed(
        host, config, chunk_users=5, truth=truth, mesh=mesh
    )
    print(json.dumps(dict(
        streamed=float(np.abs(lrs.weights(one) - lrs.weights(streamed)).max()),
        streamed_stop=[d1.stop_code.tolist(), ds.stop_code.tolist()],
        weights=float(np.abs(lrs.weights(one) - lrs.weights(four)).max()),
        U=float(np.abs(one.U - four.U).max()),
        error=float(np.abs(d1.relative_error - d4.relative_error).max()),
        loss=float(np.abs(d1.loss - d4.loss).max() / d1.loss[0]),
        cg_iters=[d1.cg_iters.tolist(), d4.cg_iters.tolist()],
        shapes=[list(four.V.shape), list(four.B.indices.shape)],
        seen=seen,
        data_unchanged=bool(np.array_equal(X_before, np.asarray(data.X))),
    )))
    """
)


def test_sharded_fits_equal_single_device_fit_on_four_cpu_devices():
    """lrs.fit(mesh=) and lrs.fit_streamed(mesh=) on four devices equal the
    single-device fit."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        "--xla_force_host_platform_device_count=4 --xla_cpu_multi_thread_eigen=false"
    )
    env["OPENBLAS_NUM_THREADS"] = "1"
    run = subprocess.run(
        [sys.executable, "-c", _SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["weights"] < 1e-10
    assert out["U"] < 1e-10
    assert out["error"] < 1e-10 and out["loss"] < 1e-10
    assert out["cg_iters"][0] == out["cg_iters"][1]
    assert out["shapes"] == [[21, 2], [21, 1]]  # padded users trimmed
    assert out["seen"] == [0, 1, 2, 3]  # the callback runs once per iteration
    assert out["data_unchanged"]
    # streamed and sharded: each chunk split over the four devices
    assert out["streamed"] < 1e-10
    assert out["streamed_stop"][0] == out["streamed_stop"][1]


def test_mesh_must_be_a_mesh_with_a_users_axis(small_problem):
    data, _ = small_problem
    config = lrs.AMHTConfig(rank=3, sparsity=3)
    with pytest.raises(ValueError, match="mesh must be a jax.sharding.Mesh"):
        lrs.fit(data, config, mesh="users")
    with pytest.raises(ValueError, match="mesh must have an axis named 'users'"):
        lrs.fit(data, config, mesh=jax.make_mesh((1,), ("batch",)))


def test_shard_data_pads_users_without_samples_and_keeps_the_input():
    X = np.arange(5 * 2 * 3, dtype=np.float64).reshape(5, 2, 3)
    data = lrs.UserData.from_host(X, np.ones((5, 2)))
    mesh = jax.make_mesh((1,), ("users",))
    placed = sharding.shard_data(data, mesh)
    assert placed.X.shape == (5, 2, 3)  # one device: nothing to pad
    np.testing.assert_array_equal(placed.X, X)
    assert sharding.padded_users(21, 4) == 24
    assert sharding.padded_users(20, 4) == 20
    spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("users"))
    padded = sharding.place_users(np.asarray(data.mask), 8, spec)
    assert padded.shape == (8, 2)
    assert np.asarray(padded)[:5].all() and not np.asarray(padded)[5:].any()
    np.testing.assert_array_equal(X, np.arange(30).reshape(5, 2, 3))
