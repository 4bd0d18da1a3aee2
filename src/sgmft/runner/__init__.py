"""Torch-free runners: :mod:`sgmft.runner.onnx_runner` predicts posts with a whole-post ONNX export.

Nothing in this package imports torch or transformers (``tests/test_export_post.py`` runs it in a
venv without them)."""
