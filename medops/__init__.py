"""medops: an MLOps platform for medical imaging.

DICOM studies in; de-identified, versioned (DVC), checked (Great Expectations), trained (Keras),
gated, exported (ONNX) and served (Triton) out. Importing this package has no side effects and does
not import TensorFlow.
"""

__version__ = "0.1.0"
