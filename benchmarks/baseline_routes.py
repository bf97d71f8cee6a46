"""Plain-PyTorch routes the benchmarks time beside gradaudit (shared by the GPU and CPU benchmarks)."""

import torch


def reduce_materialised(grads, ref):
    """Row/column statistics of materialised per-sample gradients (B, d_out, d_in), in fp32."""
    gf = grads.float()
    sq = gf * gf
    out = [sq.sum(2), sq.sum(1)]
    if ref is not None:
        gr = gf * ref
        out += [gr.sum(2), gr.sum(1)]
    return out


def gram_norms(xp, gp):
    """Row and column squared norms through batched Gram products: xp (B, T, d_in), gp (B, T, d_out)."""
    k = torch.bmm(xp, xp.transpose(1, 2))
    p = torch.bmm(gp, gp.transpose(1, 2))
    return [(torch.bmm(k, gp).float() * gp.float()).sum(1), (torch.bmm(p, xp).float() * xp.float()).sum(1)]
