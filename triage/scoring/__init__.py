"""Scoring: the DenseNet-169 model, pixels to tensors, CAMs, and the worker."""
