"""Specification of the sharded private fit: ``lrs.private.fit(..., mesh=mesh)``.

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
import pytest

import lrs
from lrs import private

pytestmark = pytest.mark.usefixtures("cheap_compiles")

# t = 21 users over 4 devices: blocks of 6, the last one half padding (the
# padded users must not enter the quantiles' counts or the sums); chunks of 4
# users do not divide a block either. Clip levels are chosen privately (the
# noisy quantile), the initialization is the private moment one, and the
# noise is real (epsilon = 2): the same key must give the same noise, so the
# same U, on one device and on four. The second pair subsamples users.
_SCRIPT = textwrap.dedent(
    """
    import json
    import jax
    jax.config.update("jax_enable_x64", True)
    jax.config.update("jax_disable_most_optimizations", True)
    import numpy as np
    import lrs
    from lrs import private

    assert jax.device_count() == 4, jax.devices()
    data, truth = lrs.synthetic.make_problem(
        jax.random.key(3), d=12, t=21, m=12, r=2, k=1, dtype="float64"
    )
    config = lrs.AMHTConfig(rank=2, sparsity=1, num_iters=2, user_chunk_size=4)
    mesh = jax.make_mesh((4,), ("users",))
    out = {}
    import sys
    for name, rate in [(n, {"full": 1.0, "sampled": 0.5}[n]) for n in sys.argv[1:]]:
        dp = private.DPConfig(epsilon=2.0, delta=1e-5, sampling_rate=rate)
        key = jax.random.key(7)
        full = dict(truth=truth, transcript=True, nonprivate_diagnostics=True)
        one, d1 = private.fit(data, config, dp, key=key, **full)
        four, d4 = private.fit(data, config, dp, key=key, mesh=mesh, **full)
        p1, p4 = d1.privacy, d4.privacy
        host = lrs.UserData.from_host(*(np.asarray(a) for a in data))
        streamed, _ = private.fit_streamed(
            host, config, dp, key=key, chunk_users=5, mesh=mesh
        )
        out[name] = dict(
            streamed=float(np.abs(lrs.weights(one) - lrs.weights(streamed)).max()),
            U=float(np.abs(one.U - four.U).max()),
            V=float(np.abs(one.V - four.V).max()),
            weights=float(np.abs(lrs.weights(one) - lrs.weights(four)).max()),
            clips=float(np.abs(
                np.array(p1.clip_gradient + p1.clip_gram + (p1.clip_moment,))
                - np.array(p4.clip_gradient + p4.clip_gram + (p4.clip_moment,))
            ).max()),
            epsilon=[p1.epsilon, p4.epsilon],
            noise=p1.noise_multiplier,
            loss=float(
                np.abs(d1.nonprivate.loss - d4.nonprivate.loss).max()
                / d1.nonprivate.loss[0]
            ),
            error=float(np.abs(
                d1.nonprivate.relative_error - d4.nonprivate.relative_error
            ).max()),
            clipped=float(np.abs(
                d1.nonprivate.clipped_fraction - d4.nonprivate.clipped_fraction
            )[1:].max()),
            transcript=float(max(
                np.abs(getattr(d1.transcript, n) - getattr(d4.transcript, n)).max()
                for n in ("U", "moment", "G", "H")
            )),
            excluded=bool((d1.excluded == d4.excluded).all()),
            shapes=[list(four.V.shape), list(four.B.indices.shape)],
        )
    print(json.dumps(out))
    """
)


@pytest.mark.parametrize(
    "case", ["full", pytest.param("sampled", marks=pytest.mark.slow)]
)
def test_sharded_private_fit_equals_single_device_fit_on_four_cpu_devices(case):
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        "--xla_force_host_platform_device_count=4 --xla_cpu_multi_thread_eigen=false"
    )
    env["OPENBLAS_NUM_THREADS"] = "1"
    run = subprocess.run(
        [sys.executable, "-c", _SCRIPT, case],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    for name in (case,):
        res = out[name]
        assert res["noise"] > 0  # a real private fit, noise included
        assert res["U"] < 1e-6 and res["V"] < 1e-6 and res["weights"] < 1e-6, res
        assert res["clips"] == 0.0  # the same noisy quantiles, bin for bin
        assert res["epsilon"][0] == res["epsilon"][1]
        assert res["loss"] < 1e-8 and res["error"] < 1e-8
        assert res["clipped"] == 0.0
        assert res["transcript"] < 1e-6 and res["excluded"]
        assert res["shapes"] == [[21, 2], [21, 1]]  # padded users trimmed
        assert res["streamed"] < 1e-6  # streamed, each chunk over 4 devices


def test_private_mesh_must_be_a_mesh_with_a_users_axis():
    data, _ = lrs.synthetic.make_problem(
        jax.random.key(0), d=8, t=10, m=8, r=2, k=1, dtype="float64"
    )
    config = lrs.AMHTConfig(rank=2, sparsity=1, num_iters=1)
    dp = private.DPConfig(epsilon=2.0, delta=1e-5)
    with pytest.raises(ValueError, match="mesh must be a jax.sharding.Mesh"):
        private.fit(data, config, dp, key=jax.random.key(0), mesh="users")
    with pytest.raises(ValueError, match="mesh must have an axis named 'users'"):
        private.fit(
            data,
            config,
            dp,
            key=jax.random.key(0),
            mesh=jax.make_mesh((1,), ("batch",)),
        )


def test_one_device_mesh_gives_the_unsharded_private_fit():
    data, _ = lrs.synthetic.make_problem(
        jax.random.key(0), d=8, t=10, m=8, r=2, k=1, dtype="float64"
    )
    config = lrs.AMHTConfig(rank=2, sparsity=1, num_iters=1)
    dp = private.DPConfig(epsilon=2.0, delta=1e-5)
    key = jax.random.key(1)
    plain, d0 = private.fit(data, config, dp, key=key)
    mesh = jax.make_mesh((1,), ("users",))
    meshed, d1 = private.fit(data, config, dp, key=key, mesh=mesh)
    assert float(abs(plain.U - meshed.U).max()) < 1e-10
    assert d0.privacy == d1.privacy
