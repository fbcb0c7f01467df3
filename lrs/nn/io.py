"""Per-user parameters to and from ``.npz`` (no pickles), with a format check.

The file holds each leaf of the ``users`` pytree under its key path, plus
``__format__``, ``__version__`` and ``__adapter__`` (the adapter's settings as
JSON, the model's sizes included). :func:`load_users` refuses a file whose
format, version, adapter or leaf shapes/dtypes differ from what the given
adapter expects, with a ValueError that says what differs.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import numpy as np

__all__ = ["FORMAT", "VERSION", "adapter_spec", "load_users", "save_users"]

FORMAT = "lrs.nn.users"
VERSION = 1


def adapter_spec(adapter) -> str:
    """The adapter's name and settings as canonical JSON."""
    fields = dataclasses.asdict(adapter)
    fields["layers"] = list(fields["layers"])
    return json.dumps({"name": adapter.name, **fields}, sort_keys=True)


def _flatten(users) -> dict[str, np.ndarray]:
    leaves = jax.tree_util.tree_flatten_with_path(users)[0]
    return {"users" + jax.tree_util.keystr(p): np.asarray(x) for p, x in leaves}


def save_users(path, adapter, users) -> Path:
    """Writes ``users`` (the adapter's per-user pytree) to ``path`` (.npz)."""
    path = Path(path)
    arrays = _flatten(users)
    np.savez(
        path,
        __format__=np.array(FORMAT),
        __version__=np.array(VERSION),
        __adapter__=np.array(adapter_spec(adapter)),
        **arrays,
    )
    return path if path.suffix == ".npz" else path.with_name(path.name + ".npz")


def _meta(files, name, path):
    if name not in files:
        raise ValueError(f"{path} is not an lrs.nn users file: no {name} entry")
    return files[name][()]


def load_users(path, adapter, num_users: int):
    """Reads per-user parameters for ``num_users`` users of ``adapter`` from ``path``.

    Raises:
      ValueError: the file is not an ``lrs.nn`` users file, has another format
        version, was written for another adapter or settings, or a leaf is
        missing or has another shape or dtype than expected.
    """
    expected = jax.eval_shape(lambda: adapter.init_users(jax.random.key(0), num_users))
    with np.load(path, allow_pickle=False) as files:
        if str(_meta(files, "__format__", path)) != FORMAT:
            raise ValueError(f"{path}: format must be {FORMAT!r}")
        version = int(_meta(files, "__version__", path))
        if version != VERSION:
            raise ValueError(
                f"{path}: format version {version} is not supported (expected "
                f"{VERSION})"
            )
        spec = str(_meta(files, "__adapter__", path))
        if spec != adapter_spec(adapter):
            raise ValueError(
                f"{path} was saved for adapter {spec}, not {adapter_spec(adapter)}"
            )
        leaves, treedef = jax.tree_util.tree_flatten_with_path(expected)
        out = []
        for key_path, want in leaves:
            name = "users" + jax.tree_util.keystr(key_path)
            if name not in files:
                raise ValueError(f"{path}: missing array {name!r}")
            got = files[name]
            if got.shape != want.shape or got.dtype != want.dtype:
                raise ValueError(
                    f"{path}: {name} has shape {got.shape} and dtype {got.dtype}; "
                    f"expected {want.shape} and {want.dtype} ({num_users} users)"
                )
            out.append(got)
    return jax.tree_util.tree_unflatten(treedef, out)
