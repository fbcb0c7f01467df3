"""Configuration of AMHT-LRS."""

from __future__ import annotations

import dataclasses

import numpy as np

from lrs.validation import check_integer, check_real

_U_SOLVERS = ("cg", "dense")
_EIGENSOLVERS = ("auto", "dense", "subspace")


@dataclasses.dataclass(frozen=True)
class AMHTConfig:
    """Settings of AMHT-LRS; frozen and hashable so ``jit`` treats it as static.

    Attributes:
      rank: r, columns of the shared factor U (``1 <= rank < d``).
      sparsity: k, nonzeros of each user's sparse part (``0 <= sparsity < d``).
      num_iters: maximum outer iterations (shared step + per-user step).
      tol: stop when the subspace distance between successive U falls below
        ``tol``; ``None`` picks 1e-5 in float32 and 1e-10 in float64; 0 never stops.
      inner_steps: subspace-pursuit steps per user per iteration.
      init: ``'moments'`` (top eigenvectors of ``sum y^2 x x^T``) or
        ``'random'``. A starting U of your own is an argument of the fits,
        ``fit(..., U0=U)``, not a config field (the config stays hashable).
      fresh_samples: split each user's samples into this many disjoint batches
        and use batch ``h mod fresh_samples`` for half-step ``h`` (as the theory
        assumes); 0 or 1 uses all samples every time.
      ridge: l2 penalty added to every least-squares solve: ``ridge ||v_i||^2``
        (and ``ridge ||b_i||^2``) in each user's solve, ``ridge ||U||_F^2`` in
        the shared one. Default 0: exact recovery of noiseless data. On real,
        noisy data a positive value helps (ratings: 1-20, chosen by
        :func:`lrs.selection.select`).
      sparse_ridge: extra l2 shrinkage of the sparse values,
        ``sparse_ridge ||b_i||^2`` in each user's solve (the support is still
        chosen by hard thresholding; its values are shrunk towards 0). Default
        0 (exact recovery); unshrunk idiosyncrasies overfit noisy ratings
        (docs/results.md), where values of 5-50 help.
      sparse_significance: per-user sparsity. Each user keeps a sparse value
        only when it is significant, ``|b_ij| >= sparse_significance x se_ij``
        (its t-statistic: ``se_ij`` is the standard error of ``b_ij`` in the
        user's least squares on ``[X_i U, X_i[:, S_i]]``, from the user's
        residual variance ``||res_i||^2 / (m_i - r - k)``), and the user's
        ``v_i`` and remaining values are refitted without the others. A user
        with few samples (or ``m_i <= r + k``: no variance estimate) then keeps
        fewer than ``k`` idiosyncrasies, down to none, while one with many
        keeps those its data supports. Default 0: every user keeps ``k``
        (exact recovery of noiseless data is unaffected by the rule either
        way: its residual variance is 0). Values near 2 (a two-sided 95% test
        per value) suit noisy data such as ratings.
      sparse_features: the features a user's sparse part may use, a tuple of
        feature indices (e.g. the genre columns of rating data), or None for
        all ``d``; ``sparsity`` must not exceed its length.
      stall_iters: stop, reported as ``'stalled'``, when the U change has not
        reached a new minimum for this many iterations (it hovers above
        ``tol``: e.g. float rounding or users switching supports back and
        forth); 0 never stops so.
      u_solver: ``'cg'`` (matrix-free preconditioned conjugate gradients, one
        data pass per product) or ``'dense'`` (forms the (d r)^2 normal matrix;
        small problems and testing only).
      cg_iters: maximum CG iterations per shared step.
      cg_tol: floor of the relative residual at which CG stops (``None``:
        1e-5 / 1e-10). Each shared step stops earlier, at
        ``min(0.3 sqrt(median relative residual of the users), 0.1 x the
        previous U change)`` when that is larger: loose while U moves a lot,
        exact enough near the end that a small U change means a fixed point of
        the exact step (not a CG step that barely moved); and CG always takes
        at least one iteration.
      rescue_fraction: fraction of all users, those with the largest relative
        residual, that get the stronger solver (when they stand out: largest
        relative residual above 10x the median).
      l1_steps: FISTA steps of the l1 candidate in that solver (0 disables it).
      user_chunk_size: users processed at once; ``None`` picks the number whose
        data fills ``chunk_bytes``.
      chunk_bytes: memory budget of one chunk of X when ``user_chunk_size`` is None.
      init_eigensolver: ``'dense'`` (top singular vectors of the d x d moment
        matrix), ``'subspace'`` iteration (matrix-free), or ``'auto'`` (dense
        for d <= 4096).
      init_iters: subspace-iteration rounds of the matrix-free initialization.
    """

    rank: int
    sparsity: int
    num_iters: int = 30
    tol: float | None = None
    inner_steps: int = 1
    init: str = "moments"
    fresh_samples: int = 0
    ridge: float = 0.0
    sparse_ridge: float = 0.0
    sparse_significance: float = 0.0
    sparse_features: tuple[int, ...] | None = None
    stall_iters: int = 10
    u_solver: str = "cg"
    cg_iters: int = 25
    cg_tol: float | None = None
    rescue_fraction: float = 0.05
    l1_steps: int = 50
    user_chunk_size: int | None = None
    chunk_bytes: int = 256 * 2**20
    init_eigensolver: str = "auto"
    init_iters: int = 40

    def __post_init__(self):
        for name, low in (
            ("rank", 1),
            ("sparsity", 0),
            ("num_iters", 0),
            ("inner_steps", 0),
            ("fresh_samples", 0),
            ("cg_iters", 1),
            ("l1_steps", 0),
            ("init_iters", 1),
            ("stall_iters", 0),
            ("chunk_bytes", 1),
        ):
            check_integer(name, getattr(self, name), low)
        for name in ("ridge", "sparse_ridge", "sparse_significance"):
            check_real(name, getattr(self, name), "a finite number >= 0", low=0)
        self._check_sparse_features()
        if self.user_chunk_size is not None:
            check_integer("user_chunk_size", self.user_chunk_size, 1)
        for name in ("tol", "cg_tol"):
            if getattr(self, name) is not None:
                expected = "a finite number >= 0 or None"
                check_real(name, getattr(self, name), expected, low=0)
        check_real(
            "rescue_fraction", self.rescue_fraction, "a number in [0, 1]", low=0, high=1
        )
        if self.u_solver not in _U_SOLVERS:
            raise ValueError(
                f"u_solver must be one of {_U_SOLVERS}; got {self.u_solver!r}"
            )
        if self.init_eigensolver not in _EIGENSOLVERS:
            raise ValueError(
                f"init_eigensolver must be one of {_EIGENSOLVERS}; "
                f"got {self.init_eigensolver!r}"
            )
        if not isinstance(self.init, str):
            raise ValueError(
                "init must be 'moments' or 'random'; pass a starting U as "
                f"fit(..., U0=U) instead of an array of shape {np.shape(self.init)}"
            )
        if self.init not in ("moments", "random"):
            raise ValueError(f"init must be 'moments' or 'random'; got {self.init!r}")

    def _check_sparse_features(self) -> None:
        features = self.sparse_features
        if features is None:
            return
        if not isinstance(features, tuple) or not features:
            raise ValueError(
                "sparse_features must be None or a non-empty tuple of feature "
                f"indices; got {features!r}"
            )
        for j in features:
            if isinstance(j, bool) or not isinstance(j, int | np.integer) or j < 0:
                raise ValueError(
                    f"sparse_features must hold integers >= 0; got {j!r} in "
                    f"{features!r}"
                )
        if len(set(features)) != len(features):
            raise ValueError(f"sparse_features has repeated indices: {features!r}")
        # plain sorted ints: equal configs hash equally
        object.__setattr__(self, "sparse_features", tuple(sorted(map(int, features))))
        if self.sparsity > len(features):
            raise ValueError(
                f"sparsity must be <= len(sparse_features) = {len(features)}; "
                f"got {self.sparsity}"
            )

    def check_features(self, d: int) -> None:
        """Raises ValueError if ``sparse_features`` names a feature ``>= d``."""
        if self.sparse_features is not None and max(self.sparse_features) >= d:
            raise ValueError(
                f"sparse_features must be indices below d = {d}; got "
                f"{max(self.sparse_features)}"
            )

    def tolerances(self, dtype) -> tuple[float, float]:
        """``(tol, cg_tol)`` with the dtype-dependent defaults filled in."""
        small = np.dtype(dtype) == np.float64
        tol = self.tol if self.tol is not None else (1e-10 if small else 1e-5)
        cg_tol = self.cg_tol if self.cg_tol is not None else (1e-10 if small else 1e-5)
        return tol, cg_tol

    def chunk_size(self, m: int, d: int, itemsize: int) -> int:
        """Users per chunk for data of ``m`` samples of ``d`` features."""
        if self.user_chunk_size is not None:
            return self.user_chunk_size
        return max(1, self.chunk_bytes // max(1, m * d * itemsize))
