"""MkDocs hook: the API reference pages list exactly each package's ``__all__``.

A page holding ``<!-- api: lrs.private -->`` gets one mkdocstrings block per
name in ``lrs.private.__all__`` (a public submodule gets its own public
members), so a new public name appears in the reference without editing a page.
"""

import importlib
import inspect
import re

MARKER = re.compile(r"<!-- api: ([\w.]+) -->")


def _blocks(package: str) -> str:
    module = importlib.import_module(package)
    return "\n".join(
        f"::: {reference_path(package, name)}\n    options:\n      heading_level: 2\n"
        for name in module.__all__
    )


def reference_path(package: str, name: str) -> str:
    """Where the reference documents ``package.name``: the module itself, or
    the module that defines the object (a name exported lazily, through a
    module ``__getattr__``, is not visible to static analysis at
    ``package.name``)."""
    module = importlib.import_module(package)
    if name in vars(module):  # imported eagerly: documented where users see it
        return f"{package}.{name}"
    obj = getattr(module, name)
    if inspect.ismodule(obj):
        return obj.__name__
    defined_in = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None)
    if defined_in and qualname and defined_in.startswith("lrs"):
        return f"{defined_in}.{qualname}"
    return f"{package}.{name}"


def on_page_markdown(markdown, page, config, files):
    return MARKER.sub(lambda m: _blocks(m.group(1)), markdown)
