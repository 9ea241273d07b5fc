"""The Ray job that pretrains invdyn models: datasets, simulation, training, Tune/Train, MLflow, export,
evaluation."""

# Simulated datasets are a source kind that pipeline.sim adds to pipeline.data's registry. Importing it here
# registers the kind for every entry point (the CLIs, the job's driver, Ray workers, evaluate) without
# importing MuJoCo: gymnasium is loaded only when a rollout runs.
import pipeline.sim  # noqa: E402, F401
