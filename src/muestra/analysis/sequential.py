"""Anytime-valid confidence sequences for a mean in [0, 1], and the stop rule built on them.

A fixed-n interval (Wilson) holds at one sample size chosen in advance; recomputed after
every batch and used to stop, it covers the truth less often than it says (the tests
show it). A *confidence sequence* holds at every sample size at once:
P(μ ∈ CS_t for all t ≥ 1) ≥ 1 − α, so stopping whenever it looks settled is valid.

`betting_cs` is the hedged-capital confidence sequence of Waudby-Smith & Ramdas,
"Estimating means of bounded random variables by betting", JRSS-B 2023 (Theorem 3 with
the predictable plug-in bets of their eq. (26)-(27)), for i.i.d. X_t in [0, 1]:

    μ̂_t  = (1/2 + Σ_{i≤t} X_i) / (t + 1)            σ̂²_t = (1/4 + Σ_{i≤t} (X_i − μ̂_i)²) / (t + 1)
    λ_t  = sqrt(2 log(2/α) / (σ̂²_{t−1} t log(t + 1)))            (predictable: uses X_{<t})
    K⁺_t(m) = Π (1 + min(λ_i, c/m) (X_i − m))       K⁻_t(m) = Π (1 − min(λ_i, c/(1−m)) (X_i − m))
    CS_t = {m : max(θ K⁺_t(m), (1 − θ) K⁻_t(m)) < 1/α},  θ = 1/2, c = 1/2

Under the true mean both capital processes are nonnegative martingales starting at 1, so
by Ville's inequality the hedged process ever reaches 1/α with probability ≤ α. The set is
found on a grid of `breaks` + 1 candidate means and widened by one grid step on each side
(as the authors' reference code, `confseq.betting.betting_cs`, does), then intersected
over time (an intersection of a confidence sequence's sets is still one).

What it assumes: the values of one sequence are independent draws with one mean, in a
fixed order (a sample's index), each in [0, 1]: an answer's indicator (counting), its
exact probability (Rao–Blackwell, `muestra.experiments.stopping`), or (x − y + 1)/2 for a
paired difference of two cells.

`curves` reads a stored run's bands after every sample (both estimators) for the
notebook and report views.

`StopRule` says when a sequence is settled: the band is within ± `precision`, or it
excludes `reference`; never before `min_samples`, always at `max_samples`, looked at
every `every` samples. `first_stop` applies it to many simulated sequences at once
(vectorised over runs: the coverage simulations of tests/test_sequential.py take seconds).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

BREAKS = 1000  # grid step 0.001: a bound is at most 0.001 wider than the exact set's
THETA = 0.5  # weight of the upward bet in the hedged capital process
TRUNCATION = 0.5  # c: a bet risks at most half the capital


def plug_in_bets(x: np.ndarray, alpha: float) -> np.ndarray:
    """λ_t for every row of `x` (R, T): each from the values before it only."""
    t = np.arange(1, x.shape[1] + 1)  # (T,)
    mean = (0.5 + np.cumsum(x, axis=1)) / (t + 1)  # μ̂_t, (R, T)
    variance = (0.25 + np.cumsum((x - mean) ** 2, axis=1)) / (t + 1)  # σ̂²_t, (R, T)
    before = np.concatenate([np.full((x.shape[0], 1), 0.25), variance[:, :-1]], axis=1)
    return np.sqrt(2 * math.log(2 / alpha) / (before * t * np.log(t + 1)))


class _Capital:
    """The hedged capital of R sequences at candidate means, fed one value at a time. Each
    row starts with the whole grid; `narrow` drops the means the running intersection has
    already ruled out (they can never come back), so that later steps cost less."""

    def __init__(self, rows: int, alpha: float, breaks: int) -> None:
        grid = np.linspace(0.0, 1.0, breaks + 1)
        self.means = np.tile(grid, (rows, 1))  # (R, W): each row's candidate means
        self.up = np.full(self.means.shape, math.log(THETA))  # log θK⁺, (R, W)
        self.down = np.full(self.means.shape, math.log(1 - THETA))  # log (1−θ)K⁻
        self.threshold = math.log(1 / alpha)
        self.step = 1 / breaks

    def feed(self, x: np.ndarray, bets: np.ndarray) -> None:
        """One value `x` (R,) per sequence, bet on with `bets` (R,)."""
        gap = x[:, None] - self.means  # (R, W)
        lam = bets[:, None]
        with np.errstate(divide="ignore"):  # no cap at 0 and 1
            up = np.minimum(lam, TRUNCATION / self.means)
            down = np.minimum(lam, TRUNCATION / (1 - self.means))
        self.up += np.log1p(up * gap)
        self.down += np.log1p(-down * gap)

    def bounds(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The lowest and highest candidate means not rejected, widened by a grid step,
        and whether any was left ((0, 1) where none was)."""
        inside = np.maximum(self.up, self.down) < self.threshold  # (R, W)
        found = inside.any(axis=1)
        rows = np.arange(inside.shape[0])
        first = np.argmax(inside, axis=1)
        last = inside.shape[1] - 1 - np.argmax(inside[:, ::-1], axis=1)
        low = np.where(found, self.means[rows, first] - self.step, 0.0)
        high = np.where(found, self.means[rows, last] + self.step, 1.0)
        return np.clip(low, 0, 1), np.clip(high, 0, 1), found

    def keep(self, rows: np.ndarray) -> None:
        self.means, self.up, self.down = self.means[rows], self.up[rows], self.down[rows]

    def narrow(self, low: np.ndarray, high: np.ndarray) -> None:
        """Keep each row's candidates in [low − step, high + step] (padded with copies of
        its last one, which change no bound)."""
        keep = (self.means >= low[:, None] - self.step) & (self.means <= high[:, None] + self.step)
        keep[:, 1:] &= np.diff(self.means, axis=1) > 0  # not the padding
        counts = keep.sum(axis=1)
        if not counts.size or counts.max() == 0 or counts.max() >= self.means.shape[1]:
            return
        starts = np.argmax(keep, axis=1)
        offsets = np.minimum(np.arange(counts.max()), np.maximum(counts - 1, 0)[:, None])
        index = starts[:, None] + offsets  # (R, W')
        rows = np.arange(self.means.shape[0])[:, None]
        self.means, self.up, self.down = (a[rows, index] for a in (self.means, self.up, self.down))


def betting_cs_many(
    x: np.ndarray, alpha: float = 0.05, breaks: int = BREAKS
) -> tuple[np.ndarray, np.ndarray]:
    """Lower and upper bounds (R, T) of the hedged-capital confidence sequence of each row
    of `x` (R, T) at every time t (after t values)."""
    x = _checked(x)
    capital, bets = _Capital(x.shape[0], alpha, breaks), plug_in_bets(x, alpha)
    lows, highs = np.empty(x.shape), np.empty(x.shape)
    for t in range(x.shape[1]):
        capital.feed(x[:, t], bets[:, t])
        lows[:, t], highs[:, t], _ = capital.bounds()
    return np.maximum.accumulate(lows, axis=1), np.minimum.accumulate(highs, axis=1)


def _checked(x: np.ndarray) -> np.ndarray:
    x = np.atleast_2d(np.asarray(x, dtype=float))
    assert ((x >= 0) & (x <= 1)).all(), "a betting confidence sequence takes values in [0, 1]"
    return x


def betting_cs(
    x: np.ndarray | list[float], alpha: float = 0.05, breaks: int = BREAKS
) -> tuple[np.ndarray, np.ndarray]:
    """Lower and upper bounds (T,) of one sequence's confidence sequence."""
    lows, highs = betting_cs_many(np.asarray(x, dtype=float)[None, :], alpha, breaks)
    return lows[0], highs[0]


@dataclass(frozen=True)
class Band:
    """A confidence sequence read at `n` values: the running mean and its bounds."""

    n: int
    estimate: float
    low: float
    high: float

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2


def band(x: np.ndarray | list[float], alpha: float = 0.05) -> Band:
    """The band after all of `x` (n = 0: the whole of [0, 1])."""
    values = np.asarray(x, dtype=float)
    if values.size == 0:
        return Band(0, math.nan, 0.0, 1.0)
    lows, highs = betting_cs(values, alpha)
    return Band(int(values.size), float(values.mean()), float(lows[-1]), float(highs[-1]))


def as_difference(b: Band) -> Band:
    """A band on (x − y + 1)/2 read as a band on the difference x − y."""
    return Band(b.n, 2 * b.estimate - 1, 2 * b.low - 1, 2 * b.high - 1)


@dataclass(frozen=True)
class StopRule:
    """When a sequence is settled. `precision` is a half-width (± points as a share);
    `reference` a value the band must exclude; either (or both) may be given."""

    precision: float | None
    reference: float | None
    min_samples: int
    max_samples: int
    every: int
    alpha: float = 0.05

    def __post_init__(self) -> None:
        assert self.precision is not None or self.reference is not None, "nothing to settle"
        assert 1 <= self.min_samples <= self.max_samples and self.every >= 1

    def looks(self) -> list[int]:
        """The sample counts at which the band is read: min, min + every, …, max."""
        found = list(range(self.min_samples, self.max_samples + 1, self.every))
        return found if found[-1] == self.max_samples else [*found, self.max_samples]

    def reason(self, b: Band, samples: int | None = None) -> str | None:
        """Why `b`, read after `samples` samples (default: its values), settles the
        sequence (precision, reference, max_samples), or None."""
        if self.precision is not None and b.half_width <= self.precision:
            return "precision"
        if self.reference is not None and not b.low <= self.reference <= b.high:
            return "reference"
        return "max_samples" if (samples or b.n) >= self.max_samples else None


@dataclass(frozen=True)
class Stops:
    """Where each of many simulated sequences stopped, and its band there."""

    n: np.ndarray  # (R,) values used
    low: np.ndarray  # (R,)
    high: np.ndarray  # (R,)
    estimate: np.ndarray  # (R,)


def first_stop(x: np.ndarray, rule: StopRule, breaks: int = 200) -> Stops:
    """Apply `rule` to each row of `x` (R, ≥ max_samples): the first look at which the
    row's confidence sequence (intersected over time, as `betting_cs`) is settled. Rows
    are dropped as they stop, and candidate means as they are ruled out, so that a
    simulation costs about what its runs sample. The grid is coarser than `band`'s by
    default (0.005): bounds a little wider, still valid."""
    x = _checked(x)[:, : rule.max_samples]
    rows = x.shape[0]
    capital, bets = _Capital(rows, rule.alpha, breaks), plug_in_bets(x, rule.alpha)
    looks = set(rule.looks())
    active = np.arange(rows)  # the rows still sampling, in capital's order
    low, high = np.zeros(rows), np.ones(rows)  # running intersection, per row
    stop = np.full(rows, rule.max_samples)
    for t in range(rule.max_samples):
        capital.feed(x[active, t], bets[active, t])
        now_low, now_high, _ = capital.bounds()
        low[active] = np.maximum(low[active], now_low)
        high[active] = np.minimum(high[active], now_high)
        if t % 8 == 7:
            capital.narrow(low[active], high[active])
        if t + 1 not in looks:
            continue
        settled = np.zeros(active.size, dtype=bool)
        if rule.precision is not None:
            settled |= (high[active] - low[active]) / 2 <= rule.precision
        if rule.reference is not None:
            settled |= (low[active] > rule.reference) | (high[active] < rule.reference)
        stop[active[settled]] = t + 1
        capital.keep(~settled)
        active = active[~settled]
        if not active.size:
            break
    estimate = np.cumsum(x, axis=1)[np.arange(rows), stop - 1] / stop
    return Stops(stop, low, high, estimate)


# ---- a stored run's bands, sample by sample (notebook and report views) -----------------

CELL = ["model", "condition", "prompt_id"]


def _label(value: object) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def cell_values(rows: pd.DataFrame, field: str, value: str) -> pd.DataFrame:
    """One cell's samples in index order with the tracked value's indicator (`drawn`) and
    exact probability (`exact`, NaN without field_probs); samples without an answer to
    `field` (an error, a missing field) are left out."""
    rows = rows.sort_values("sample")
    rows = rows[rows["error"].isna() & rows[field].notna()] if field in rows else rows.iloc[:0]
    drawn = rows[field].map(_label) == value
    exact = [
        (p.get(field) or {}).get(value, np.nan) if isinstance(p, dict) else np.nan
        for p in rows.get("field_probs", pd.Series([None] * len(rows)))
    ]
    return pd.DataFrame({"sample": rows["sample"].to_numpy(), "drawn": drawn.to_numpy(float),
                         "exact": np.asarray(exact, dtype=float)})  # fmt: skip


def curves(frame: pd.DataFrame, field: str, value: str, alpha: float = 0.05) -> pd.DataFrame:
    """For every cell, the confidence sequence of `value`'s share after each sample, by
    counting and (where every sample has field_probs) by the mean exact probability:
    columns model, condition, prompt_id, estimator, n, estimate, low, high. Whether
    field_probs estimate the share (answers drawn at T 1 unfiltered) is for the caller to
    say: this draws both."""
    found = []
    for key, rows in frame.groupby(CELL, sort=False):
        values = cell_values(rows, field, value)
        if values.empty:
            continue
        series = {"counts": values["drawn"].to_numpy()}
        if not values["exact"].isna().any():
            series["field_probs"] = np.clip(values["exact"].to_numpy(), 0, 1)
        for estimator, x in series.items():
            lows, highs = betting_cs(x, alpha)
            n = np.arange(1, len(x) + 1)
            part = pd.DataFrame(
                {"estimator": estimator, "n": n, "estimate": np.cumsum(x) / n,
                 "low": lows, "high": highs}
            )  # fmt: skip
            for column, part_value in zip(CELL, key, strict=True):
                part.insert(0, column, part_value)
            found.append(part)
    return pd.concat(found, ignore_index=True) if found else pd.DataFrame()
