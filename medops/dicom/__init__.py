"""DICOM handling for medops: reading, pixel preprocessing, de-identification, synthetic exports.

numpy, pydicom and Pillow only: this package must import without TensorFlow, because Triton's
Python-backend stub and ``medops predict`` use the same preprocessing as training ingest. Import the
submodules you need (``medops.dicom.io``, ``.pixels``, ``.deid``, ``.synth``); this file imports
none of them, so importing the package costs nothing.
"""
