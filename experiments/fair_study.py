"""A fair personalization study on the Flax NNX adapters (issue 18).

    python experiments/fair_study.py --quick --out /tmp/fair      # < 2 minutes
    python experiments/fair_study.py --out docs/bench/fair        # < 30 minutes

Capacity sweeps, one learning-rate grid, seeds and 95% intervals, three
teachers, honest cold start; see lrs/studies/fair/, docs/fair_study.md and
``--help``.
"""

from lrs._xla import avoid_cpu_deadlock, use_compilation_cache

avoid_cpu_deadlock()  # before JAX starts its CPU backend
use_compilation_cache()

from lrs.studies.fair import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main(prog="fair_study.py"))
