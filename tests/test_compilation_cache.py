"""The persistent compilation cache: where it lives, how to opt out, and that
it is bounded (so that JAX locks it)."""

import os
import subprocess
import sys

import jax

from lrs import _xla


def test_default_directory_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("LRS_COMPILATION_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert _xla.default_cache_dir() == str(tmp_path / "lrs" / "jax-cache")
    monkeypatch.setenv("LRS_COMPILATION_CACHE_DIR", str(tmp_path / "mine"))
    assert _xla.default_cache_dir() == str(tmp_path / "mine")


def test_opt_out_leaves_jax_untouched(monkeypatch, tmp_path):
    before = jax.config.jax_compilation_cache_dir
    monkeypatch.setenv("LRS_NO_COMPILATION_CACHE", "1")
    assert _xla.use_compilation_cache(str(tmp_path / "x")) is None
    assert jax.config.jax_compilation_cache_dir == before
    assert not (tmp_path / "x").exists()


def test_a_cache_the_user_configured_wins(monkeypatch, tmp_path):
    monkeypatch.delenv("LRS_NO_COMPILATION_CACHE", raising=False)
    before = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "u"))
    try:
        assert _xla.use_compilation_cache(str(tmp_path / "x")) is None
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "u")
    finally:
        jax.config.update("jax_compilation_cache_dir", before)
    assert not (tmp_path / "x").exists()


def test_the_cache_is_bounded_so_that_jax_locks_it(tmp_path):
    """Checked in a fresh process: the suite itself runs without the cache."""
    env = {k: v for k, v in os.environ.items() if k != "LRS_NO_COMPILATION_CACHE"}
    code = (
        "import jax; from lrs import _xla; "
        f"print(_xla.use_compilation_cache({str(tmp_path)!r})); "
        "print(jax.config.jax_compilation_cache_max_size)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    path, size = out.stdout.split()
    assert path == str(tmp_path) and int(size) == _xla.CACHE_MAX_BYTES
