"""Pipeline stages: each module has a typed config and a `run(...)` that the CLI, the pipeline and tests call."""
