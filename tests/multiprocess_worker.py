"""One process of tests/test_multiprocess.py: joins a 2-process JAX cluster on
CPU (gloo collectives), fits with users sharded over both processes' devices,
and saves what it sees of the result.

    python tests/multiprocess_worker.py PROCESS_ID NUM_PROCESSES PORT OUT_DIR
"""

import sys

from lrs._xla import avoid_cpu_deadlock

avoid_cpu_deadlock()

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.config.update("jax_enable_x64", True)


def main(process_id: int, num_processes: int, port: str, out: str) -> None:
    jax.distributed.initialize(
        f"127.0.0.1:{port}", num_processes=num_processes, process_id=process_id
    )
    import multiprocess_problem as from_test  # tests/ is on PYTHONPATH
    import numpy as np
    from jax.experimental import multihost_utils

    import lrs
    from lrs import private

    data, _ = from_test.problem()
    data = jax.tree.map(np.asarray, data)  # every process passes the same data
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("users",))
    params, _ = lrs.fit(data, from_test.CONFIG, key=jax.random.key(1), mesh=mesh)
    private_params, _ = private.fit(
        data, from_test.CONFIG, from_test.DP, key=jax.random.key(2), mesh=mesh
    )
    t = data.X.shape[0]

    def gather(x):
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    np.savez(
        f"{out}/process{process_id}.npz",
        devices=jax.device_count(),
        processes=jax.process_count(),
        U=np.asarray(params.U.addressable_data(0)),
        V=gather(params.V)[:t],
        private_U=np.asarray(private_params.U.addressable_data(0)),
        private_V=gather(private_params.V)[:t],
    )
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
