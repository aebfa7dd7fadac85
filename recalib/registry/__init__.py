"""The MLflow Model Registry (optional extra ``recalib[mlflow]``): models in and models out.

:mod:`.models` resolves a ``models:/`` URI to a registered version's model file (a job's input)
and registers a recalibrated model as a new version (a job's output, with its lineage tags), over
:mod:`.client`, the base: ``models:/`` URIs, the client with its bounded retries, and what
MLflow's errors mean. ``mlflow`` is imported only when a registry is used.
"""
