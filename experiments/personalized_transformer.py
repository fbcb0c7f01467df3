"""Personalized transformer: LRS layers against the usual personalization adapters.

    python experiments/personalized_transformer.py --out transformer-out
    python experiments/personalized_transformer.py --quick --out /tmp/t   # < 1 min

Same as ``lrs transformer``; see docs/transformer.md and ``--help``.
"""

from lrs._xla import avoid_cpu_deadlock

avoid_cpu_deadlock()  # before JAX starts its CPU backend

from lrs.studies.transformer import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main(prog="personalized_transformer.py"))
