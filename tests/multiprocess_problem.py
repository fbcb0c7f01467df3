"""The problem tests/test_multiprocess.py fits in one and in two processes."""

import jax

import lrs
from lrs import private

CONFIG = lrs.AMHTConfig(rank=2, sparsity=2, num_iters=6)
DP = private.DPConfig(epsilon=4.0, delta=1e-5)


def problem():
    """101 users: not a multiple of the devices (the last block is padded)."""
    return lrs.synthetic.make_problem(jax.random.key(0), d=20, t=101, m=20, r=2, k=2)
