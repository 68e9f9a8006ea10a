"""Adapters to the tools medops operates: DVC, the Prefect server, and the demo that starts them."""
