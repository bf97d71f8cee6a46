"""What capture needs to know of a batch: the selected weights (:class:`Target`) and where each sample's
positions are in every layer's input (:class:`Layout`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from gradaudit.errors import ModelError
from gradaudit.grads.hooks import true_positions


@dataclass(frozen=True)
class Target:
    """A selected weight: its qualified parameter name, the module, and the domain of its inputs
    ("language", "vision" or "projector")."""

    name: str
    module: nn.Linear
    domain: str


@dataclass
class Layout:
    """Where each sample's positions are, per domain, for one batch.

    For layer inputs shaped (R0, R1, d): ``keep[domain]`` (R0, R1) bool marks real positions, or is None
    when every position is real (vision patches); ``row_sample[domain]`` (R0,) int64 gives the sample of
    each row, non-decreasing. For inputs already packed, (N, d) as in Qwen2-VL's vision tower:
    ``flat_offsets[domain]`` (B+1,) int64 gives each sample's span. ``tail``: where the model computed its
    logits for the last ``tail`` positions only (capture sets it), an input with ``tail`` positions (the
    output head's) holds those positions.
    """

    num_samples: int
    keep: dict[str, torch.Tensor | None] = field(default_factory=dict)
    row_sample: dict[str, torch.Tensor] = field(default_factory=dict)
    flat_offsets: dict[str, torch.Tensor] = field(default_factory=dict)
    tail: int | None = None
    _packing: dict = field(default_factory=dict, repr=False)  # per (domain, shape, device): row index, offsets

    def _plan(self, domain: str, shape: tuple, device):
        key = (domain, shape, device)
        if key not in self._packing:
            if domain not in self.keep:
                raise ModelError(f"the batch layout has no '{domain}' positions; known: {sorted(self.keep)}")
            keep = self.keep[domain]
            rows = self.row_sample[domain]
            if keep is not None and self.tail is not None and shape[1] == self.tail < keep.shape[1]:
                keep = keep[:, -self.tail:]
            if (keep is not None and tuple(keep.shape) != shape) or len(rows) != shape[0]:
                expected = tuple(keep.shape) if keep is not None else (len(rows), "any")
                raise ModelError(f"a {domain} layer saw input rows/positions {shape}, but the batch layout "
                                 f"expects {expected}")
            per_row = torch.full((shape[0],), shape[1]) if keep is None else keep.sum(1).cpu()
            counts = torch.zeros(self.num_samples, dtype=torch.int64).index_add_(0, rows.cpu(), per_row)
            offsets = torch.zeros(self.num_samples + 1, dtype=torch.int64)
            offsets[1:] = torch.cumsum(counts, 0)
            index = None if keep is None or bool(keep.all()) else true_positions(keep, device)
            self._packing[key] = (index, offsets)
        return self._packing[key]

    def pack(self, domain: str, x: torch.Tensor, grad: torch.Tensor):
        """Packs real positions of x (R0, R1, d_in) or (N, d_in) and grad alike: returns x, grad (N, d)
        and offsets (B+1,) int64 on the CPU."""
        if x.dim() == 2:
            offsets = self.flat_offsets.get(domain)
            if offsets is None or int(offsets[-1]) != x.shape[0]:
                raise ModelError(f"a {domain} layer saw {x.shape[0]} packed positions, but the batch layout "
                                 f"gives {'none' if offsets is None else int(offsets[-1])}")
            return x, grad, offsets
        index, offsets = self._plan(domain, tuple(x.shape[:2]), x.device)
        x, grad = x.reshape(-1, x.shape[-1]), grad.reshape(-1, grad.shape[-1])
        if index is None:
            return x, grad, offsets
        return x.index_select(0, index), grad.index_select(0, index), offsets
