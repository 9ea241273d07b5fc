"""What the job prints: Tune's own output for a verbosity, the one line per finished trial with the job's
progress bar, and the filter of Ray's log lines that a successful job should not show."""

from __future__ import annotations

import logging
import os
import sys

from pipeline.training.config import TrainConfig

#: what a field left out of a trial's config means
_DEFAULTS = TrainConfig().to_dict()

#: Ray log records dropped on the driver: (logger, message start, why). Everything else Ray logs is kept.
QUIET_RAY_LINES = (
    (
        "ray._private.authentication.authentication_token_setup",
        "Token authentication is enabled for this Ray cluster",
        # a new local Ray turns token authentication on, as it should, and says so on every start; Ray
        # stays silent only when RAY_AUTH_MODE is set before `import ray` (its config is read then)
        "token authentication is the secure default the job wants; nothing for the user to do",
    ),
    (
        "ray.tune.utils.util",
        "Processing trial results took",
        # Tune times its own steps (`warn_if_slow`) and warns past 0.5 s, which a loaded 2-core machine
        # passes while trials train; the trials lose nothing, and the job reports their times itself
        "a hint for Tune's developers about its controller loop, not a fault of the job",
    ),
    (
        "ray.tune.utils.util",
        "The `",  # "The `process_trial_result` operation took 2.8 s, which may be a performance bottleneck."
        "the same timing hint for each of Tune's steps (warn_if_slow's only message that starts so)",
    ),
)


class _DropLines(logging.Filter):
    def __init__(self, starts: tuple[str, ...]):
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.starts)


def quiet_ray_logs() -> None:
    """Attach the QUIET_RAY_LINES filter to the loggers it names (once per logger)."""
    by_logger: dict[str, tuple[str, ...]] = {}
    for name, start, _why in QUIET_RAY_LINES:
        by_logger[name] = (*by_logger.get(name, ()), start)
    for name, starts in by_logger.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropLines) for f in logger.filters):
            logger.addFilter(_DropLines(starts))


def tune_verbosity(verbose: int) -> int:
    """Tune's `verbose` for the job's -v count, choosing Tune's output engine before Tune reads it.

    0: nothing from Tune (the job prints a line per trial). Tune's newer engine prints its configuration
    table and a final status table even at verbosity 0, so 0 takes the older engine, silent at 0.
    1 (-v): Tune's status table as it runs. 2 (-vv): every result as well.
    """
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0" if verbose <= 0 else "1"
    return max(0, min(int(verbose), 2))


class TrialProgress:
    """One line per finished (or failed) trial on stdout, under one bar for the job when the bar's stream
    is a terminal (tqdm's `disable=None`): a log file gets the lines and no carriage-return frames."""

    def __init__(self, total: int, *, varying: list[str], nodes: int = 1):
        self.total, self.varying, self.nodes = total, varying, nodes
        self.finished = self.failed = 0
        self.bar = None

    def open(self) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=self.total, desc="trials", unit="trial", disable=None, leave=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def point(self, train: dict) -> str:
        return ", ".join(f"{k}={config_value(train, k)}" for k in self.varying)

    def finished_line(self, dataset: str, train: dict, result: dict, wall_s: float) -> str:
        self.finished += 1
        mse = result.get("heldout_mse")
        mse_text = f"{mse:.4g}" if isinstance(mse, int | float) else "-"
        where = f" on {result.get('node_ip')}" if self.nodes > 1 else ""
        return self._emit(
            dataset, train, f"held-out MSE {mse_text}, {_epochs(result.get('epochs'))}, {wall_s:.0f} s{where}"
        )

    def failed_line(self, dataset: str, train: dict, error: str) -> str:
        self.failed += 1
        return self._emit(dataset, train, f"FAILED: {error}")

    def warning_line(self, text: str) -> str:
        """A warning about a trial, on stderr (above the bar when there is one)."""
        line = f"warning: {text}"
        if self.bar is None:
            print(line, file=sys.stderr, flush=True)
        else:
            self.bar.write(line, file=sys.stderr)
        return line

    def _emit(self, dataset: str, train: dict, what: str) -> str:
        point = self.point(train)
        head = f"[{self.finished}/{self.total} done, {self.failed} failed] {dataset}"
        line = f"{head} ({point}): {what}" if point else f"{head}: {what}"
        if self.bar is None:
            print(line, flush=True)
            return line
        self.bar.write(line, file=sys.stdout)
        self.bar.update()
        sys.stdout.flush()
        return line


def varying_fields(configs: list[dict]) -> list[str]:
    """The config fields whose values differ between trials: what names a trial's search point."""
    keys = sorted({k for c in configs for k in c})
    return [k for k in keys if len({repr(config_value(c, k)) for c in configs}) > 1]


def config_value(train: dict, key: str):
    """A field of a trial's config; one left out (a one-step trial's `jump`, kept out of its key) is the
    TrainConfig default."""
    return train[key] if key in train else _DEFAULTS.get(key)


def _epochs(n) -> str:
    return f"{n} epoch" if n == 1 else f"{n} epochs"
