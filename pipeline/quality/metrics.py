"""Metric names, and THE ranking rule: which of several models is best, for the job's choice of a trial
and the registry's choice of a champion alike (one function, one tie-break)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

#: metrics that summarize an evaluation in one number each (logged to MLflow, shown in tables)
HEADLINE = (
    "heldout_mse",
    "baseline_mse",
    "heldout_mse_normalized",
    "one_step_error",
    "one_step_baseline",
    "one_step_floor",
    "tracking_drift",
    "tracking_baseline",
    "tracking_floor",
    "plan_return",
)
#: metrics that can pick a dataset's model (`pretrain_all --select-by`) and the registry's champion
#: (registered-model tag `champion_metric`); lower is better for each but those in HIGHER_IS_BETTER
SELECT_METRICS = ("heldout_mse", "one_step_error", "tracking_drift", "plan_return")
#: the closed-loop return an oracle planner's plans deliver through the model (pipeline.quality.closed_loop)
HIGHER_IS_BETTER = frozenset({"plan_return"})
#: the metric every candidate has, and the one that decides when the asked-for metric is missing
DEFAULT_METRIC = "heldout_mse"
LABELS = {
    "heldout_mse": "held-out MSE",
    "one_step_error": "one-step error",
    "tracking_drift": "tracking drift",
    "plan_return": "closed-loop plan return",
}
#: the evaluation setting a metric is only comparable under (registry tag): drift at one horizon, plan
#: return under one closed-loop protocol (planners, σ values, episodes, seed set)
CONTEXT_TAGS = {"tracking_drift": "eval.horizon", "plan_return": "closed_loop_protocol"}


def finite(value) -> float | None:
    """`value` as a float when it is a finite number (or a string of one), else None."""
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


@dataclass(frozen=True)
class Candidate:
    """One contender: a finished trial (the job) or a registered version (the registry).

    `scores` maps metric names to values (missing or non-finite = not measured); `order` breaks ties,
    lower first (the job: the trial key; the registry: the version number, so the older version wins)."""

    ident: str
    scores: Mapping[str, object]
    order: tuple = ()

    def score(self, metric: str) -> float | None:
        return finite(self.scores.get(metric))


def rank(candidates, metric: str = DEFAULT_METRIC) -> tuple[str, list[Candidate]]:
    """(the metric that decides, the candidates it ranks, best first).

    The asked-for `metric` decides among the candidates that carry it; when none does, held-out MSE
    decides among those that carry that. Lower is better (higher for HIGHER_IS_BETTER); ties go to the
    lower held-out MSE, then to the lower `order`."""
    if metric not in SELECT_METRICS:
        raise ValueError(f"metric {metric!r} is not one of {list(SELECT_METRICS)}")
    rule = metric if any(c.score(metric) is not None for c in candidates) else DEFAULT_METRIC
    scored = [c for c in candidates if c.score(rule) is not None]
    inf = float("inf")

    sign = -1.0 if rule in HIGHER_IS_BETTER else 1.0

    def key(c: Candidate):
        mse = c.score(DEFAULT_METRIC)
        return (sign * c.score(rule), inf if mse is None else mse, c.order)

    return rule, sorted(scored, key=key)


def best(candidates, metric: str = DEFAULT_METRIC) -> Candidate | None:
    """The best candidate under `rank`, or None when none carries a usable metric."""
    _, ranked = rank(candidates, metric)
    return ranked[0] if ranked else None


def fmt_number(value, spec: str = ".4g", missing: str = "n/a") -> str:
    """A metric for tables and messages: `spec`-formatted when finite, else `missing`; ints stay ints."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    number = finite(value)
    return missing if number is None else format(number, spec)


def evaluation_tags(result: dict) -> dict:
    """Flat `{"eval.<metric>": float}` of the headline metrics (MLflow model-version tags / metrics)."""
    out = {f"eval.{k}": float(result[k]) for k in HEADLINE if isinstance(result.get(k), (int, float))}
    out["eval.horizon"] = float(result.get("horizon") or 0)
    for row in result.get("closed_loop") or []:
        at = f"eval.closed_loop.{row['planner']}.sigma_{row['plan_noise']:g}"
        for key in ("normalized_return", "fall_rate", "return_ratio", "actor_normalized_return"):
            if isinstance(row.get(key), (int, float)):
                out[f"{at}.{key}"] = float(row[key])
    return out


def evaluation_text_tags(result: dict) -> dict:
    """The string tags beside `evaluation_tags` (not metrics): the closed-loop protocol plan returns were
    measured under."""
    protocol = plan_protocol(result)
    return {"closed_loop_protocol": protocol} if protocol else {}


def plan_protocol(result: dict) -> str | None:
    """The closed-loop protocol of an evaluation in one string ("expert@k1 σ=0,0.05 n=10 test"), None
    without closed-loop rows: plan returns compare only under the same one."""
    rows = result.get("closed_loop") or []
    if not rows:
        return None
    planners = ",".join(dict.fromkeys(r["planner"] for r in rows))
    sigmas = ",".join(format(s, "g") for s in dict.fromkeys(r["plan_noise"] for r in rows))
    return f"{planners}@k{rows[0].get('jump', 1)} σ={sigmas} n={rows[0]['episodes']} {rows[0].get('seeds')}"


def headline(result: dict) -> dict:
    """The headline metrics of an evaluation and what they were measured on (for summary.json records)."""
    keep = (*HEADLINE, "part", "horizon", "tracking_starts", "one_step_samples", "env_id", "physics_reason")
    keep += ("closed_loop", "closed_loop_reason")
    return {k: result.get(k) for k in keep if k in result}
