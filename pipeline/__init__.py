"""The Ray job that pretrains invdyn models: datasets, simulation, training, Tune/Train, MLflow, export, evaluation."""
