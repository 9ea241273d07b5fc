"""MLflow, touched only from here: the store, the per-trial logger, registration and the champion alias,
export."""
