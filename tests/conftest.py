"""Test configuration: the XLA deadlock work-around, x64, small-problem fixtures."""

import os

from lrs._xla import avoid_cpu_deadlock

avoid_cpu_deadlock()  # before jax is imported anywhere in the test session
# No persistent compilation cache in the tests (also for the CLI they run):
# every run compiles what it checks, and concurrent runs never share files.
os.environ["LRS_NO_COMPILATION_CACHE"] = "1"

import jax  # noqa: E402
import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

# The same examples on every run: a property test that fails, fails every
# time (HYPOTHESIS_PROFILE=explore draws new examples).
settings.register_profile("ci", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

jax.config.update("jax_enable_x64", True)

# Tests marked ``slow`` re-check, at higher cost, what faster tests already
# cover (another sampling rate, an end-to-end experiment run, an eager vs
# jitted comparison). They run with ``pytest --run-slow`` or LRS_RUN_SLOW=1,
# so that the default suite stays near 8 minutes on 2 cores.


def pytest_addoption(parser):
    parser.addoption(
        "--run-slow", action="store_true", help="also run tests marked slow"
    )


def pytest_collection_modifyitems(config, items):
    import os

    if config.getoption("--run-slow") or os.environ.get("LRS_RUN_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: run with --run-slow or LRS_RUN_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def cheap_compiles():
    """Tiny programs compile much faster without most XLA optimizations.

    Modules opt in with ``pytestmark = pytest.mark.usefixtures("cheap_compiles")``;
    results change only in the last digits, and the CLI test runs the default.
    """
    before = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", before)


@pytest.fixture
def key():
    return jax.random.key(0)


@pytest.fixture(scope="session")
def small_problem():
    """A noiseless float64 problem that AMHT-LRS recovers exactly in seconds."""
    import lrs

    return lrs.synthetic.make_problem(
        jax.random.key(1), d=30, t=120, m=30, r=3, k=3, dtype="float64"
    )
