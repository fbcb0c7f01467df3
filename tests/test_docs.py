"""The documentation is part of the code: every public name has a docstring,
the README's example and every docstring example run (in float32, the users'
default), and the site builds in strict mode with every public name in its
reference."""

import doctest
import importlib
import inspect
import os
import pkgutil
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import pytest

import lrs

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("lrs", "lrs.private", "lrs.audit", "lrs.nn")


def public_names():
    """``(qualified name, object)`` of every public name: each package's
    ``__all__``, and the public functions and classes of a public submodule."""
    for package in PACKAGES:
        module = importlib.import_module(package)
        for name in module.__all__:
            obj = getattr(module, name)
            yield f"{package}.{name}", obj
            if inspect.ismodule(obj):
                names = getattr(obj, "__all__", None) or [
                    sub
                    for sub, member in vars(obj).items()
                    if not sub.startswith("_")
                    and getattr(member, "__module__", None) == obj.__name__
                ]
                for sub in names:
                    member = getattr(obj, sub)
                    if inspect.isfunction(member) or inspect.isclass(member):
                        yield f"{obj.__name__}.{sub}", member


PUBLIC = dict(public_names())


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_every_public_name_has_a_docstring(name):
    obj = PUBLIC[name]
    doc = inspect.getdoc(obj) or ""
    summary = doc.strip().splitlines()[0] if doc.strip() else ""
    assert summary, f"{name} has no docstring"
    if inspect.isclass(obj) and obj.__doc__ is None:
        pytest.fail(f"{name} only inherits its docstring")


def _readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "the README has no python example"
    return blocks[0]


def test_readme_example_runs_in_float32():
    namespace = {}
    with jax.enable_x64(False):
        exec(compile(_readme_example(), "README.md", "exec"), namespace)
    assert namespace["theta"].dtype == jax.numpy.float32
    assert namespace["theta"].shape == (1000, 100)
    # The example prints it; the planted problem is recovered in float32 too.
    assert float(namespace["diagnostics"].relative_error[-1]) < 1e-3


def _modules_with_examples():
    out = []
    for info in pkgutil.walk_packages(lrs.__path__, "lrs."):
        if info.name.startswith("lrs.nn"):
            try:
                module = importlib.import_module(info.name)
            except ImportError:  # optional dependency not installed
                continue
        else:
            module = importlib.import_module(info.name)
        tests = [t for t in doctest.DocTestFinder().find(module) if t.examples]
        if tests:
            out.append(info.name)
    return out


@pytest.mark.usefixtures("cheap_compiles")
@pytest.mark.parametrize("module_name", _modules_with_examples())
def test_docstring_examples_run_in_float32(module_name):
    module = importlib.import_module(module_name)
    with jax.enable_x64(False):
        failures, tried = doctest.testmod(
            module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
        )
    assert tried > 0 and failures == 0, f"{failures} of {tried} examples failed"


def test_there_are_docstring_examples():
    assert len(_modules_with_examples()) >= 2


@pytest.mark.skipif(shutil.which("mkdocs") is None, reason="needs the docs extra")
def test_site_builds_strictly_with_every_public_name(tmp_path):
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    build = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    sys.path.insert(0, str(ROOT / "docs"))
    try:
        hooks = importlib.import_module("hooks")
    finally:
        sys.path.pop(0)
    html = "".join(p.read_text() for p in (tmp_path / "reference").rglob("*.html"))
    for package in PACKAGES:
        for name in importlib.import_module(package).__all__:
            anchor = hooks.reference_path(package, name)
            assert f'id="{anchor}"' in html, f"{package}.{name} missing ({anchor})"


def test_the_audit_table_is_the_one_its_record_gives():
    """docs/privacy.md's audit table is generated from the JSON the audit
    wrote (``lrs.studies.privacy_audit.summary``), not copied by hand."""
    import json

    from lrs.studies import privacy_audit as experiment

    record = json.loads((ROOT / "docs/bench/audit/privacy_audit.json").read_text())
    table = experiment.summary(record).split("\n\n")[0]
    assert table in (ROOT / "docs/privacy.md").read_text()
