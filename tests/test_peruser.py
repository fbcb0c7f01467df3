"""Specification of lrs.peruser: the per-user sparse least-squares step."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lrs
from lrs import peruser

pytestmark = pytest.mark.usefixtures("cheap_compiles")


def _user(seed, m=12, d=9, r=2, dtype=np.float64):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((m, d)).astype(dtype)
    U = np.linalg.qr(rng.standard_normal((d, r)))[0].astype(dtype)
    y = rng.standard_normal(m).astype(dtype)
    return X, U, y


def _numpy_lstsq(A, X, y, support, ridge=0.0):
    Z = np.concatenate([A, X[:, support]], axis=1)
    if ridge:
        coef = np.linalg.solve(Z.T @ Z + ridge * np.eye(Z.shape[1]), Z.T @ y)
    else:
        coef = np.linalg.lstsq(Z, y, rcond=None)[0]
    res = y - Z @ coef
    return coef[: A.shape[1]], coef[A.shape[1] :], res @ res


def _recomputed_sq_residual(A, X, y, fit):
    res = y - A @ np.asarray(fit.v) - X[:, np.asarray(fit.support)] @ np.asarray(fit.b)
    return res @ res


# -------------------------------------------------------------------- lstsq_on_support


@pytest.mark.parametrize("support", [[], [4], [7, 2, 5], [0, 8, 3, 1]])
@pytest.mark.parametrize("ridge", [0.0, 0.5])
def test_lstsq_on_support_matches_numpy(support, ridge):
    X, U, y = _user(0)
    A = X @ U
    support = np.array(support, np.int32)
    fit = peruser.lstsq_on_support(A, X, y, jnp.asarray(support), ridge)
    v, b, sq = _numpy_lstsq(A, X, y, support, ridge)
    np.testing.assert_allclose(np.asarray(fit.v), v, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(np.asarray(fit.b), b, rtol=1e-9, atol=1e-10)
    np.testing.assert_array_equal(np.asarray(fit.support), support)
    assert float(fit.sq_residual) == pytest.approx(sq, rel=1e-9, abs=1e-12)
    assert float(fit.sq_residual) == pytest.approx(
        _recomputed_sq_residual(A, X, y, fit), rel=1e-9, abs=1e-12
    )


def test_sparse_ridge_shrinks_only_the_sparse_values():
    X, U, y = _user(2)
    A = X @ U
    support = np.array([7, 2], np.int32)
    fit = peruser.lstsq_on_support(A, X, y, jnp.asarray(support), 0.5, sparse_ridge=3.0)
    Z = np.concatenate([A, X[:, support]], axis=1)
    penalty = np.diag([0.5, 0.5, 3.5, 3.5])
    coef = np.linalg.solve(Z.T @ Z + penalty, Z.T @ y)
    np.testing.assert_allclose(np.asarray(fit.v), coef[:2], rtol=1e-9)
    np.testing.assert_allclose(np.asarray(fit.b), coef[2:], rtol=1e-9)
    assert float(fit.sq_residual) == pytest.approx(
        _recomputed_sq_residual(A, X, y, fit), rel=1e-9
    )


def test_supports_stay_in_the_allowed_features():
    """Cold start, pursuit, l1 candidate and the rescue only use the allowed
    features, even when the signal lies elsewhere."""
    rng = np.random.default_rng(3)
    n, m, d, r = 6, 20, 9, 2
    X = rng.standard_normal((n, m, d))
    U = np.linalg.qr(rng.standard_normal((d, r)))[0]
    y = 0.5 * X[:, :, 0] + 2 * X[:, :, 1] - 2 * X[:, :, 6]
    y = y + 0.1 * rng.standard_normal((n, m))
    allowed = tuple(j in (1, 4, 6, 8) for j in range(d))
    A = X @ U
    cold = jax.vmap(lambda A, X, y: peruser.cold_support(A, X, y, 2, allowed=allowed))
    support = np.asarray(cold(A, X, y))
    assert set(support.ravel()) <= {1, 4, 6, 8}
    fits = peruser.pursue(A, X, y, jnp.asarray(support), 4, allowed=allowed)
    assert set(np.asarray(fits.support).ravel()) == {1, 6}  # the allowed signal
    l1 = jax.vmap(lambda A, X, y: peruser.l1_support(A, X, y, 2, 30, allowed=allowed))
    assert set(np.asarray(l1(A, X, y)).ravel()) <= {1, 4, 6, 8}
    best = peruser.rescue(
        X, y, U, fits, steps=2, l1_steps=20, allowed=allowed, sparse_ridge=1.0
    )
    assert set(np.asarray(best.support).ravel()) <= {1, 4, 6, 8}
    # as many allowed features as k: the support is all of them, no pursuit
    two = tuple(j in (4, 8) for j in range(d))
    start = jnp.tile(jnp.asarray([4, 8], jnp.int32), (n, 1))
    fits = peruser.pursue(A, X, y, start, 3, allowed=two)
    assert set(np.asarray(fits.support).ravel()) == {4, 8}


def test_lstsq_on_support_float32():
    X, U, y = _user(1, dtype=np.float32)
    A = X @ U
    support = np.array([1, 6], np.int32)
    fit = peruser.lstsq_on_support(A, X, y, jnp.asarray(support))
    assert fit.v.dtype == np.float32 and fit.b.dtype == np.float32
    v, b, _ = _numpy_lstsq(
        A.astype(np.float64), X.astype(np.float64), y.astype(np.float64), support
    )
    np.testing.assert_allclose(np.asarray(fit.v), v, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(np.asarray(fit.b), b, rtol=1e-3, atol=1e-4)


# -------------------------------------------------------------------- pursuit_step


@pytest.mark.parametrize("seed", range(2))
def test_pursuit_step_never_increases_the_residual(seed):
    """From random supports of noisy users, each step keeps or lowers the residual."""
    rng = np.random.default_rng(seed)
    n, m, d, r, k = 16, 14, 10, 2, 3
    X = rng.standard_normal((n, m, d))
    U = np.linalg.qr(rng.standard_normal((d, r)))[0]
    A = X @ U
    y = rng.standard_normal((n, m))
    support = np.stack([rng.choice(d, k, replace=False) for _ in range(n)])
    lstsq = jax.vmap(peruser.lstsq_on_support, (0, 0, 0, 0))
    step = jax.jit(jax.vmap(peruser.pursuit_step))
    fit = lstsq(A, X, y, jnp.asarray(support, jnp.int32))
    for _ in range(3):
        new, moved = step(A, X, y, fit)
        new_sq, old_sq = np.asarray(new.sq_residual), np.asarray(fit.sq_residual)
        assert np.all(new_sq <= old_sq)
        # a user that moved is strictly better and has a different support
        moved = np.asarray(moved)
        assert np.all(new_sq[moved] < old_sq[moved])
        for i in range(n):
            s_new = np.asarray(new.support[i])
            assert len(set(s_new.tolist())) == k
            if not moved[i]:
                for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(fit)):
                    np.testing.assert_array_equal(np.asarray(a[i]), np.asarray(b[i]))
            # the stored residual is the residual of the returned (v, S, b)
            one = jax.tree.map(lambda a, i=i: a[i], new)
            assert float(one.sq_residual) == pytest.approx(
                _recomputed_sq_residual(A[i], X[i], y[i], one), rel=1e-8, abs=1e-12
            )
        fit = new


def test_pursuit_step_does_not_move_at_the_exact_solution(planted):
    data, truth = planted
    X, y, U = np.asarray(data.X[0]), np.asarray(data.y[0]), np.asarray(truth.U)
    fit = peruser.lstsq_on_support(X @ U, X, y, truth.B.indices[0])
    new, moved = jax.jit(peruser.pursuit_step)(X @ U, X, y, fit)
    assert not bool(moved)
    np.testing.assert_array_equal(np.asarray(new.support), np.asarray(fit.support))


def test_pursue_is_lstsq_when_no_steps_or_no_sparsity():
    rng = np.random.default_rng(5)
    X = rng.standard_normal((3, 10, 6))
    y = rng.standard_normal((3, 10))
    A = X @ np.linalg.qr(rng.standard_normal((6, 2)))[0]
    lstsq = jax.vmap(peruser.lstsq_on_support)
    for support in (np.zeros((3, 0), np.int32), np.array([[1], [2], [3]], np.int32)):
        got = peruser.pursue(A, X, y, jnp.asarray(support), 0)
        want = lstsq(A, X, y, jnp.asarray(support))
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12)
    got = peruser.pursue(A, X, y, jnp.zeros((3, 0), jnp.int32), 5)
    assert got.b.shape == (3, 0)


# ------------------------------------------------------------ planted recovery, true U


@pytest.fixture(scope="module")
def planted():
    """Noiseless float64 users; m = 30 < d = 40, so b_i needs the sparsity."""
    return lrs.synthetic.make_problem(
        jax.random.key(11), d=40, t=200, m=30, r=3, k=3, dtype="float64"
    )


@pytest.fixture(scope="module")
def planted_fits(planted):
    data, truth = planted
    U = truth.U

    @jax.jit
    def solve(X, y):
        A = X @ U
        cold = jax.vmap(peruser.cold_support, (0, 0, 0, None))(A, X, y, 3)
        fits = jax.vmap(lambda X, y, s: peruser.solve_user(X, y, U, s, steps=4))(
            X, y, cold
        )
        rescued = peruser.rescue(X, y, U, fits, steps=4, l1_steps=100)
        l1 = jax.vmap(peruser.l1_support, (0, 0, 0, None, None))(A, X, y, 3, 100)
        return cold, fits, rescued, l1

    return solve(data.X, data.y)


def _supports_correct(support, truth):
    got = np.sort(np.asarray(support), axis=1)
    return np.all(got == np.sort(np.asarray(truth.B.indices), axis=1), axis=1)


def _dense(support, values, d):
    return np.asarray(
        lrs.SparseRows(jnp.asarray(support), jnp.asarray(values), d).dense()
    )


def test_cold_start_pursuit_and_rescue_recover_the_planted_users(planted, planted_fits):
    data, truth = planted
    _, fits, rescued, _ = planted_fits
    for f in (fits, rescued):
        ok = _supports_correct(f.support, truth)
        assert ok.mean() >= 0.99
        # exact weights for every user with the right support
        np.testing.assert_allclose(
            np.asarray(f.v)[ok], np.asarray(truth.V)[ok], rtol=1e-8, atol=1e-9
        )
        np.testing.assert_allclose(
            _dense(f.support, f.b, 40)[ok],
            np.asarray(truth.B.dense())[ok],
            rtol=1e-8,
            atol=1e-9,
        )
        assert np.all(np.asarray(f.sq_residual)[ok] < 1e-16 * np.sum(data.y**2, 1)[ok])


def test_rescue_never_returns_a_worse_fit(planted_fits):
    _, fits, rescued, _ = planted_fits
    assert np.all(np.asarray(rescued.sq_residual) <= np.asarray(fits.sq_residual))


def test_rescue_with_no_sparsity_returns_the_fits():
    rng = np.random.default_rng(6)
    X, y = rng.standard_normal((2, 8, 5)), rng.standard_normal((2, 8))
    U = np.linalg.qr(rng.standard_normal((5, 2)))[0]
    fits = jax.vmap(peruser.lstsq_on_support, (0, 0, 0, None))(
        X @ U, X, y, jnp.zeros((0,), jnp.int32)
    )
    out = peruser.rescue(X, y, U, fits, steps=2, l1_steps=10)
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(fits)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_l1_support_finds_the_planted_support(planted, planted_fits):
    _, truth = planted
    l1 = np.asarray(planted_fits[3])
    assert l1.shape == (200, 3)
    assert all(len(set(row.tolist())) == 3 for row in l1)
    assert _supports_correct(l1, truth).mean() >= 0.95


def test_cold_support_returns_k_distinct_indices(planted_fits):
    cold = np.asarray(planted_fits[0])
    assert cold.shape == (200, 3) and cold.dtype == np.int32
    assert all(len(set(row.tolist())) == 3 for row in cold)


def test_numpy_reference_on_the_true_support(planted):
    """Reference: on the true support, numpy lstsq = lstsq_on_support = truth."""
    data, truth = planted
    U = np.asarray(truth.U)
    for i in range(0, 200, 25):
        X, y = np.asarray(data.X[i]), np.asarray(data.y[i])
        S = np.asarray(truth.B.indices[i])
        v, b, sq = _numpy_lstsq(X @ U, X, y, S)
        fit = peruser.lstsq_on_support(X @ U, X, y, jnp.asarray(S))
        np.testing.assert_allclose(np.asarray(fit.v), v, rtol=1e-9, atol=1e-10)
        np.testing.assert_allclose(np.asarray(fit.b), b, rtol=1e-9, atol=1e-10)
        np.testing.assert_allclose(v, np.asarray(truth.V[i]), rtol=1e-9, atol=1e-10)
        np.testing.assert_allclose(b, np.asarray(truth.B.values[i]), atol=1e-10)
        assert sq < 1e-18 * (y @ y)


# ------------------------------------- one chain of batched LAPACK calls at a time


def _hlo_computations(text):
    """``{computation: {instruction: (text after '=', referenced %names)}}``."""
    comps, cur = {}, None
    for line in text.splitlines():
        head = re.match(r"^(?:ENTRY )?%(\S+) \(.*\{$", line)
        if head:
            cur = comps.setdefault(head.group(1), {})
        elif line.strip() == "}":
            cur = None
        elif cur is not None:
            inst = re.match(r"^\s*(?:ROOT )?%(\S+) = (.*)$", line)
            if inst:
                rhs = inst.group(2)
                cur[inst.group(1)] = (rhs, re.findall(r"%([\w.\-]+)", rhs))
    return comps


def _unordered_lapack_pairs(text):
    """Pairs of instructions of one computation that each run a LAPACK kernel
    (a ``lapack_*`` custom call, or a loop / conditional / call whose body
    does) with no data or control dependency between them, so that XLA:CPU
    may run them at the same time."""
    comps = _hlo_computations(text)
    memo = {}

    def runs_lapack(rhs, refs, inside=None):
        return 'custom_call_target="lapack_' in rhs or any(
            r in comps and r != inside and calls_lapack(r) for r in refs
        )

    def calls_lapack(comp):
        if comp not in memo:
            memo[comp] = False  # no recursion in HLO; guards the walk anyway
            memo[comp] = any(runs_lapack(*v, comp) for v in comps[comp].values())
        return memo[comp]

    pairs = []
    for comp, insts in comps.items():
        operands = {
            n: [r for r in refs if r in insts] for n, (_, refs) in insts.items()
        }
        heavy = [n for n, v in insts.items() if runs_lapack(*v)]
        before = {}
        for n in heavy:
            seen, stack = set(), list(operands[n])
            while stack:
                a = stack.pop()
                if a not in seen:
                    seen.add(a)
                    stack.extend(operands[a])
            before[n] = seen
        pairs += [
            (comp, a, b)
            for i, a in enumerate(heavy)
            for b in heavy[i + 1 :]
            if a not in before[b] and b not in before[a]
        ]
    return pairs


def _compiled_text(fn, *args):
    return jax.jit(fn).lower(*args).compile().as_text()


def test_unordered_lapack_pairs_sees_independent_factorizations():
    """The check below is not vacuous: two independent batched Cholesky
    factorizations in one program are found; chained ones are not."""
    G = jnp.broadcast_to(jnp.eye(4), (8, 4, 4))

    def independent(G, H):
        return jnp.linalg.cholesky(G), jnp.linalg.cholesky(H)

    def chained(G, H):
        L = jnp.linalg.cholesky(G)
        return jnp.linalg.cholesky(H + 0 * L)

    assert _unordered_lapack_pairs(_compiled_text(independent, G, G))
    assert not _unordered_lapack_pairs(_compiled_text(chained, G, G))


def _rescue_inputs(n=16, m=12, d=20, r=2, k=3):
    X, y = jnp.zeros((n, m, d), jnp.float32), jnp.zeros((n, m), jnp.float32)
    fits = peruser.UserFit(
        jnp.zeros((n, r)), jnp.zeros((n, k), jnp.int32), jnp.zeros((n, k)), jnp.zeros(n)
    )
    return X, y, jnp.zeros((d, r), jnp.float32), fits


def test_rescue_runs_its_candidates_one_after_the_other():
    """In the compiled rescue, every batched LAPACK call (cold candidate: the
    Cholesky of cold_support and its pursuit; l1 candidate: QR, SVD, pursuit)
    depends on or is depended on by every other: XLA:CPU cannot run two at
    once. With large batches (e.g. the 15 x 15 Cholesky from ~180 users on)
    jaxlib 0.10.2 splits each over XLA's intra-op pool and blocks waiting, and
    two at once deadlocked a 2-core machine (docs/scale.md). The old rescue,
    two independent candidate chains, fails this check (49 unordered pairs)."""
    X, y, U, fits = _rescue_inputs()

    def rescue(X, y, U, fits):
        return peruser.rescue(X, y, U, fits, steps=3, l1_steps=20)

    text = _compiled_text(rescue, X, y, U, fits)
    assert 'custom_call_target="lapack_' in text and "geqrf" in text
    assert _unordered_lapack_pairs(text) == []


def test_per_user_step_runs_one_chain_of_lapack_calls():
    X, y, U, _ = _rescue_inputs()
    data = lrs.UserData(X, y, jnp.ones(y.shape, bool))
    config = lrs.AMHTConfig(rank=2, sparsity=3, rescue_fraction=0.5)
    for warm in (None, jnp.zeros((16, 3), jnp.int32)):
        text = _compiled_text(lambda U: peruser.per_user_step(data, U, warm, config), U)
        assert "geqrf" in text
        assert _unordered_lapack_pairs(text) == []


@pytest.mark.parametrize("dep", [jnp.nan, -jnp.inf, 0.0, -0.0, 0, -1, True, False])
def test_after_returns_its_input_exactly(dep):
    x = (jnp.array([1.5, -0.0, jnp.nan, jnp.inf]), jnp.arange(3))
    got = jax.jit(peruser._after)(x, {"a": jnp.asarray(dep), "b": jnp.zeros((0, 2))})
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(x)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert np.signbit(np.asarray(a)).tolist() == np.signbit(np.asarray(b)).tolist()


def test_independent_candidate_chains_fail_the_check():
    """The rescue as it was (cold and l1 candidates as independent chains in
    one program) is what the two tests above rule out."""
    X, y, U, fits = _rescue_inputs()

    def two_chains(X, y, U):
        A = X @ U
        cold = jax.vmap(peruser.cold_support, (0, 0, 0, None))(A, X, y, 3)
        l1 = jax.vmap(peruser.l1_support, (0, 0, 0, None, None))(A, X, y, 3, 20)
        return peruser.pursue(A, X, y, cold, 3), peruser.pursue(A, X, y, l1, 3)

    assert _unordered_lapack_pairs(_compiled_text(two_chains, X, y, U))
