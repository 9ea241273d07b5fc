"""`python -m pipeline.evaluate`: the command for evaluation; the code lives in `pipeline.quality.evaluate`
(its CLI in `pipeline.quality.evaluate_cli`),
`--log-to-registry` in `pipeline.registry.register` (wired here: the registry sits above quality)."""

import sys

from pipeline.quality import evaluate_cli


def log_evaluation(model_uri: str, result: dict, mlflow_uri: str | None = None) -> dict:
    from pipeline.registry.register import log_evaluation as log  # MLflow is imported only when asked for

    return log(model_uri, result, mlflow_uri)


def main(argv=None) -> int:
    return evaluate_cli.main(argv, log_evaluation=log_evaluation)


if __name__ == "__main__":
    sys.exit(main())
