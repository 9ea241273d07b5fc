"""MLflow, touched only from here: the store, the per-trial logger, registration with the champion alias, export."""
