"""Prefect flows and their deployment: wiring only, every step is medops code.

- ``flows.training``: the training pipeline (``training_pipeline``), one task per stage;
- ``flows.serve``: serves it as a deployment (``python -m flows.serve``) for runs from the UI.
"""
