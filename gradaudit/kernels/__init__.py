"""Floor 0: the Triton kernels of GradAudit (``gradaudit.kernels``).

Importing this package imports triton. Set ``TRITON_INTERPRET=1`` before that import to run the
kernels on CPU tensors (tests do). Callers reach them through ``gradaudit.ops``' backend table.
"""
