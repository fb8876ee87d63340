"""Ray Train driver and worker loop, MLflow tracking, Ray Serve deployment, job entrypoints, CLI.

The only folder that imports ray or mlflow (enforced by import-linter in `make test`).
"""
