"""What a `pretrain_all` job is asked to do: `JobConfig`, one field per command-line flag with its help (the
CLI is generated from it), plus the training and evaluation settings it passes on."""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.quality.evaluate import EvalConfig
from pipeline.quality.metrics import DEFAULT_METRIC, SELECT_METRICS
from pipeline.training.config import TrainConfig, TrainConfigError
from pipeline.training.repeats import parse_seeds

DEFAULT_OUT = "invdyn-out"
#: How a trial runs its TorchTrainer (pipeline.job.placement's module doc).
EXECUTORS = ("local", "train")
#: The TrainConfig fields the job takes as flags; `--search-space` varies any of them.
TRAIN_FLAGS = ("max_epochs", "patience", "batch_size", "seed")
#: How many of a dataset's best trials (by held-out MSE) a physics `--select-by` evaluates by default.
DEFAULT_TOP = 3


class JobConfigError(ValueError):
    """Flags that contradict each other (the CLI turns it into a usage error)."""


def _flag(default, text: str, **more):
    """A field with its command-line help (and choices / metavar)."""
    return field(default=default, metadata={"help": text, **more})


@dataclass
class JobConfig:
    """Every flag of `python -m pipeline.pretrain_all`; `train` and `evaluation` carry the settings the job
    passes to each trial's training and to the evaluation of its candidates."""

    # the medium-expert sets of the committed agents: D4RL-like data, better models than the open-loop `sim`
    # suite's in about the same minutes on 2 cores (bench/demo_default.md)
    datasets: str = _flag("sim-medium-expert", "comma-separated suites, names, minari:<id>, paths")
    search: bool = _flag(False, "grid hidden_dim {256,512,1024} x dropout {0,0.1,0.2}")
    search_space: str | None = _flag(
        None, "any grid over TrainConfig fields, e.g. '{\"lr\": [1e-3, 3e-4]}'", metavar="JSON"
    )
    cpus_per_trial: float | None = _flag(None, "CPUs of a trial (default: 1)")
    gpus_per_trial: float | None = _flag(
        None, "GPU (fraction) per trial (default: 1/4 when the cluster has GPUs)"
    )
    max_concurrent: int | None = _flag(
        None,
        "trials started at once; those that do not fit yet wait for a free slot or a node that joins "
        "(default: 16, or as many as the cluster fits if more; --executor train: a quarter more than fit)",
    )
    population: bool | None = _flag(
        None,
        "one trial per dataset trains all of its search points as stacked models, one per shape group "
        "(pipeline.training.population) (default: on when trials get a GPU)",
    )
    executor: str = _flag(
        "local",
        "local: each trial's TorchTrainer runs in Train's local mode in the Tune trial's process, reused "
        "from trial to trial; train: a Train worker process per trial (seconds of process start-up per "
        "trial; see pipeline.job.placement)",
        choices=EXECUTORS,
    )
    max_failures: int = _flag(2, "retries of a crashed trial")
    storage_path: str | None = _flag(
        None, "checkpoints and Tune state: a local dir, NFS or s3:// (default: DIR/ray)"
    )
    jumps: str = _flag(
        "1",
        "comma-separated k: train a_t = I(s_t, s_{t+k}) models; each k > 1 is its own model <name>@k<k>",
        metavar="K,K",
    )
    split_seeds: str | None = _flag(
        None,
        "run the whole job once per split seed, each into DIR/split-<s>/ (its trials, summary, models) with "
        "its train / validation / test episodes cut by seed s; only the FIRST seed's models are registered "
        "and exported; --report summarizes over the splits (default: one split, seeded by --seed)",
        metavar="S,S",
    )
    resume: bool = _flag(
        False, "skip trials DIR/trials/ records as finished (with --split-seeds: each DIR/split-<s>/trials/)"
    )
    out: str = _flag(DEFAULT_OUT, "output directory")
    download: bool = _flag(False, "download missing D4RL files")
    num_cpus: int | None = _flag(None, "CPUs of the local Ray this starts (default: all)")
    mlflow_uri: str | None = _flag(None, "default: $MLFLOW_TRACKING_URI, else sqlite:///DIR/mlflow.db")
    experiment: str | None = _flag(None, "MLflow experiment (default: the job name)")
    register: bool = _flag(True, "register each dataset's model (--no-register: track trials only)")
    mlflow: bool = _flag(True, "track trials in MLflow (--no-mlflow: no MLflow at all)")
    export: str | None = _flag(None, "write the registered champions as a bundle zip", metavar="PATH")
    report: str | None = _flag(
        None,
        "then write the quality report (python -m pipeline.report --with-recipe) of the chosen models to DIR",
        metavar="DIR",
    )
    report_recipe_epochs: int | None = _flag(
        None,
        "with --report: cap the epochs of the recipe trained for comparison (pipeline.report "
        "--recipe-max-epochs; default: its own early stop)",
        metavar="N",
    )
    verbose: int = _flag(
        0,
        "0: a line per finished trial and the summary; 1 (-v): also Tune's status table; 2 (-vv): also every "
        "result and each trial's own log",
        choices=(0, 1, 2),
    )
    # evaluation and selection (pipeline.job.selection)
    evaluate: bool = _flag(
        True,
        "evaluate the selected model on its held-out episodes (MuJoCo metrics where the dataset can be "
        "simulated) into its model card and registry tags (default: on)",
    )
    select_by: str = _flag(
        DEFAULT_METRIC,
        "metric that picks each dataset's model among its trials, and the registry's champion rule",
        choices=SELECT_METRICS,
    )
    select_top: int = _flag(
        DEFAULT_TOP,
        "with a physics --select-by: evaluate the best K trials by held-out MSE (0: all)",
        metavar="K",
    )
    ensemble: int = _flag(
        1,
        "K > 1: each dataset's model is an ensemble of its K best finished trials by the ranking rule (the "
        "selected one first); e.g. --search-space '{\"seed\": [0,1,2,3,4]}' gives seed members",
        metavar="K",
    )
    # the base training config of every trial (the TRAIN_FLAGS set; a search point overrides it)
    train: TrainConfig = field(default_factory=TrainConfig)
    # sample sizes of the evaluation (flags --eval-horizon, --eval-starts, --eval-samples)
    evaluation: EvalConfig = field(default_factory=EvalConfig)

    def validate(self) -> None:
        """Raise JobConfigError when flags contradict each other."""
        if self.select_by != DEFAULT_METRIC and not self.evaluate:
            raise JobConfigError(f"--select-by {self.select_by} needs the evaluation: drop --no-evaluate")
        ev = self.evaluation
        if self.ensemble < 1:
            raise JobConfigError(f"--ensemble must be >= 1 (1: a single model), got {self.ensemble}")
        self.seeds()
        if self.report_recipe_epochs is not None and self.report_recipe_epochs < 1:
            raise JobConfigError(f"--report-recipe-epochs must be >= 1, got {self.report_recipe_epochs}")
        if self.select_top < 0 or min(ev.horizon, ev.starts, ev.samples) < 1:
            raise JobConfigError(
                "--select-top must be >= 0 and --eval-horizon, --eval-starts, --eval-samples >= 1"
            )
        try:
            ev.validate()
        except ValueError as e:
            raise JobConfigError(f"--eval-closed-loop-*: {e}") from None
        if self.select_by == "plan_return" and ev.closed_loop_episodes == 0:
            raise JobConfigError(
                "--select-by plan_return needs the closed loop: --eval-closed-loop-episodes > 0"
            )

    def seeds(self) -> list[int] | None:
        """`--split-seeds 0,1,2` -> [0, 1, 2] (None without the flag); bad input -> JobConfigError."""
        if self.split_seeds is None:
            return None
        try:
            return parse_seeds(self.split_seeds)
        except TrainConfigError as e:
            fix = "" if "(0,1,2)" in str(e) else "; give each split seed once, e.g. --split-seeds 0,1,2"
            raise JobConfigError(f"{e}{fix}") from None
