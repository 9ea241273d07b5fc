"""`pretrain_all --population`: one trial per dataset trains its whole search as stacked models
(pipeline.training.population), and its members come back as the trials they stand for.

A member keeps its TrialSpec's key, so selection, ensembles, `--resume` and a later job without
`--population` treat it as that trial. The ledger gets one file per shape group (its members' entries
inside, pipeline.job.outputs.Ledger); a member's model directory is `<trial checkpoint>/<member key>/`.
"""

from __future__ import annotations

from pipeline.job.records import REPORTED, PopulationSpec, TrialResult, TrialSpec, member_trial_id
from pipeline.training import search


def default_on(gpus_per_trial: float, cluster_gpus: float) -> bool:
    """The default of `--population`: on when trials get a GPU (a small model leaves most of it idle)."""
    return gpus_per_trial > 0 and cluster_gpus > 0


def make_populations(trials: list[TrialSpec], ready: dict) -> list[PopulationSpec]:
    """One population per dataset (each jump's model apart) holding its trials, in their order; the
    largest populations first, as trials go longest first."""
    by_dataset: dict[str, list[TrialSpec]] = {}
    for t in trials:
        by_dataset.setdefault(t.dataset, []).append(t)
    pops = []
    for name, members in by_dataset.items():
        keys = sorted(m.key for m in members)
        pops.append(
            PopulationSpec(name, members[0].sha256, _key(name, members[0].sha256, keys), tuple(members))
        )

    def cost(p: PopulationSpec) -> float:
        return sum(search.estimated_cost(m.train, ready[p.dataset].info) for m in p.members)

    return sorted(pops, key=lambda p: -cost(p))


def _key(dataset: str, sha256: str, member_keys: list[str]) -> str:
    return search.trial_key(dataset, sha256, {"population": member_keys})


def member_entries(spec: PopulationSpec, result: dict, head: dict) -> list[TrialResult]:
    """The ledger entries of a finished population's members, from its one result: each with its own
    metrics and curve, the population's node, device and times (`head`: trial_id, checkpoint_path,
    started_at, finished_at, wall_s), and its model's path inside the population's checkpoint."""
    reported = {m["key"]: m for m in result.get("members") or []}
    shared = {k: result.get(k) for k in REPORTED}
    root = str(head.get("checkpoint_path") or "").rstrip("/")
    entries = []
    for i, m in enumerate(spec.members):
        r = reported.get(m.key)
        if r is None or not root:
            continue  # not trained (a result without it): the trial is not recorded, so it runs again
        fields = {
            **shared,
            **{k: r[k] for k in REPORTED if k in r},
            **head,
            "key": m.key,
            "dataset": m.dataset,
            "sha256": m.sha256,
            "config": dict(m.train),
            "trial_id": member_trial_id(head["trial_id"], i),
            "checkpoint_path": f"{root}/{m.key}",
            "population": {
                "trial": spec.key,
                "members": len(spec.members),
                "group": r.get("group"),
                "group_size": r.get("group_size"),
            },
        }
        entries.append(TrialResult(**fields))
    return entries


def record_groups(ledger, spec: PopulationSpec, entries: list[TrialResult], trial_id: str) -> None:
    """One ledger file per shape group, keyed by its members' keys (stable from run to run)."""
    groups: dict[int, list[TrialResult]] = {}
    for e in entries:
        groups.setdefault(e.population["group"], []).append(e)
    for g, members in sorted(groups.items()):
        key = search.trial_key(
            spec.dataset, spec.sha256, {"population_group": sorted(e.key for e in members)}
        )
        head = {"dataset": spec.dataset, "sha256": spec.sha256, "trial_id": trial_id, "population": spec.key}
        ledger.record_group(key, {**head, "group": g}, members)


def members_of(spec) -> list[TrialSpec]:
    """The trials a Tune trial stands for: a population's members, or the trial itself."""
    return list(spec.members) if isinstance(spec, PopulationSpec) else [spec]


def shared_time(entries: list[TrialResult], field: str = "train_time_s") -> float:
    """Seconds of `field` (train_time_s, eval_time_s) over `entries`: a population's members share their
    group's steps and validations, so a group counts once (its longest member), a lone trial its own."""
    groups: dict[tuple, float] = {}
    alone = 0.0
    for e in entries:
        seconds = getattr(e, field) or 0.0
        if e.population:
            at = (e.population["trial"], e.trial_id.rsplit("-m", 1)[0], e.population["group"])
            groups[at] = max(groups.get(at, 0.0), seconds)
        else:
            alone += seconds
    return alone + sum(groups.values())
