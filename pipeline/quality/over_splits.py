"""The quality report's part over split seeds: for each dataset measured on several splits, champion, recipe
and baseline as mean ± std, min - max and n (REPORT_DIR/over_splits.json and the report's table)."""

from __future__ import annotations

from pipeline.training.repeats import fmt_interval, fmt_range, interval

#: the intervals over split seeds, written when some dataset was measured on several splits
OVER_SPLITS_JSON = "over_splits.json"


def _ratio(a, b):
    return None if a is None or b in (None, 0) else a / b


def summarize(entries: list[dict], baseline_of: dict[str, str]) -> dict:
    """{dataset: {"split_seeds": [...], metric: {"champion", "recipe", "baseline", "ratio": interval}}} of
    each dataset with more than one report entry; `baseline_of` maps each metric to its baseline's key."""
    by_dataset: dict[str, list[dict]] = {}
    for e in entries:
        by_dataset.setdefault(e["dataset"], []).append(e)
    out = {}
    for dataset, es in by_dataset.items():
        if len(es) < 2:
            continue
        out[dataset] = {"split_seeds": [e.get("split_seed") for e in es]}
        for key, baseline in baseline_of.items():
            champion = [e["champion"].get(key) for e in es]
            recipe = [(e.get("recipe") or {}).get(key) for e in es]
            out[dataset][key] = {
                "champion": interval(champion),
                "recipe": interval(recipe),
                "baseline": interval(e["champion"].get(baseline) for e in es),
                "ratio": interval(_ratio(c, r) for c, r in zip(champion, recipe, strict=True)),
            }
    return out


def section(repeated: dict, labels: dict[str, str]) -> list[str]:
    """The report's "Over split seeds" section (no lines when no dataset was repeated); `labels` names each
    metric of `repeated` in the table, in its order."""
    if not repeated:
        return []
    lines = [
        "## Over split seeds",
        "",
        "Each split seed retrains on another train / validation / test cut of the episodes; mean ± sample "
        "std over the splits, then min - max; n: the splits measured (every interval in over_splits.json).",
        "",
        "| dataset | splits | metric | champion | recipe | baseline | champion / recipe | n "
        "| champion min - max | recipe min - max | baseline min - max |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for dataset, d in repeated.items():
        seeds = ",".join(str(s) for s in d["split_seeds"])
        for key, label in labels.items():
            c, r, b, ratio = (d[key][k] for k in ("champion", "recipe", "baseline", "ratio"))
            lines.append(
                f"| {dataset} | {seeds} | {label} | {fmt_interval(c)} | {fmt_interval(r)} | "
                f"{fmt_interval(b)} | {fmt_interval(ratio, '.3g')} | {c['n']} | {fmt_range(c)} | "
                f"{fmt_range(r)} | {fmt_range(b)} |"
            )
    return [*lines, ""]
