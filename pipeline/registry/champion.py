"""Which registered version holds the `champion` alias, and why: eligibility lives here, the ranking in
pipeline.quality.metrics (the one rule the job uses to pick a trial).

Eligible to compete, in this order:
- data: only versions on the current data, i.e. the dataset sha256 first registered last (first
  registration = the lowest version number carrying it). A version on newer data takes the alias; a
  version on superseded data never does, whenever it is registered.
- protocol: the split kind, fractions and seed the held-out numbers were measured with (version tag
  `protocol`, readable `protocol_desc`). The champion's protocol competes; on new data without it, the
  protocol of the first version on that data.
- metric: the registered model's `champion_metric` tag (tracking drift: at the champion's horizon).
  Changing it re-ranks the versions and is recorded in the tag `champion_rule_history`.
- promotion: `python -m pipeline.register --promote NAME VERSION` pins the alias (tag `<alias>_promotion`).
  Versions registered before it no longer compete; a later one takes the alias only on newer data or
  when better than the promoted version under the rule.
Everything is read from the registry alone, so concurrent registrations agree.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import logging
import time
from dataclasses import dataclass, field

from mlflow import MlflowClient

from invdyn._download import redact_url
from pipeline.quality.metrics import (
    CONTEXT_TAGS,
    DEFAULT_METRIC,
    LABELS,
    SELECT_METRICS,
    Candidate,
    finite,
    fmt_number,
    rank,
)
from pipeline.registry import store
from pipeline.registry.store import CHAMPION, CHAMPION_METRIC_TAG, TrackingError

log = logging.getLogger(__name__)

RULE_HISTORY_TAG = "champion_rule_history"  # registered-model tag: JSON list of rule changes (last 20)
#: the training settings that decide which rows are held out, hence which numbers compare
PROTOCOL_KEYS = ("split", "val_fraction", "test_fraction", "seed")
UNRECORDED = "unrecorded (no split in params.json or the record's config)"


def promotion_tag(alias: str) -> str:
    return f"{alias}_promotion"


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def whoami() -> str:
    try:
        return getpass.getuser()
    except (OSError, KeyError):  # no login name (some containers)
        return "unknown"


# ------------------------------------------------------------------------------ what a version says


def protocol(training: dict | None) -> tuple[str, str]:
    """(digest, description) of the held-out protocol in a params.json "training" section or a record's
    config; ("", UNRECORDED) when it names no split."""
    training = training if isinstance(training, dict) else {}
    if not training.get("split"):
        return "", UNRECORDED
    used = _protocol_fields(training)
    digest = hashlib.sha256(json.dumps(used, sort_keys=True).encode()).hexdigest()[:16]
    return digest, " ".join(f"{k}={used[k]}" for k in PROTOCOL_KEYS if k in used)


def _protocol_fields(training: dict) -> dict:
    """PROTOCOL_KEYS' values: a two-part model's as recorded (so its digest is the one it was registered
    with); a three-part one's from its split record (params.json) or config (`split_seed`, else `seed`), so
    members trained on one split with different init seeds share a protocol."""
    split = training.get("split")
    if not isinstance(split, dict) and "test_fraction" not in training:
        return {k: training[k] for k in PROTOCOL_KEYS if k in training}
    if isinstance(split, dict):
        kind, val, test, seed = (
            split.get("kind"),
            split.get("val_fraction"),
            split.get("test_fraction"),
            split.get("seed"),
        )
    else:
        seed = training.get("split_seed")
        kind, val, test = split, training.get("val_fraction"), training.get("test_fraction")
        seed = training.get("seed") if seed is None else seed
    return {"split": kind, "val_fraction": val, "test_fraction": test, "seed": seed}


def _recorded(version) -> tuple[str, str]:
    """A version's protocol: its tags, or (registered before they existed) its `config` tag."""
    if "protocol" in version.tags:
        return version.tags["protocol"], version.tags.get("protocol_desc") or UNRECORDED
    try:
        config = json.loads(version.tags.get("config") or "{}")
    except ValueError:
        config = {}
    return protocol(config)


def score(version, metric: str) -> float | None:
    """A version's value of a champion metric: the `heldout_mse` tag, else the `eval.<metric>` tag."""
    return finite(version.tags.get(metric if metric == DEFAULT_METRIC else f"eval.{metric}"))


def _sha(version) -> str:
    return version.tags.get("dataset_sha256") or ""


def _number(version) -> int:
    return int(version.version)


# ----------------------------------------------------------------------------------- the decision


@dataclass
class Decision:
    """The version that should hold the alias and everything that decided it (for the reasons)."""

    target: str | None  # version number, None when no version has a held-out MSE
    metric: str  # the asked-for metric (the registered model's champion_metric)
    rule: str = DEFAULT_METRIC  # the metric that decided: `metric`, or held-out MSE when none carries it
    data: str = ""  # dataset sha256 of the current data
    protocol: str = ""  # the protocol digest that competes
    horizon: str | None = None  # the metric's context it was compared at (CONTEXT_TAGS: horizon, protocol)
    first_seen: dict = field(default_factory=dict)  # dataset sha256 -> lowest version number carrying it
    versions: dict = field(default_factory=dict)  # version number -> version
    promotion: dict | None = None  # the promotion in force, if any


def decide(versions, metric: str = DEFAULT_METRIC, anchor: str | None = None, promotion=None) -> Decision:
    """The champion among `versions` (objects with .version and .tags) under `metric`; `anchor` is the
    current alias holder (its protocol competes), `promotion` the registered model's promotion record."""
    by = {str(v.version): v for v in versions}
    first_seen: dict[str, int] = {}
    for v in sorted(versions, key=_number):
        first_seen.setdefault(_sha(v), _number(v))
    d = Decision(None, metric, first_seen=first_seen, versions=by)
    pool = list(versions)
    if promotion and str(promotion.get("version")) in by:
        d.promotion, anchor = promotion, str(promotion["version"])
        after = int(promotion.get("after") or 0)
        pool = [v for v in versions if str(v.version) == anchor or _number(v) > after]
    scored = [v for v in pool if score(v, DEFAULT_METRIC) is not None]
    if not scored:
        return d
    d.data = max({_sha(v) for v in scored}, key=first_seen.__getitem__)
    on_data = [v for v in scored if _sha(v) == d.data]
    held = by.get(anchor) if anchor else None
    if held is not None and any(_recorded(v)[0] == _recorded(held)[0] for v in on_data):
        d.protocol = _recorded(held)[0]
    else:
        d.protocol = _recorded(min(on_data, key=_number))[0]
    same = [v for v in on_data if _recorded(v)[0] == d.protocol]
    context = CONTEXT_TAGS.get(metric)  # drift at another horizon, return under other plans: not comparable
    if context:
        carriers = [v for v in same if score(v, metric) is not None]
        if carriers:
            newest = max(carriers, key=_number).tags.get(context)
            held_carries = held is not None and any(v is held for v in carriers)
            d.horizon = held.tags.get(context) if held_carries else newest
            same = [v for v in same if score(v, metric) is None or v.tags.get(context) == d.horizon]
    candidates = [
        Candidate(
            str(v.version),
            {DEFAULT_METRIC: score(v, DEFAULT_METRIC), metric: score(v, metric)},
            (_number(v),),
        )
        for v in same
    ]
    d.rule, ranked = rank(candidates, metric)
    d.target = ranked[0].ident if ranked else None
    return d


def choose_champion(versions, metric: str = DEFAULT_METRIC, anchor=None, promotion=None) -> str | None:
    """The version number that should hold the alias (see `decide`)."""
    return decide(versions, metric, anchor, promotion).target


# ------------------------------------------------------------------------------------- the reasons


def _why_not(d: Decision, mine) -> str | None:
    """Why `mine` cannot compete with the champion, or None when it competes (and loses on the metric)."""
    promo = d.promotion
    if score(mine, DEFAULT_METRIC) is None:
        return "it has no finite held-out MSE"
    if promo and str(mine.version) != str(promo["version"]) and _number(mine) <= int(promo.get("after") or 0):
        return (
            f"v{promo['version']} was promoted by {promo.get('by')} at {promo.get('at')} after this "
            "version was registered, and versions registered before a promotion do not compete"
        )
    if _sha(mine) != d.data:
        return (
            f"trained on superseded data (sha256 {_sha(mine)[:12]}, first registered in v"
            f"{d.first_seen.get(_sha(mine))}, before the current data {d.data[:12]} in v"
            f"{d.first_seen.get(d.data)})"
        )
    if _recorded(mine)[0] != d.protocol:
        champ = d.versions.get(d.target)
        theirs = _recorded(champ)[1] if champ is not None else UNRECORDED
        return (
            f"its held-out protocol ({_recorded(mine)[1]}) differs from the champion's ({theirs}), so the "
            "numbers do not compare; `python -m pipeline.register --promote` switches protocols"
        )
    if d.rule != DEFAULT_METRIC and score(mine, d.rule) is None:
        return (
            f"the champion is chosen by {LABELS[d.rule]} (registered-model tag {CHAMPION_METRIC_TAG}) and "
            f"this version has no eval.{d.rule} tag"
        )
    context = CONTEXT_TAGS.get(d.rule)
    if d.horizon is not None and context and mine.tags.get(context) != d.horizon:
        if d.rule == "tracking_drift":
            return f"its tracking drift is at horizon {mine.tags.get(context)}, the champion's at {d.horizon}"
        return f"its {LABELS[d.rule]} is under protocol {mine.tags.get(context)}, the champion's {d.horizon}"
    return None


def explain(d: Decision, me: str, before: str | None, alias: str = CHAMPION) -> str:
    """Why version `me` holds the alias or not, after the alias moved from `before` to `d.target`."""
    mine, old = d.versions[me], d.versions.get(before) if before else None
    label = LABELS[d.rule] + (
        "" if d.rule == d.metric else f" ({LABELS[d.metric]}: no version on this data carries it)"
    )
    mine_score = fmt_number(score(mine, d.rule), ".6g")
    if d.target == me:
        if before is None:
            return f"first champion: {label} {mine_score}"
        if before == me:
            return "already the champion"
        if old is not None and _sha(old) != _sha(mine):
            return (
                f"new data (sha256 {_sha(mine)[:12]}, first registered after champion v{before}'s "
                f"{_sha(old)[:12]}): metrics are not comparable, champion moves to the newest data"
            )
        if old is None or _recorded(old)[0] != d.protocol or score(old, d.rule) is None:
            return f"{label} {mine_score}: champion v{before} has no comparable {d.rule}, this version has"
        return f"{label} {mine_score} beats champion v{before}'s {fmt_number(score(old, d.rule), '.6g')}"
    if d.target is None:
        return f"no {alias} (no version has a held-out MSE)"
    why = _why_not(d, mine)
    if why:
        return f"registered without {alias}: {why}; {alias} is v{d.target}"
    champ = fmt_number(score(d.versions[d.target], d.rule), ".6g")
    return (
        f"registered without {alias}: {label} {mine_score} does not beat champion v{d.target}'s {champ} on "
        "the same data and protocol"
    )


# ------------------------------------------------------------------------------- the registry side


def champion_metric(tags: dict, name: str = "") -> str:
    """The champion rule in a registered model's tags (`champion_metric`, default heldout_mse)."""
    metric = tags.get(CHAMPION_METRIC_TAG) or DEFAULT_METRIC
    if metric not in SELECT_METRICS:
        log.warning(
            "%s: tag %s=%r is not one of %s; using %s",
            name,
            CHAMPION_METRIC_TAG,
            metric,
            SELECT_METRICS,
            DEFAULT_METRIC,
        )
        return DEFAULT_METRIC
    return metric


def read_promotion(tags: dict, alias: str = CHAMPION) -> dict | None:
    try:
        promo = json.loads(tags.get(promotion_tag(alias)) or "null")
    except ValueError:
        return None
    return promo if isinstance(promo, dict) and promo.get("version") else None


def current(client: MlflowClient, name: str, alias: str = CHAMPION) -> Decision:
    """The decision for the registry as it is now (rule, promotion, versions and alias read afresh)."""
    tags = client.get_registered_model(name).tags
    anchor = store.alias_version(client, name, alias)
    return decide(
        store.all_versions(client, name), champion_metric(tags, name), anchor, read_promotion(tags, alias)
    )


def settle_champion(
    client: MlflowClient, name: str, alias: str = CHAMPION, max_rounds: int = 50
) -> str | None:
    """Point `alias` at the decided version; loop until a fresh read agrees.

    MLflow has no compare-and-set for aliases. Every registering process ends with a read in which the
    alias already equals the version decided from what it sees, and every version exists before its
    creator's reads; so after the last read of all no write follows. The rule, the promotion and the
    versions are read afresh in every round.
    """
    for _ in range(max_rounds):
        target = current(client, name, alias).target
        held = store.alias_version(client, name, alias)
        if target is None or held == target:
            return held
        try:
            client.set_registered_model_alias(name, alias, target)
        except Exception as e:  # noqa: BLE001 - a REST error via a server, SQLAlchemy's on a SQL store
            if not _is_alias_write_conflict(e):
                raise
            log.info("%s: alias %r was written concurrently (%s); reading it again", name, alias, e)
    raise TrackingError(f"{name}: alias {alias!r} kept changing under concurrent registrations; run again")


def _is_alias_write_conflict(error: Exception) -> bool:
    """Another process set the same alias at the same moment: a SQL store rejects the second insert with a
    unique-constraint error. Nothing is lost; the next round of `settle_champion` reads the alias again."""
    text = str(error)
    return "UNIQUE constraint failed" in text or "IntegrityError" in text or "Duplicate entry" in text


def change_rule(client: MlflowClient, name: str, metric: str, by: str) -> str | None:
    """Set the registered model's champion rule; a change of an existing model's rule is appended to
    `champion_rule_history` and returned as a sentence (None when nothing changed)."""
    model = client.get_registered_model(name)
    old = model.tags.get(CHAMPION_METRIC_TAG)
    if old == metric:
        return None
    client.set_registered_model_tag(name, CHAMPION_METRIC_TAG, metric)
    if not store.all_versions(client, name) or (old is None and metric == DEFAULT_METRIC):
        return None  # a new model's first rule, or the default written down: nothing re-ranks
    old = old or DEFAULT_METRIC
    try:
        history = json.loads(model.tags.get(RULE_HISTORY_TAG) or "[]")
    except ValueError:
        history = []
    history.append({"from": old, "to": metric, "at": _now(), "by": by})
    client.set_registered_model_tag(name, RULE_HISTORY_TAG, json.dumps(history[-20:]))
    return f"champion rule changed from {old} to {metric} by {by}, the versions re-ranked under it"


def promote(uri: str, name: str, version: str, reason: str = "", alias: str = CHAMPION) -> dict:
    """Move `alias` to `version` by hand; who, why and when go into its `champion_decision` tag.

    Returns {"model_name", "version", "previous_champion", "champion_version", "reason"}."""
    client = store.client(uri)
    version = str(version)
    versions = {str(v.version): v for v in store.all_versions(client, name)}
    if version not in versions:
        have = ", ".join(sorted(versions, key=int)) or "none"
        raise TrackingError(f"{name} has no version {version} in {redact_url(uri)} (versions: {have})")
    if score(versions[version], DEFAULT_METRIC) is None:
        raise TrackingError(f"{name} v{version} has no finite heldout_mse tag: it cannot hold {alias!r}")
    before = store.alias_version(client, name, alias)
    record = {"version": version, "after": str(max(map(int, versions))), "by": whoami(), "at": _now()}
    record.update(reason=reason, previous=before)
    text = f"promoted by {record['by']} at {record['at']}" + (f": {reason}" if reason else "")
    text += f" (was v{before})" if before and before != version else ""
    client.set_registered_model_tag(name, promotion_tag(alias), json.dumps(record))
    client.set_model_version_tag(name, version, "champion_decision", text)
    after = settle_champion(client, name, alias)
    return {
        "model_name": name,
        "version": version,
        "previous_champion": before,
        "champion_version": after,
        "reason": text,
    }
