"""Per-expert bit allocation under a byte budget (MC#/PMQ multiple-choice knapsack).

Owns: the MC# objective (Σ_j φ_j^α · w_j^β · ε_{j,b}, α = 1, β = 1.5; spec
/work/shared/specs/compression.md), the size-budget parser (``"3.5bpw"``,
``"12GB"``) and three solvers: exact MILP (scipy.optimize.milp / HiGHS),
exact DP over bytes (when the byte grid is small) and the greedy fallback by
marginal error per byte on each expert's lower convex hull.

Knows nothing about codecs, files or models: an item is one expert with a
cost and a byte size per candidate level.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Sequence

import numpy as np

from moestream.convert.errors import BudgetError

#: MC# exponents on normalised frequency (α) and normalised summed gate weight (β).
MC_ALPHA = 1.0
MC_BETA = 1.5
#: DP is used when (budget / gcd of byte sizes) * items stays below this.
DP_MAX_CELLS = 20_000_000


@dataclasses.dataclass(frozen=True)
class Allocation:
    """Result of :func:`allocate`.

    Attributes:
        choice: int array [N], index of the chosen option per item.
        total_bytes: Σ bytes of the chosen options.
        objective: Σ cost of the chosen options.
        method: "milp", "dp", "greedy" or "brute".
        optimal: True when the solver proves optimality.
    """

    choice: np.ndarray
    total_bytes: int
    objective: float
    method: str
    optimal: bool


def mc_importance(freq: np.ndarray, gate_sum: np.ndarray, alpha: float = MC_ALPHA,
                  beta: float = MC_BETA, groups: np.ndarray | None = None) -> np.ndarray:
    """MC# importance φ^α · w^β with φ, w normalised to sum 1 within each layer.

    Args:
        freq: [N] activation counts.
        gate_sum: [N] summed gate weights.
        groups: optional [N] layer id per item (normalisation is per layer); None = one layer.
    """
    f = np.asarray(freq, dtype=np.float64)
    g = np.asarray(gate_sum, dtype=np.float64)
    if f.shape != g.shape or f.ndim != 1:
        raise ValueError(f"freq and gate_sum must be equal 1-D arrays, got {f.shape} and {g.shape}")
    if (f < 0).any() or (g < 0).any():
        raise ValueError("freq and gate_sum must be non-negative")
    lay = np.zeros(f.shape, dtype=np.int64) if groups is None else np.asarray(groups)
    phi, w = np.zeros_like(f), np.zeros_like(g)
    for layer in np.unique(lay):
        m = lay == layer
        phi[m] = f[m] / f[m].sum() if f[m].sum() > 0 else 0.0
        w[m] = g[m] / g[m].sum() if g[m].sum() > 0 else 0.0
    return phi ** alpha * w ** beta


def parse_size_budget(text: str, n_weights: int) -> int:
    """Turn ``"3.5bpw"`` / ``"3.5 bpw"`` / ``"12GB"`` / ``"800MiB"`` / ``"123456"`` (bytes) into bytes.

    Args:
        text: the --size-budget value.
        n_weights: number of weights the budget covers (for bits-per-weight).

    Raises:
        ValueError: unparseable text (the message shows accepted forms).
    """
    s = text.strip().lower().replace(" ", "")
    m = re.fullmatch(r"([0-9]*\.?[0-9]+)(bpw|b|kb|mb|gb|tb|kib|mib|gib|tib)?", s)
    if not m:
        raise ValueError(f"cannot parse size budget {text!r}; use e.g. '3.5bpw', '12GB', '800MiB'")
    val, unit = float(m.group(1)), m.group(2) or "b"
    if unit == "bpw":
        return int(math.floor(val * n_weights / 8))
    mult = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12,
            "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40}[unit]
    return int(math.floor(val * mult))


def allocate(cost: np.ndarray, nbytes: np.ndarray, budget: int, method: str = "auto") -> Allocation:
    """Choose one option per item minimising Σ cost subject to Σ bytes ≤ budget.

    Args:
        cost: [N, L] cost of option b for item j (e.g. importance_j · ε_{j,b}).
        nbytes: [N, L] or [L] integer bytes of each option.
        budget: byte budget.
        method: "auto" (milp if scipy imports, else dp if small, else greedy), "milp", "dp",
            "greedy" or "brute" (tests; ≤ 12 items).

    Returns:
        Allocation.

    Raises:
        BudgetError: even the cheapest option of every item exceeds the budget (says the minimum).
        ValueError: bad shapes or method.
    """
    c = np.asarray(cost, dtype=np.float64)
    if c.ndim != 2 or c.shape[1] == 0:
        raise ValueError(f"cost must be [N, L], got shape {c.shape}")
    b = np.broadcast_to(np.asarray(nbytes, dtype=np.int64), c.shape).copy()
    if (b < 0).any() or not np.isfinite(c).all():
        raise ValueError("bytes must be non-negative and costs finite")
    minimum = int(b.min(axis=1).sum())
    if minimum > budget:
        raise BudgetError(f"size budget {budget} bytes is below the smallest possible experts "
                          f"({minimum} bytes at the lowest level each); raise the budget to at least that")
    if method == "auto":
        try:
            import scipy.optimize  # noqa: F401
            method = "milp"
        except ImportError:
            method = "dp" if _dp_cells(b, budget) <= DP_MAX_CELLS else "greedy"
    solvers = {"milp": _solve_milp, "dp": _solve_dp, "greedy": _solve_greedy, "brute": _solve_brute}
    if method not in solvers:
        raise ValueError(f"unknown method {method!r}; choose one of {sorted(solvers)} or 'auto'")
    choice, optimal = solvers[method](c, b, int(budget))
    choice = np.asarray(choice, dtype=np.int64)
    idx = np.arange(c.shape[0])
    total = int(b[idx, choice].sum())
    assert total <= budget, "solver exceeded the budget"
    return Allocation(choice=choice, total_bytes=total, objective=float(c[idx, choice].sum()),
                      method=method, optimal=optimal)


def allocate_experts(freq: np.ndarray, gate_sum: np.ndarray, errors: np.ndarray, nbytes: np.ndarray,
                     budget: int, groups: np.ndarray | None = None, alpha: float = MC_ALPHA,
                     beta: float = MC_BETA, method: str = "auto") -> Allocation:
    """MC# allocation: cost_{j,b} = φ_j^α · w_j^β · ε_{j,b}; see :func:`allocate`.

    Args:
        freq, gate_sum: [N] calibration statistics per expert.
        errors: [N, L] output error ε_{j,b} of expert j quantized alone at option b.
        nbytes: [N, L] or [L] stored bytes per option.
        budget: byte budget for all N experts.
        groups: [N] layer index per expert (normalisation of φ, w is per layer).
    """
    imp = mc_importance(freq, gate_sum, alpha, beta, groups)
    err = np.asarray(errors, dtype=np.float64)
    if err.shape[0] != imp.shape[0]:
        raise ValueError(f"errors has {err.shape[0]} rows for {imp.shape[0]} experts")
    return allocate(imp[:, None] * err, nbytes, budget, method)


# --------------------------------------------------------------------------- solvers
def _solve_milp(c: np.ndarray, b: np.ndarray, budget: int) -> tuple[np.ndarray, bool]:
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import csr_matrix

    N, L = c.shape
    rows = np.repeat(np.arange(N), L)
    one_each = csr_matrix((np.ones(N * L), (rows, np.arange(N * L))), shape=(N, N * L))
    cons = [LinearConstraint(one_each, 1, 1),
            LinearConstraint(b.reshape(1, -1).astype(np.float64), -np.inf, budget)]
    res = milp(c.reshape(-1), constraints=cons, integrality=np.ones(N * L), bounds=Bounds(0, 1),
               options={"time_limit": 120.0, "mip_rel_gap": 0.0})
    if res.x is None:  # time limit without incumbent: fall back
        return _solve_greedy(c, b, budget)
    x = res.x.reshape(N, L)
    choice = x.argmax(axis=1)
    if int(b[np.arange(N), choice].sum()) > budget:  # numerical slack in HiGHS: repair greedily
        return _solve_greedy(c, b, budget)
    return choice, bool(res.status == 0)


def _dp_cells(b: np.ndarray, budget: int) -> int:
    g = int(np.gcd.reduce(b.reshape(-1))) or 1
    return (budget // g + 1) * b.shape[0]


def _solve_dp(c: np.ndarray, b: np.ndarray, budget: int) -> tuple[np.ndarray, bool]:
    N, L = c.shape
    g = int(np.gcd.reduce(b.reshape(-1))) or 1
    if _dp_cells(b, budget) > DP_MAX_CELLS:
        raise ValueError(f"DP would need {_dp_cells(b, budget)} cells; use method='milp' or 'greedy'")
    units = b // g
    cap = budget // g
    best = np.full(cap + 1, np.inf)
    best[0] = 0.0  # best[u] = min cost using exactly u units so far
    picks = np.zeros((N, cap + 1), dtype=np.int16)
    for j in range(N):
        new = np.full(cap + 1, np.inf)
        for opt in range(L):
            u = int(units[j, opt])
            if u > cap:
                continue
            cand = np.full(cap + 1, np.inf)
            cand[u:] = best[: cap + 1 - u] + c[j, opt]
            better = cand < new
            new = np.where(better, cand, new)
            picks[j] = np.where(better, opt, picks[j])
        best = new
    u = int(np.argmin(best))
    choice = np.zeros(N, dtype=np.int64)
    for j in range(N - 1, -1, -1):
        choice[j] = picks[j, u]
        u -= int(units[j, choice[j]])
    return choice, True


def _solve_greedy(c: np.ndarray, b: np.ndarray, budget: int) -> tuple[np.ndarray, bool]:
    """Start at each item's cheapest option; take hull upgrades by error drop per byte."""
    N, L = c.shape
    choice = b.argmin(axis=1)
    # tie on bytes: take the lower cost
    for j in range(N):
        same = np.flatnonzero(b[j] == b[j, choice[j]])
        choice[j] = same[np.argmin(c[j, same])]
    spent = int(b[np.arange(N), choice].sum())
    upgrades: list[tuple[float, int, int]] = []  # (−efficiency, item, option) along each lower hull
    for j in range(N):
        for prev, nxt in _hull_steps(c[j], b[j], int(choice[j])):
            db = b[j, nxt] - b[j, prev]
            dc = c[j, prev] - c[j, nxt]
            upgrades.append((-(dc / db) if db > 0 else -math.inf, j, nxt))
    upgrades.sort()
    for _, j, nxt in upgrades:
        cur = int(choice[j])
        if b[j, nxt] <= b[j, cur] or c[j, nxt] >= c[j, cur]:
            continue
        extra = int(b[j, nxt] - b[j, cur])
        if spent + extra <= budget:
            choice[j] = nxt
            spent += extra
    # fill leftover budget with any single improving move
    improved = True
    while improved:
        improved = False
        best_gain, best_move = 0.0, None
        for j in range(N):
            cur = int(choice[j])
            for o in range(L):
                extra = int(b[j, o] - b[j, cur])
                gain = c[j, cur] - c[j, o]
                if gain > best_gain and spent + extra <= budget:
                    best_gain, best_move = gain, (j, o, extra)
        if best_move is not None:
            j, o, extra = best_move
            choice[j] = o
            spent += extra
            improved = True
    return choice, False


def _hull_steps(cost: np.ndarray, nbytes: np.ndarray, start: int) -> list[tuple[int, int]]:
    """Consecutive (from, to) steps along the lower convex hull of (bytes, cost) from ``start``."""
    order = [o for o in np.argsort(nbytes, kind="stable") if nbytes[o] >= nbytes[start]]
    hull = [start]
    for o in order:
        if o == start or cost[o] >= cost[hull[-1]]:
            continue
        while len(hull) >= 2:
            a, m = hull[-2], hull[-1]
            # m is above the segment a->o: drop it (not convex)
            if (cost[m] - cost[a]) * (nbytes[o] - nbytes[a]) >= (cost[o] - cost[a]) * (nbytes[m] - nbytes[a]):
                hull.pop()
            else:
                break
        hull.append(o)
    return list(zip(hull[:-1], hull[1:]))


def _solve_brute(c: np.ndarray, b: np.ndarray, budget: int) -> tuple[np.ndarray, bool]:
    N, L = c.shape
    if N > 12:
        raise ValueError(f"brute force is for tests (≤ 12 items), got {N}")
    grids = np.array(np.meshgrid(*[np.arange(L)] * N, indexing="ij")).reshape(N, -1).T  # [L^N, N]
    idx = np.arange(N)
    tb = b[idx, grids].sum(axis=1)
    tc = c[idx, grids].sum(axis=1)
    tc = np.where(tb <= budget, tc, np.inf)
    return grids[int(np.argmin(tc))], True


def bytes_per_level(level_bits_per_weight: Sequence[float], n_weights: int) -> np.ndarray:
    """Integer bytes of an expert with ``n_weights`` at each level's stored bits per weight."""
    return np.array([int(math.ceil(bpw * n_weights / 8)) for bpw in level_bits_per_weight], dtype=np.int64)
