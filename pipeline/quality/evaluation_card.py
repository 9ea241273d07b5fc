"""What an evaluation writes beside a model: params.json's "evaluation" section, the card's "Evaluation"
section, and the table `python -m pipeline.evaluate` prints."""

from __future__ import annotations

from pathlib import Path

from pipeline.quality.metrics import HEADLINE, fmt_number


def card_section(result: dict) -> dict:
    """What goes into params.json["evaluation"]: the headline metrics, drift curves and provenance."""
    keep = (
        *HEADLINE,
        "horizon",
        "dataset",
        "part",
        "heldout",
        "heldout_transitions",
        "heldout_episodes",
        "env_id",
        "reference",
        "physics_reason",
        "per_dim_mse",
        "per_dim_r2",
        "drift_per_step",
        "baseline_drift_per_step",
        "closed_loop",
        "closed_loop_reason",
        "closed_loop_steps_per_s",
    )
    return {k: result.get(k) for k in keep if k in result}


def attach_evaluation(model_dir, result: dict) -> Path:
    """Write `result` into the model directory's params.json ("evaluation"), its R² figure and its model
    card, atomically.

    The weights file is copied byte for byte (its checksum in params.json stays valid); readers see the
    old directory or the new one, never a mix.
    """
    import shutil

    from invdyn._files import atomic_dir, write_json
    from invdyn.model_dir import CARD_FILE, PARAMS_FILE, card_figures, read_params
    from pipeline.training.figures import card_figures as draw_figures

    model_dir = Path(model_dir)
    params = read_params(model_dir / PARAMS_FILE)
    params["evaluation"] = card_section(result)
    if "closed_loop" in result:  # the contract's place: metrics.closed_loop (rows, or null with its reason)
        params.setdefault("metrics", {})["closed_loop"] = result["closed_loop"]
        params["metrics"]["plan_return"] = result.get("plan_return")
    # the evaluation's R² replaces training's (the same held-out rows, unless the data changed)
    figures = draw_figures(
        per_dim_r2=result.get("per_dim_r2"),
        name=params.get("name", ""),
        closed_loop=result.get("closed_loop"),
    )
    with atomic_dir(model_dir) as tmp:
        for item in model_dir.iterdir():
            if item.name not in (PARAMS_FILE, CARD_FILE, *figures) and item.is_file():
                shutil.copy2(item, tmp / item.name)
        for name, png in figures.items():
            (tmp / name).write_bytes(png)
        write_json(tmp / PARAMS_FILE, params)
        (tmp / CARD_FILE).write_text(model_card_with_evaluation(params, card_figures(tmp)))
    return model_dir


def model_card_with_evaluation(params: dict, figures=()) -> str:
    """invdyn's model card (linking `figures`) plus an "Evaluation" section (action and MuJoCo metrics on the
    part evaluated: test or validation episodes)."""
    from invdyn.model_dir import model_card

    card = model_card(params, figures).rstrip("\n")
    ev = params.get("evaluation") or {}
    lines = [
        "",
        "",
        "## Evaluation",
        "",
        f"On `{ev.get('dataset')}`, {ev.get('heldout')}: {ev.get('heldout_transitions')} transitions, "
        f"{ev.get('heldout_episodes')} episodes. Physics in `{ev.get('env_id') or 'n/a'}`, "
        f"horizon {ev.get('horizon')}"
        + (f" ({ev['physics_reason']})" if ev.get("physics_reason") else "")
        + ".",
        "",
        "| metric | model | mean-action baseline | recorded action (floor) |",
        "|---|---|---|---|",
        f"| action MSE | {fmt_number(ev.get('heldout_mse'))} | {fmt_number(ev.get('baseline_mse'))} | 0 |",
        f"| one-step state error (normalized RMSE) | {fmt_number(ev.get('one_step_error'))} | "
        f"{fmt_number(ev.get('one_step_baseline'))} | {fmt_number(ev.get('one_step_floor'))} |",
        f"| tracking drift at H (normalized RMSE) | {fmt_number(ev.get('tracking_drift'))} | "
        f"{fmt_number(ev.get('tracking_baseline'))} | {fmt_number(ev.get('tracking_floor'))} |",
        "",
        *closed_loop_lines(ev),
    ]
    return card + "\n".join(lines)


def closed_loop_lines(ev: dict) -> list[str]:
    """The card's closed-loop section: the return an oracle planner's plans deliver through the model."""
    from pipeline.quality.closed_loop import format_rows

    if "closed_loop" not in ev:
        return []
    head = ["### Closed loop: executing a planner's plans", ""]
    if not ev["closed_loop"]:
        return [*head, f"Not run: {ev.get('closed_loop_reason') or 'no rows'}.", ""]
    rows = ev["closed_loop"]
    note = rows[0].get("physics_note")
    text = (
        f"An oracle planner (the committed agent's mean action from the env's true state) plans the next "
        f"state; the model's action is executed; plan noise is σ · the dataset's observation std. "
        f"{rows[0]['episodes']} episodes of up to 1000 steps per row, the same reset seeds "
        f"({rows[0]['seeds']} seeds) for the model, the actor and the mean action."
    )
    if note:
        text += f" Note: {note}."
    return [*head, text, "", *format_rows(rows), ""]


def format_table(result: dict) -> str:
    """The human-readable summary printed without --json."""
    rows = [
        ("action MSE", result.get("heldout_mse"), result.get("baseline_mse"), None),
        (
            "action MSE / variance",
            result.get("heldout_mse_normalized"),
            result.get("baseline_mse_normalized"),
            None,
        ),
        (
            "one-step state error",
            result.get("one_step_error"),
            result.get("one_step_baseline"),
            result.get("one_step_floor"),
        ),
        (
            f"tracking drift at {result['horizon']}" if result.get("horizon") else "tracking drift",
            result.get("tracking_drift"),
            result.get("tracking_baseline"),
            result.get("tracking_floor"),
        ),
    ]
    out = [
        f"model {result.get('model')!r} on {result.get('dataset')!r}: {result.get('heldout')}, "
        f"{result.get('heldout_transitions')} transitions / {result.get('heldout_episodes')} episodes",
        f"{'metric':32} {'model':>12} {'mean action':>12} {'recorded':>12}",
    ]
    out += [
        f"{name:32} {fmt_number(m):>12} {fmt_number(b):>12} {fmt_number(f):>12}" for name, m, b, f in rows
    ]
    if result.get("physics_reason"):
        out.append(f"physics metrics: n/a ({result['physics_reason']})")
    r2 = ", ".join(fmt_number(v) for v in result.get("per_dim_r2") or [])
    out.append(f"per-dim R^2: {r2}")
    if result.get("closed_loop"):
        from pipeline.quality.closed_loop import format_rows

        out += [
            "",
            "closed loop (oracle plans executed through the model):",
            *format_rows(result["closed_loop"]),
        ]
    elif "closed_loop" in result:
        out.append(f"closed loop: n/a ({result.get('closed_loop_reason')})")
    return "\n".join(out)
