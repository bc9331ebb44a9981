"""Encoders: model bundles, export from torch checkpoints, ONNX Runtime sessions, preprocessing.

Imports neither FAISS, HTTP nor Redis; the serving path (``encoder``, ``runtime``) never imports torch.
"""
