"""Floor 3: thin bridges to the gradient tools the field uses (each an optional dependency):
``opacus`` (GradAudit's kernels as Opacus' per-sample norm sampler for ``nn.Linear`` in ghost clipping) and
``attribution`` (TracIn-style per-sample gradient inner products without materialising gradients)."""
