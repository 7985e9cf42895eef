"""Standalone inference runtime for glacier segmentation.

Everything in this package is rendered verbatim into the submission's ``solution.py``.
It may import only what the competition platform has: the Python standard library,
numpy, torch, cv2, tifffile and PIL (onnxruntime optionally, on the ONNX path). It must
stay Python 3.9 syntax and PyTorch 2.0 API, and never import the rest of this repository.
Modules import each other relatively so the rendered bundle can host them under a
private package name.
"""

__version__ = "0.1.0"
