"""The Ray job: the CLI, Tune trials wrapping Ray Train, placement, selection and the job's outputs."""
