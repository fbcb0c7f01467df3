"""The studies behind the ``lrs`` commands, outside the library's core modules.

:mod:`~lrs.studies.demo` (``lrs demo``: a planted problem fitted and
summarized), :mod:`~lrs.studies.privacy_utility` (``lrs dp``: private AMHT-LRS,
error versus epsilon and users), :mod:`~lrs.studies.privacy_audit`
(``lrs audit``: canary lower bounds on epsilon), :mod:`~lrs.studies.transformer`
(``lrs transformer``: LRS layers against the usual adapters) and
:mod:`~lrs.studies.plotting` (the one plotting style of the studies and of
``experiments/``). Each study module has ``command(args)``, which
:mod:`lrs.cli` calls with the parsed arguments.

Nothing is imported here: ``import lrs.studies`` stays cheap, and the core
(``lrs``, ``lrs.private``, ``lrs.audit``, ``lrs.nn``) never imports a study.
"""
