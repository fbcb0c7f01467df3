"""The persistent compilation cache: where it lives, how to opt out."""

import jax

from lrs import _xla


def test_default_directory_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("LRS_COMPILATION_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert _xla.default_cache_dir() == str(tmp_path / "lrs" / "jax")
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
