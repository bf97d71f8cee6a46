"""gradaudit.grads (float32 statistics) against per-sample gradients materialised in float64 (one autograd.grad per sample):
padding with a mask, packed samples with cu_seqlens, transformers' Conv1D, a layer called twice, biases,
PEFT LoRA, frozen weights (activation gradients only) and ordinary weight gradients alongside."""

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from gradaudit.grads import covered_modules, per_sample_grads

VOCAB, D = 11, 6


class Toy(nn.Module):
    """Per-token layers only (no mixing across positions), so each sample's loss depends on its own tokens."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, D)
        self.a = nn.Linear(D, 8)
        self.c = Conv1D(5, 8)  # transformers' (nf = d_out, nx = d_in): weight 8 × 5
        self.shared = nn.Linear(5, 5, bias=False)  # called twice
        self.norm = nn.LayerNorm(5)
        self.head = nn.Linear(5, VOCAB)

    def forward(self, ids):
        h = torch.tanh(self.a(self.emb(ids)))
        h = self.shared(torch.tanh(self.shared(self.c(h))))
        return self.head(self.norm(h))


def _per_token_loss(logits, targets):
    return nn.functional.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1), reduction="none").view(targets.shape)


def _padded_batch(seed=0, b=4, t=7):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (b, t), generator=g)
    lengths = torch.tensor([7, 3, 5, 1])[:b]
    mask = torch.arange(t)[None, :] < lengths[:, None]
    return ids, torch.randint(0, VOCAB, (b, t), generator=g), mask


def _padded_losses(model, ids, targets, mask):
    tok = _per_token_loss(model(ids), targets) * mask
    return tok.sum(1) / mask.sum(1)  # each sample's mean over its own tokens; padding carries no gradient


def _materialised(model, losses, names):
    """{param name: (B, *shape)} float64 per-sample gradients, one autograd.grad per sample."""
    params = dict(model.named_parameters())
    out = {n: [] for n in names}
    for b in range(len(losses)):
        grads = torch.autograd.grad(losses[b], [params[n] for n in names], retain_graph=True, allow_unused=True)
        for n, g in zip(names, grads):
            out[n].append(torch.zeros_like(params[n]) if g is None else g)
    return {n: torch.stack(v) for n, v in out.items()}


def _check(stats, per_sample, refs, atol=1e-6):
    for name, layer in stats.layers.items():
        w, bias = f"{name}.weight", f"{name}.bias"
        g = per_sample[w].double()
        torch.testing.assert_close(layer.sq_norm.double(), (g**2).flatten(1).sum(1), rtol=1e-4, atol=atol)
        for k, ref in refs.items():
            torch.testing.assert_close(layer.dots[k].double(), (g * ref[w]).flatten(1).sum(1), rtol=1e-4, atol=atol)
        if bias in per_sample:
            gb = per_sample[bias].double()
            torch.testing.assert_close(layer.bias_sq_norm.double(), (gb**2).sum(1), rtol=1e-4, atol=atol)
            for k, ref in refs.items():
                torch.testing.assert_close(layer.bias_dots[k].double(), gb @ ref[bias], rtol=1e-4, atol=atol)
        else:
            assert layer.bias_sq_norm is None


def _refs(model, names, seed=1):
    g = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    return {k: {n: torch.randn(params[n].shape, generator=g, dtype=torch.float64) for n in names} for k in ("r1", "r2")}


@pytest.fixture
def model():
    torch.manual_seed(0)
    return Toy().double()


def test_padded_batch_equals_materialised_gradients(model):
    ids, targets, mask = _padded_batch()
    with per_sample_grads(model, mask=mask, references=(refs := _refs(model, _linear_params(model)))) as rec:
        _padded_losses(model, ids, targets, mask).sum().backward()
    stats = rec.result()
    assert sorted(stats.layers) == ["a", "c", "head", "shared"]
    assert stats.uncovered == ["emb.weight", "norm.bias", "norm.weight"]  # named, never dropped
    assert model.a.weight.grad is not None  # ordinary weight gradients alongside
    per_sample = _materialised(model, _padded_losses(model, ids, targets, mask), stats.covered)
    _check(stats, per_sample, refs)
    total = sum((per_sample[n].flatten(1) ** 2).sum(1) for n in stats.covered)
    torch.testing.assert_close(stats.sq_norm().double(), total, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(stats.dot("r2").double(),
                               sum((per_sample[n] * refs["r2"][n]).flatten(1).sum(1) for n in stats.covered), rtol=1e-4, atol=1e-6)


def test_packed_samples_with_cu_seqlens(model):
    ids, targets, mask = _padded_batch(seed=3)
    lengths = mask.sum(1)
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    cu[1:] = torch.cumsum(lengths, 0)
    packed_ids, packed_targets = ids[mask][None], targets[mask][None]  # (1, N): one packed sequence

    def losses():
        tok = _per_token_loss(model(packed_ids), packed_targets)[0]
        sample = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
        return torch.zeros(len(lengths), dtype=tok.dtype).index_add(0, sample, tok) / lengths

    with per_sample_grads(model, cu_seqlens=cu, references=(refs := _refs(model, _linear_params(model)))) as rec:
        losses().sum().backward()
    stats = rec.result()
    _check(stats, _materialised(model, losses(), stats.covered), refs)


def test_mean_reduced_loss_and_row_column_statistics(model):
    ids, targets, mask = _padded_batch(seed=5)
    refs = _refs(model, _linear_params(model))
    with per_sample_grads(model, mask=mask, references=refs, slices="r1", loss_reduction="mean") as rec:
        _padded_losses(model, ids, targets, mask).mean().backward()
    stats = rec.result()
    per_sample = _materialised(model, _padded_losses(model, ids, targets, mask), stats.covered)
    _check(stats, per_sample, refs)
    for name in ("a", "c", "shared"):  # rows = the weight's first dimension, Conv1D's (d_in, d_out) included
        g, r, s = per_sample[f"{name}.weight"], refs["r1"][f"{name}.weight"], stats.layers[name].slices
        torch.testing.assert_close(s.row_sq.double(), (g**2).sum(2), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(s.col_sq.double(), (g**2).sum(1), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(s.row_dot.double(), (g * r).sum(2), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(s.col_dot.double(), (g * r).sum(1), rtol=1e-4, atol=1e-6)


def test_frozen_model_gives_activation_gradients_only(model):
    """No parameter requires grad: every linear layer is covered, no weight gradient is computed."""
    ids, targets, mask = _padded_batch(seed=7)
    per_sample = _materialised(model, _padded_losses(model, ids, targets, mask), _linear_params(model))
    model.requires_grad_(False)
    with per_sample_grads(model, mask=mask) as rec:
        _padded_losses(model, ids, targets, mask).sum().backward()
    stats = rec.result()
    assert all(p.grad is None for p in model.parameters())
    assert stats.uncovered == ["emb.weight", "norm.bias", "norm.weight"]
    _check(stats, per_sample, {})


def test_lora_adapter_layers_are_covered():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = Toy().double()
    model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0, target_modules=["a", "head"]))
    for p in model.parameters():  # LoRA B starts at zero: move it so that A's gradient is not zero too
        if p.requires_grad:
            p.data.normal_()
    ids, targets, mask = _padded_batch(seed=9)
    with per_sample_grads(model, mask=mask, references=(refs := _refs(model, _trainable(model)))) as rec:
        _padded_losses(model, ids, targets, mask).sum().backward()
    stats = rec.result()
    assert sorted(stats.covered) == sorted(_trainable(model)) and stats.uncovered == []
    assert all(".lora_" in n for n in stats.layers)
    _check(stats, _materialised(model, _padded_losses(model, ids, targets, mask), stats.covered), refs)


def test_misuse_is_named(model):
    with pytest.raises(ValueError, match="not covered layers"):
        per_sample_grads(model, layers=["norm"])
    with pytest.raises(ValueError, match="has no gradient for"):
        per_sample_grads(model, references={"r": {}})
    with pytest.raises(ValueError, match="not both"):
        per_sample_grads(model, mask=torch.ones(2, 3), cu_seqlens=torch.tensor([0, 3]))
    ids, targets, mask = _padded_batch()
    with per_sample_grads(model, mask=mask) as rec:
        model(ids)  # no backward
    with pytest.raises(RuntimeError, match="received no gradient"):
        rec.result()


def _linear_params(model):
    return [f"{n}.{p}" for n, m in covered_modules(model).items() for p in ("weight", "bias") if getattr(m, p, None) is not None]


def _trainable(model):
    return [n for n, p in model.named_parameters() if p.requires_grad]


def test_merge_calls_groups_each_samples_rows():
    from gradaudit.grads.hooks import merge_calls

    x1, x2 = torch.arange(5.0)[:, None], 10 + torch.arange(4.0)[:, None]
    off1, off2 = torch.tensor([0, 2, 2, 5]), torch.tensor([0, 1, 3, 4])
    x, g, off = merge_calls([(x1, -x1, off1), (x2, -x2, off2)])
    assert off.tolist() == [0, 3, 5, 9]
    assert x[:, 0].tolist() == [0, 1, 10, 11, 12, 2, 3, 4, 13] and torch.equal(g, -x)


@pytest.mark.parametrize("lengths", [[5, 0, 1, 30, 2, 12, 25], [4, 4, 4], [20, 20], [20, 30]])
def test_routes_agree_with_materialised_gradients(lengths):
    """Equal lengths by the Gram route (views, dots by projection) or the direct kernel, mixed lengths by
    slice_stats, two references: against G_b materialised in float64."""
    from gradaudit.grads.routes import gram_norm_is_cheaper, norms_and_dots

    g = torch.Generator().manual_seed(len(lengths))
    d_in, d_out, n = 24, 16, sum(lengths)
    x, grad = torch.randn(n, d_in, generator=g), torch.randn(n, d_out, generator=g)
    refs = [torch.randn(d_out, d_in, generator=g) for _ in range(2)]
    offsets = torch.tensor([0] + lengths).cumsum(0)
    sq, dots = norms_and_dots(x, grad, offsets, refs)
    for b, (s, e) in enumerate(zip(offsets[:-1], offsets[1:])):
        gb = grad[s:e].double().T @ x[s:e].double()
        torch.testing.assert_close(sq[b].double(), (gb**2).sum(), rtol=1e-5, atol=1e-5)
        for k in range(2):
            torch.testing.assert_close(dots[k][b].double(), (gb * refs[k].double()).sum(), rtol=1e-5, atol=1e-4)
    assert gram_norm_is_cheaper(4, d_in, d_out) and not gram_norm_is_cheaper(20, d_in, d_out)  # both equal-length routes



@pytest.mark.gpu
@pytest.mark.parametrize("lengths", [[64] * 6, [300, 2, 129, 1000, 40]])
def test_routes_on_the_gpu_in_bf16(lengths):
    """The Gram, direct and mixed-length routes on CUDA in bf16, against float64 materialised gradients."""
    from gradaudit.grads.routes import norms_and_dots

    g = torch.Generator().manual_seed(0)
    d_in, d_out, n = 256, 384, sum(lengths)
    x, grad = torch.randn(n, d_in, generator=g), torch.randn(n, d_out, generator=g)
    ref = torch.randn(d_out, d_in, generator=g)
    offsets = torch.tensor([0] + lengths).cumsum(0)
    sq, (dot,) = norms_and_dots(x.cuda().bfloat16(), grad.cuda().bfloat16(), offsets, [ref.cuda()])
    xb, gb = x.bfloat16().double(), grad.bfloat16().double()
    for b, (s, e) in enumerate(zip(offsets[:-1], offsets[1:])):
        G = gb[s:e].T @ xb[s:e]
        assert abs(sq[b].item() - (G**2).sum().item()) <= 1e-2 * (G**2).sum().item()
        assert abs(dot[b].item() - (G * ref.double()).sum().item()) <= 2e-2 * (G.norm() * ref.norm()).item() / 10
