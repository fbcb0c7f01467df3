"""The per-user store of a personalized NNX model: grow, export, save, load.

* :func:`add_users` appends rows for new users to every per-user table;
* :func:`export_user` / :func:`import_user` move one user's rows (``V``,
  ``indices``, ``values`` of every LRS layer; ``A``, ``B`` of LoRA layers;
  ``D`` of per-user heads; ``E`` of PLoRA layers and user tokens;
  ``prompt`` of soft prompts: each adapter's ``tables``)
  as ``{"<layer path>/<name>": array}``;
* :func:`save` / :func:`load` write and read the whole model state (base,
  shared factors, tables) with Orbax (``orbax.checkpoint``, tensorstore
  arrays: nothing is pickled) next to ``lrs_nnx.json``, which records the
  format version, the number of users, the adapters and every array's shape
  and dtype. ``load`` checks that record against the model it restores into
  before reading any array, and raises ValueError naming the path and what
  was expected.

Growing copies each table once (``jnp.concatenate``); add users in chunks.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lrs.nn.nnx_personalize import adapter_layers
from lrs.validation import check_integer

__all__ = ["FORMAT_VERSION", "add_users", "export_user", "import_user", "load", "save"]

FORMAT = "lrs.nn.nnx-adapters"
FORMAT_VERSION = 1
_META = "lrs_nnx.json"


def num_users(model) -> int:
    """The common number of rows of the model's per-user tables."""
    counts = {m.num_users for m in adapter_layers(model).values()}
    if len(counts) != 1:
        raise ValueError(f"model must have personalized layers with one user count; "
                         f"got {sorted(counts)}")  # fmt: skip
    return counts.pop()


def add_users(model, count: int, *, rngs=None) -> range:
    """Appends ``count`` users to every table; returns their ids.

    New LRS, head, PLoRA and user-token rows are zero (the base model for
    those users, but for the user token's extra position); new LoRA rows
    draw ``A`` and new soft prompts their tokens' embeddings from ``rngs``
    (default ``nnx.Rngs(current number of users)``).
    """
    check_integer("count", count, 1)
    start = num_users(model)
    rngs = nnx.Rngs(start) if rngs is None else rngs
    for layer in adapter_layers(model).values():
        for name, rows in layer.new_rows(count, rngs).items():
            table = getattr(layer, name)
            table.set_value(jnp.concatenate([table[...], rows.astype(table.dtype)]))
    return range(start, start + count)


def export_user(model, user_id: int) -> dict[str, np.ndarray]:
    """One user's rows of every table: ``{"<layer path>/<name>": np.ndarray}``."""
    n = num_users(model)
    if isinstance(user_id, bool) or not 0 <= int(user_id) < n:
        raise ValueError(f"user_id must lie in [0, {n}); got {user_id!r}")
    return {
        f"{path}/{name}": np.asarray(table[int(user_id)])
        for path, layer in adapter_layers(model).items()
        for name, table in layer.user_tables().items()
    }


def import_user(model, user_id: int, rows) -> None:
    """Sets one user's rows from :func:`export_user`'s dict (same keys, shapes)."""
    n = num_users(model)
    if isinstance(user_id, bool) or not 0 <= int(user_id) < n:
        raise ValueError(f"user_id must lie in [0, {n}); got {user_id!r}")
    tables = {
        f"{path}/{name}": table
        for path, layer in adapter_layers(model).items()
        for name, table in layer.user_tables().items()
    }
    if set(rows) != set(tables):
        raise ValueError(
            f"rows must have the keys {sorted(tables)}; got {sorted(rows)}"
        )
    for key, table in tables.items():
        row = np.asarray(rows[key])
        if row.shape != table.shape[1:]:
            raise ValueError(
                f"rows[{key!r}] must have shape {table.shape[1:]}; got {row.shape}"
            )
        table[int(user_id)] = jnp.asarray(row, table.dtype)


def _flat(model) -> dict:
    return {
        "/".join(str(p) for p in path): v
        for path, v in nnx.to_flat_state(nnx.state(model))
    }


def _record(model) -> dict:
    layers = {
        path: dict(method=layer.method, **layer.settings())
        for path, layer in adapter_layers(model).items()
    }
    arrays = {
        key: dict(shape=list(v.shape), dtype=str(v.dtype), type=type(v).__name__)
        for key, v in _flat(model).items()
    }
    return dict(format=FORMAT, version=FORMAT_VERSION, num_users=num_users(model),
                layers=layers, arrays=arrays)  # fmt: skip


def save(model, path) -> Path:
    """Writes the whole model state to the new directory ``path``."""
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    if path.exists():
        raise ValueError(f"path {str(path)!r} exists; save writes a new directory")
    record = _record(model)
    arrays = {key: v[...] for key, v in _flat(model).items()}
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path / "state", arrays)
    checkpointer.wait_until_finished()
    (path / _META).write_text(json.dumps(record, indent=1, sort_keys=True))
    return path


def _read_record(path: Path) -> dict:
    try:
        record = json.loads((path / _META).read_text())
    except (OSError, ValueError) as err:
        raise ValueError(
            f"path {str(path)!r} is not an lrs NNX checkpoint: cannot read "
            f"{_META} ({err})"
        ) from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise ValueError(f"path {str(path)!r}: {_META} is not a {FORMAT} record")
    if record.get("version") != FORMAT_VERSION:
        raise ValueError(
            f"path {str(path)!r} has format version {record.get('version')!r}; "
            f"this lrs reads version {FORMAT_VERSION}"
        )
    return record


def load(model, path) -> None:
    """Restores ``path`` into ``model`` (same structure and shapes), in place.

    Build ``model`` as it was saved (base model, ``personalize`` with the same
    arguments, ``add_users`` to the saved number of users); the error lists
    what differs.
    """
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    record = _read_record(path)
    expected = _record(model)
    if record["num_users"] != expected["num_users"]:
        raise ValueError(
            f"path {str(path)!r} holds {record['num_users']} users; the model has "
            f"{expected['num_users']} (grow it with lrs.nn.add_users first)"
        )
    for part in ("layers", "arrays"):
        if record[part] != expected[part]:
            saved, want = record[part], expected[part]
            diff = sorted(
                k for k in set(saved) | set(want) if saved.get(k) != want.get(k)
            )
            raise ValueError(
                f"path {str(path)!r} does not fit the model: {part} differ at "
                f"{diff[:5]}; expected {[want.get(k) for k in diff[:5]]}, "
                f"found {[saved.get(k) for k in diff[:5]]}"
            )
    flat = _flat(model)
    target = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in flat.items()}
    try:
        arrays = ocp.StandardCheckpointer().restore(path / "state", target)
    except Exception as err:  # orbax / tensorstore errors of damaged files
        raise ValueError(
            f"path {str(path)!r}: cannot read the arrays ({err})"
        ) from None
    for key, variable in flat.items():
        variable.set_value(arrays[key])
