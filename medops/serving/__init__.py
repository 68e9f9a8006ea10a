"""Serving on NVIDIA Triton: the model contract, model repositories, the embedded server, deploy.

Importing this package imports nothing heavy; ``medops.serving.contract`` in particular must stay
importable without TensorFlow or tritonclient (the Python-backend stubs import medops).
"""
