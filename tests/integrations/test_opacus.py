"""GradAudit as Opacus' norm sampler in ghost clipping: the same per-sample norms and the same clipped,
noiseless update as Opacus' own route, on sequence inputs (B, T, d) and flat ones (B, d)."""

import contextlib

import pytest
import torch
from torch import nn

opacus = pytest.importorskip("opacus")

from gradaudit.integrations.opacus import use_gradaudit_norms  # noqa: E402


class Seq(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(6, 16)
        self.mid = nn.Linear(16, 16, bias=False)
        self.out = nn.Linear(16, 3)

    def forward(self, x):  # x (B, T, 6)
        h = torch.tanh(self.mid(torch.tanh(self.inp(x))))
        return self.out(h.mean(1))  # (B, 3): the last layer sees flat (B, d) inputs


def _step(ours: bool, clip: float, skip: bool = False, accumulated: list | None = None, device: str = "cpu"):
    """One private step with noise 0: (per-sample norms, the clipped, averaged gradient of each parameter).
    ``skip``: GradAudit's norms with the first backward computing no weight gradients; ``accumulated``
    receives the name of each parameter each time a backward accumulates its gradient."""
    from opacus import PrivacyEngine

    torch.manual_seed(0)
    model = Seq().to(device)
    for name, p in model.named_parameters():
        if accumulated is not None:
            p.register_post_accumulate_grad_hook(lambda _, name=name: accumulated.append(name))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 5, 6, generator=g) * 3, torch.randint(0, 3, (8,), generator=g)
    x, y = x.to(device), y.to(device)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with use_gradaudit_norms(skip_discarded_weight_grads=skip) if ours else contextlib.nullcontext():
        model, optimizer, criterion, loader = PrivacyEngine().make_private(
            module=model, optimizer=optimizer, data_loader=loader, criterion=nn.CrossEntropyLoss(),
            noise_multiplier=0.0, max_grad_norm=clip, grad_sample_mode="ghost", poisson_sampling=False)
        xb, yb = next(iter(loader))
        optimizer.zero_grad()
        criterion(model(xb), yb).backward()
        norms = model.get_norm_sample().detach().clone()
    return norms, {n: p.grad.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("clip", [1e3, 0.5])  # no sample clipped; most samples clipped
def test_same_norms_and_clipped_update_as_opacus(clip):
    theirs_norms, theirs = _step(False, clip)
    ours_norms, ours = _step(True, clip)
    torch.testing.assert_close(ours_norms, theirs_norms, rtol=1e-5, atol=1e-6)
    if clip < 1:
        assert (theirs_norms > clip).sum() >= 4  # the clipped case really clips
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("clip", [1e3, 0.5])
def test_the_first_backward_skips_the_weight_gradients_and_the_update_is_the_same(clip):
    theirs, ours = [], []
    theirs_norms, theirs_update = _step(False, clip, accumulated=theirs)
    ours_norms, ours_update = _step(True, clip, skip=True, accumulated=ours)
    names = {n for n, _ in Seq().named_parameters()}
    assert sorted(theirs) == sorted(list(names) * 2)  # Opacus: both backwards accumulate every weight's gradient
    assert sorted(ours) == sorted(names)  # here only the second
    torch.testing.assert_close(ours_norms, theirs_norms, rtol=1e-5, atol=1e-6)
    for name in theirs_update:
        torch.testing.assert_close(ours_update[name], theirs_update[name], rtol=1e-5, atol=1e-7)


@pytest.mark.gpu
@pytest.mark.parametrize("skip", [False, True])
def test_on_cuda_the_kernels_give_opacus_norms_and_update(skip):
    torch.backends.cuda.matmul.allow_tf32 = False
    theirs_norms, theirs = _step(False, 0.5, device="cuda")
    ours_norms, ours = _step(True, 0.5, skip=skip, device="cuda")
    torch.testing.assert_close(ours_norms, theirs_norms, rtol=1e-5, atol=1e-6)
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-7)


def test_opacus_sampler_is_put_back():
    from opacus.grad_sample import GradSampleModuleFastGradientClipping as GSM

    before = GSM.NORM_SAMPLERS[nn.Linear]
    with use_gradaudit_norms():
        assert GSM.NORM_SAMPLERS[nn.Linear] is not before
    assert GSM.NORM_SAMPLERS[nn.Linear] is before


class LeafThroughCode(nn.Module):
    """A frozen layer's output made to require grad (as transformers' enable_input_require_grads does) and
    passed to a trainable layer through plain code: no root leads the pruned pass to ``t1``."""

    def __init__(self):
        super().__init__()
        self.frozen = nn.Linear(6, 6).requires_grad_(False)
        self.t1, self.t2, self.out = nn.Linear(6, 16), nn.Linear(6, 16), nn.Linear(16, 3)

    def forward(self, x):
        e = self.frozen(x).requires_grad_(True)
        return self.out(torch.tanh(self.t1(torch.tanh(e))) + torch.tanh(self.t2(x)))


def test_a_module_the_pruned_pass_would_miss_stops_the_step_instead_of_clipping_wrongly():
    from opacus import PrivacyEngine

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    model = LeafThroughCode()
    with use_gradaudit_norms(skip_discarded_weight_grads=True):
        model, optimizer, criterion, loader = PrivacyEngine().make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data_loader=loader,
            criterion=nn.CrossEntropyLoss(), noise_multiplier=0.0, max_grad_norm=0.5, grad_sample_mode="ghost",
            poisson_sampling=False)
        xb, yb = next(iter(loader))
        with pytest.raises(RuntimeError, match=r"did not reach trainable module\(s\) \['Linear'\]"):
            criterion(model(xb), yb).backward()
