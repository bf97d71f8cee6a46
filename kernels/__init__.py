"""Triton kernels of GradAudit, installed as ``gradaudit.kernels``.

Importing this package imports triton. Set ``TRITON_INTERPRET=1`` before that import to run the
kernels on CPU tensors (tests do).
"""
