"""The guide's pictures of the MLflow UI (runs table, learning curve, registered champion; docs/img/, shown
by README.md and docs/mlflow.md), taken with headless Chromium from a real job's store:
`python tools/mlflow_screenshots.py [--out JOB_DIR]`. They show the test figures first, as the cards do.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.registry.store import experiment_url  # noqa: E402 - the repository's own code, by path

DATASETS = ("sim-hopper-random-v0", "sim-halfcheetah-random-v0")
VIEWPORT = {"width": 1400, "height": 900}
MAX_BYTES = 300_000  # an image larger than this is re-encoded with a palette
#: the runs table's score columns: the test figures, which the cards and `invdyn list` lead with
SCORES = ("test_mse", "test_r2")
CURVES = "^(val_mse|train_loss)$"  # the metric-chart filter takes a regular expression
# scroll the nearest scrolling box above an element so that the element's row is its first visible one
SCROLL_ROW_TO_TOP = """cell => {
  const row = cell.closest("[role=row], tr") || cell;
  for (let box = row.parentElement; box; box = box.parentElement) {
    if (box.scrollHeight > box.clientHeight + 1 && getComputedStyle(box).overflowY !== "visible") {
      box.scrollTop += row.getBoundingClientRect().top - box.getBoundingClientRect().top;
      return;
    }
  }
}"""


def run_job(root: Path) -> Path:
    """A small real job: simulated data (a few thousand transitions), 20 epochs, two widths per dataset."""
    out = root / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_ADDRESS"))}
    # its own caches and small datasets: the user's are left alone and the job takes about a minute
    env.update(INVDYN_HOME=str(root / "home"), D4RL_DATASET_DIR=str(root / "d4rl"))
    env.update(INVDYN_SIM_TRANSITIONS="8000", PYTHONPATH=str(REPO))
    cmd = [
        sys.executable,
        "-m",
        "pipeline.pretrain_all",
        "--datasets",
        ",".join(DATASETS),
        "--max-epochs",
        "20",
        "--search-space",
        '{"hidden_dim": [64, 256]}',
        "--out",
        str(out),
    ]
    print("running:", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def ui_for(tracking_uri: str, log: Path):
    """The base address of an MLflow UI on `tracking_uri`: the server itself, or one started here."""
    if tracking_uri.startswith(("http://", "https://")):
        yield tracking_uri.rstrip("/")
        return
    port = free_port()
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--backend-store-uri", tracking_uri, "--workers", "1"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while not _answers(f"{base}/health"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"mlflow server did not start; its log: {log}")
            time.sleep(0.5)
        yield base
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # its own process group: the server and its workers
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def rest(base: str, endpoint: str, body: dict | None = None, **query) -> dict:
    url = f"{base}/api/2.0/mlflow/{endpoint}" + ("?" + urllib.parse.urlencode(query) if query else "")
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def what_to_show(base: str, job: dict) -> dict:
    """The experiment id, and the first dataset's champion: model name, version, its trial run."""
    exp = rest(base, "experiments/get-by-name", experiment_name=job["job"])["experiment"]
    dataset = job["datasets"][0]
    name = "invdyn-" + dataset
    version = rest(base, "registered-models/alias", name=name, alias="champion")["model_version"]
    return {
        "experiment_id": exp["experiment_id"],
        "dataset": dataset,
        "model": name,
        "version": version["version"],
        "run_id": version["run_id"],
    }


def close_assistant(page) -> None:
    """MLflow opens its chat assistant beside the page on a first visit: close it if it is there."""
    from playwright.sync_api import Error as PlaywrightError

    with contextlib.suppress(PlaywrightError):  # a timeout: no assistant this time
        page.locator('[data-component-id="mlflow.assistant.chat_panel.close"]').click(timeout=4000)


def runs_table_state(base: str, show: dict) -> dict:
    """The runs table as the guide shows it (MLflow keeps it per experiment in the browser's storage):
    the dataset runs expanded, with the scores and the width of each trial as columns."""
    body = {"experiment_ids": [show["experiment_id"]], "max_results": 1000}
    runs = rest(base, "runs/search", body).get("runs", [])
    parents = [r["info"]["run_id"] for r in runs if "mlflow.parentRunId" not in _tags(r)]
    return {
        "selectedColumns": [f"metrics.`{m}`" for m in SCORES] + ["params.`hidden_dim`", "tags.`champion`"],
        "runsExpanded": dict.fromkeys(parents, True),
    }


def _tags(run: dict) -> dict:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


def shoot_runs(page, base: str, show: dict, path: Path) -> None:
    """(a) The runs table: dataset runs expanded to their trials, with the numbers that matter."""
    key = f'MLflowLocalStorage-1.1-ExperimentPage-["{show["experiment_id"]}"]-ReactComponentState'
    page.goto(base)
    page.evaluate("([k, v]) => localStorage.setItem(k, v)", [key, json.dumps(runs_table_state(base, show))])
    page.goto(experiment_url(base, show["experiment_id"]))
    page.get_by_role("link", name=show["dataset"], exact=True).wait_for()
    close_assistant(page)
    # the state took: nested trial rows and the chosen columns are there (else MLflow changed its format)
    page.get_by_role("link", name=f"{show['dataset']}/", exact=False).first.wait_for()
    page.get_by_role("columnheader", name=SCORES[0]).first.wait_for()
    # wide enough for a trial's full name and a score's digits (MLflow does not restore stored widths)
    for column in ("attributes.`Run Name`", *(f"metrics.`{m}`" for m in SCORES)):
        fit_width(page, column)
    page.mouse.move(VIEWPORT["width"] - 50, VIEWPORT["height"] - 50)  # no hover highlight in the picture
    page.wait_for_timeout(500)
    page.screenshot(path=str(path))


def fit_width(page, col_id: str) -> None:
    """Fit a runs-table column to its contents: a double click on its edge, as a user would."""
    page.locator(f'.ag-header-cell[col-id="{col_id}"] .ag-header-cell-resize').first.dblclick()


def shoot_curve(page, base: str, show: dict, path: Path) -> None:
    """(b) The champion trial's learning curves over the training step (its Model metrics tab)."""
    route = f"/#/experiments/{show['experiment_id']}/runs/{show['run_id']}/model-metrics"
    page.goto(f"{base}{route}?workflowType=machine_learning")
    card = '[data-component-id="fullscreen_button_chartcard"]'  # one per chart
    page.locator(card).first.wait_for()
    close_assistant(page)
    page.get_by_placeholder("Search metric charts").fill(CURVES)
    page.wait_for_function("sel => document.querySelectorAll(sel).length === 2", arg=card)
    page.locator("svg .scatterlayer path.js-line").nth(1).wait_for()  # both charts have drawn a line
    page.mouse.move(VIEWPORT["width"] - 50, VIEWPORT["height"] - 50)  # no hover highlight in the picture
    page.wait_for_timeout(500)
    page.screenshot(path=str(path), clip={"x": 0, "y": 0, "width": VIEWPORT["width"], "height": 640})


def shoot_model(page, base: str, show: dict, path: Path) -> None:
    """(c) The champion version: alias, source run link, and the tags it was registered with."""
    route = f"/#/models/{show['model']}/versions/{show['version']}"
    page.goto(f"{base}{route}?workflowType=machine_learning")
    page.get_by_text("Source Run").wait_for()
    close_assistant(page)
    page.get_by_text("@ champion").or_(page.get_by_text("champion", exact=True)).first.wait_for()
    # the tag table scrolls inside a box of a few rows: start it at the test figures (test_baseline_mse first)
    page.get_by_text("test_baseline_mse", exact=True).first.evaluate(SCROLL_ROW_TO_TOP)
    page.wait_for_timeout(500)
    page.screenshot(path=str(path))


def shrink(path: Path) -> None:
    """Keep an image small: a 256-colour palette when the plain PNG is over the budget."""
    from PIL import Image

    with Image.open(path) as image:
        image = image.convert("RGB")
        image.save(path, optimize=True)
        if path.stat().st_size > MAX_BYTES:
            image.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
    print(f"wrote {path} ({path.stat().st_size // 1000} kB)", flush=True)


def take(job_dir: Path, img_dir: Path, chromium: str) -> None:
    """Open the job's store in the UI (a server of its own on 127.0.0.1, stopped after) and shoot it."""
    from playwright.sync_api import sync_playwright  # imported here: --help works without the extra

    job = json.loads((job_dir / "job.json").read_text())
    img_dir.mkdir(parents=True, exist_ok=True)
    with ui_for(job["mlflow_uri"], job_dir / "mlflow-ui.log") as base, sync_playwright() as p:
        show = what_to_show(base, job)
        browser = p.chromium.launch(executable_path=chromium)
        try:
            page = browser.new_page(viewport=VIEWPORT)
            page.set_default_timeout(60_000)
            shots = (
                (shoot_runs, "mlflow-runs.png"),
                (shoot_curve, "mlflow-learning-curve.png"),
                (shoot_model, "mlflow-registered-model.png"),
            )
            for shoot, name in shots:
                shoot(page, base, show, img_dir / name)
                shrink(img_dir / name)
        finally:
            browser.close()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split(": `")[0].split()))
    parser.add_argument(
        "--out", type=Path, help="output folder of a finished pretrain_all job (default: run one)"
    )
    parser.add_argument("--img-dir", type=Path, default=REPO / "docs" / "img", help="where the PNGs go")
    parser.add_argument("--chromium", default="/usr/bin/chromium", help="the Chromium to drive")
    args = parser.parse_args(argv)
    if importlib.util.find_spec("playwright") is None:
        parser.error('needs Playwright: pip install -e ".[screenshots]" (it drives Debian\'s chromium)')
    if not Path(args.chromium).is_file():
        parser.error(f"no Chromium at {args.chromium}: apt-get install chromium, or pass --chromium PATH")
    if args.out is not None and not (args.out / "job.json").is_file():
        parser.error(f"{args.out} holds no job.json: pass the --out folder of a pretrain_all job")
    if args.out is not None:
        take(args.out, args.img_dir, args.chromium)
        return 0
    with tempfile.TemporaryDirectory(prefix="invdyn-screens-") as tmp:
        take(run_job(Path(tmp)), args.img_dir, args.chromium)
    return 0


if __name__ == "__main__":
    sys.exit(main())
