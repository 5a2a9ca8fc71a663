"""The reputation formula, twice: as SQL expressions and as their exact Python twin.

Both halves live side by side so a change to one is a visible change to the other; a hypothesis test
checks that they agree within 1e-9 on both engines.

The model (docs/reputation.md explains the why):

* Evidence is two decayed weights per peer, ``success_weight`` and ``failure_weight``. Every new
  outcome first multiplies the older evidence by ``2**(-1/outcome_half_life)`` (recent outcomes
  dominate however long the history) and by ``2**(-dt/evidence_half_life_s)`` for the time since the
  previous outcome, then adds 1 to the matching weight. At read time the weights decay further by the
  time since the last outcome, so an idle peer drifts back toward the neutral prior.
* ``success_rate = (S + a) / (S + F + a + b)``: a Beta(a, b) prior smooths newcomers to a/(a+b).
* ``uptime_factor = 1 - (1 - uptime_floor) * 2**(-uptime_s / uptime_half_life_s)``: a newcomer starts
  at ``uptime_floor`` and approaches 1 as it proves it stays online.
* ``reputation = success_rate * uptime_factor``, always within [0, 1].
* A peer is *proven* once it has ``min_outcomes`` lifetime outcomes (exact counters, never decayed);
  only proven peers are excluded for a low score, so a newcomer is tried before it is judged, and a
  peer that fails rarely but always is still judged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, cast

from sqlalchemy import Double, case, func, literal_column
from sqlalchemy.sql.elements import ColumnElement

from .errors import ConfigError


@dataclass(frozen=True, kw_only=True)
class ReputationParams:
    """Tunable constants of the reputation model; the defaults are documented in docs/reputation.md."""

    prior_successes: float = 1.0
    prior_failures: float = 1.0
    outcome_half_life: float = 10.0
    evidence_half_life_s: float = 3600.0
    uptime_floor: float = 0.8
    uptime_half_life_s: float = 1800.0
    min_outcomes: float = 5.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ConfigError(f"reputation.{f.name} must be a finite number, got {value!r}")
        for name in (
            "prior_successes",
            "prior_failures",
            "outcome_half_life",
            "evidence_half_life_s",
            "uptime_half_life_s",
        ):
            if getattr(self, name) <= 0:
                raise ConfigError(f"reputation.{name} must be > 0, got {getattr(self, name)!r}")
        if not 0.0 <= self.uptime_floor <= 1.0:
            raise ConfigError(f"reputation.uptime_floor must be within [0, 1], got {self.uptime_floor!r}")
        if self.min_outcomes < 0:
            raise ConfigError(f"reputation.min_outcomes must be >= 0, got {self.min_outcomes!r}")

    @property
    def outcome_decay(self) -> float:
        """Factor applied to older evidence by each new outcome."""
        return float(2.0 ** (-1.0 / self.outcome_half_life))

    @property
    def neutral_score(self) -> float:
        """The score of a peer with no evidence and no uptime yet."""
        return reputation(0.0, 0.0, 0.0, self)


DEFAULT_PARAMS = ReputationParams()


# ---------------------------------------------------------------------------------------------
# Python twin
# ---------------------------------------------------------------------------------------------


# Postgres raises an error where a double result would go below ~2.2e-308 (Python quietly goes
# subnormal). So decay stops at 2**-500 (~3e-151) and weights under 1e-100 count as zero: their product
# stays a normal double, and against a prior of 1 nothing that small changes a score.
MAX_HALVINGS = 500.0
NEGLIGIBLE_WEIGHT = 1e-100


def negligible_to_zero(weight: float) -> float:
    """A weight too small to matter, as zero (keeps every product a normal double)."""
    return weight if weight >= NEGLIGIBLE_WEIGHT else 0.0


def half_life_decay(elapsed: float, half_life: float) -> float:
    """``2 ** -(elapsed / half_life)``, clamped to [2**-500, 1] (no growth for negative spans)."""
    return float(2.0 ** -min(max(0.0, elapsed) / half_life, MAX_HALVINGS))


def time_decay(elapsed_s: float, params: ReputationParams) -> float:
    """Weight left after ``elapsed_s`` seconds; negative spans (clock skew) do not inflate evidence."""
    return half_life_decay(elapsed_s, params.evidence_half_life_s)


def decayed_weight(weight: float, evidence_at: float | None, now: float, params: ReputationParams) -> float:
    """A stored weight, decayed from the time of its last outcome to ``now``."""
    if evidence_at is None:
        return weight
    return negligible_to_zero(weight) * time_decay(now - evidence_at, params)


def success_rate(successes: float, failures: float, params: ReputationParams = DEFAULT_PARAMS) -> float:
    """Beta-smoothed success rate of decayed evidence."""
    a, b = params.prior_successes, params.prior_failures
    return (successes + a) / (successes + failures + a + b)


def uptime_factor(uptime_s: float, params: ReputationParams = DEFAULT_PARAMS) -> float:
    """Factor in [uptime_floor, 1) that rewards time spent online."""
    return 1.0 - (1.0 - params.uptime_floor) * half_life_decay(uptime_s, params.uptime_half_life_s)


def reputation(
    successes: float, failures: float, uptime_s: float, params: ReputationParams = DEFAULT_PARAMS
) -> float:
    """Reputation in [0, 1] from decayed evidence and uptime."""
    return success_rate(successes, failures, params) * uptime_factor(uptime_s, params)


def is_proven(served: int, failed: int, params: ReputationParams = DEFAULT_PARAMS) -> bool:
    """Whether a peer has enough lifetime outcomes for a low score to exclude it."""
    return served + failed >= params.min_outcomes


def apply_outcome(
    success_weight: float,
    failure_weight: float,
    evidence_at: float | None,
    at: float,
    success: bool,
    params: ReputationParams = DEFAULT_PARAMS,
) -> tuple[float, float, float]:
    """Fold one outcome into stored evidence; the twin of the UPDATE in tracker/queries/writes.py.

    An outcome on time counts as one more outcome (older evidence keeps ``2**(-1/outcome_half_life)``
    of its weight). A late one (``at`` before the stored evidence time) does not decay the newer
    evidence backwards in time; it enters with its own age discount ``new``, and pushes the stored
    evidence back only as much as it counts itself (``d ** new``): counted as a whole outcome, a
    backlog of outcomes days old, weighing nothing, wiped out a peer's latest ones, and 60 successes
    of six days before brought a peer whose latest 20 outcomes were failures back above 0.3 (QA
    round 41).
    """
    last = at if evidence_at is None else evidence_at
    new = time_decay(last - at, params)
    keep = params.outcome_decay**new * time_decay(at - last, params)
    return (
        negligible_to_zero(success_weight) * keep + (new if success else 0.0),
        negligible_to_zero(failure_weight) * keep + (0.0 if success else new),
        max(last, at),
    )


# ---------------------------------------------------------------------------------------------
# SQL twin
# ---------------------------------------------------------------------------------------------


def sql_num(value: float) -> ColumnElement[float]:
    """A float constant written into the SQL as double precision.

    Inline, not bound: the write path's upsert names ~50 constants, and binding them cost more per
    row than the row's own values (building the parameter tuple and binding it in the driver). The
    cast keeps Postgres in floating point (a bare ``0.5`` is NUMERIC there); SQLite reads the type
    as REAL and evaluates the constant once per statement.
    """
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"SQL constants must be finite, got {value!r}")
    return literal_column(f"CAST({number!r} AS DOUBLE PRECISION)", Double())


def sql_negligible_to_zero(weight: ColumnElement[Any]) -> ColumnElement[float]:
    """SQL twin of :func:`negligible_to_zero`."""
    return case((weight >= sql_num(NEGLIGIBLE_WEIGHT), weight), else_=sql_num(0.0))


def sql_half_life_decay(elapsed: ColumnElement[Any], half_life: float) -> ColumnElement[float]:
    """SQL twin of :func:`half_life_decay` (CASE instead of dialect-specific least/greatest)."""
    halvings = elapsed / sql_num(half_life)
    clamped = case(
        (halvings <= sql_num(0.0), sql_num(0.0)),
        (halvings >= sql_num(MAX_HALVINGS), sql_num(MAX_HALVINGS)),
        else_=halvings,
    )
    return func.power(sql_num(2.0), -clamped, type_=Double())


def sql_time_decay(elapsed_s: ColumnElement[Any], params: ReputationParams) -> ColumnElement[float]:
    """SQL twin of :func:`time_decay`."""
    return sql_half_life_decay(elapsed_s, params.evidence_half_life_s)


def sql_decayed_weight(
    weight: ColumnElement[Any],
    evidence_at: ColumnElement[Any],
    now: ColumnElement[Any],
    params: ReputationParams,
) -> ColumnElement[float]:
    """SQL twin of :func:`decayed_weight` (a NULL ``evidence_at`` means nothing to decay)."""
    return func.coalesce(sql_negligible_to_zero(weight) * sql_time_decay(now - evidence_at, params), weight)


def sql_success_rate(
    successes: ColumnElement[Any], failures: ColumnElement[Any], params: ReputationParams
) -> ColumnElement[float]:
    """SQL twin of :func:`success_rate`."""
    a, b = sql_num(params.prior_successes), sql_num(params.prior_failures)
    return cast(ColumnElement[float], (successes + a) / (successes + failures + a + b))


def sql_uptime_factor(uptime_s: ColumnElement[Any], params: ReputationParams) -> ColumnElement[float]:
    """SQL twin of :func:`uptime_factor`."""
    return sql_num(1.0) - sql_num(1.0 - params.uptime_floor) * sql_half_life_decay(
        uptime_s, params.uptime_half_life_s
    )


def sql_reputation(
    successes: ColumnElement[Any],
    failures: ColumnElement[Any],
    uptime_s: ColumnElement[Any],
    params: ReputationParams,
) -> ColumnElement[float]:
    """SQL twin of :func:`reputation`."""
    return sql_success_rate(successes, failures, params) * sql_uptime_factor(uptime_s, params)


def sql_is_proven(outcomes: ColumnElement[Any], params: ReputationParams) -> ColumnElement[bool]:
    """SQL twin of :func:`is_proven`, given ``served + failed`` (queries sum them in one aggregate)."""
    return outcomes >= sql_num(params.min_outcomes)


def sql_apply_outcome(
    stored_weight: ColumnElement[Any],
    stored_at: ColumnElement[Any],
    new_weight: ColumnElement[Any],
    at: ColumnElement[Any],
    params: ReputationParams,
) -> ColumnElement[float]:
    """SQL twin of one weight of :func:`apply_outcome` (``new_weight`` is 1 or 0)."""
    last = func.coalesce(stored_at, at)
    new = sql_time_decay(last - at, params)
    keep: ColumnElement[float] = func.power(
        sql_num(params.outcome_decay), new, type_=Double()
    ) * sql_time_decay(at - last, params)
    return sql_negligible_to_zero(stored_weight) * keep + new_weight * new
