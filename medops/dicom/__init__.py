"""DICOM handling for medops: reading, pixel preprocessing, de-identification, synthetic exports.

numpy, pydicom and Pillow only: this package must import without TensorFlow, because Triton's
Python-backend stub and ``medops predict`` use the same preprocessing as training ingest. Import the
submodules you need (``medops.dicom.io``, ``.pixels``, ``.deid``, ``.synth``); this file imports
none of them, so importing the package costs nothing.
"""

# Changes whenever medops.dicom.pixels gives other numbers for the same file and settings (it is
# part of ingest's incremental fingerprint). Here, so that reading it imports neither pydicom nor
# Pillow. 2: large reductions average pixel blocks before the bilinear filter; a linear grayscale
# pipeline is computed in float32.
PREPROCESSING_VERSION = 2
