"""TracIn by gradient inner products without per-sample gradients, against dattri 0.3's TracInAttributor
(vmap'd per-sample gradients, projection off) on the same checkpoints and samples."""

import pytest
import torch
from torch import nn

from gradaudit.integrations.attribution import tracin

dattri = pytest.importorskip("dattri")


def _model():
    return nn.Sequential(nn.Linear(5, 12), nn.Tanh(), nn.Linear(12, 3))


def _data(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g)


def _per_sample_loss(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y, reduction="none")


def test_tracin_equals_dattri():
    from dattri.algorithm.tracin import TracInAttributor
    from dattri.task import AttributionTask

    torch.manual_seed(0)
    model = _model()
    checkpoints = []
    for _ in range(2):  # two checkpoints, as along a training run
        for p in model.parameters():
            p.data.add_(torch.randn_like(p) * 0.3)
        checkpoints.append({k: v.clone() for k, v in model.state_dict().items()})
    weights = [0.1, 0.05]
    train, test = _data(10, 1), _data(4, 2)
    loader = lambda data, bs: torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*data), batch_size=bs)  # noqa: E731

    ours = tracin(model, checkpoints, weights, lambda: loader(train, 4), lambda: loader(test, 4), _per_sample_loss)

    def loss_func(params, data):
        x, y = data
        out = torch.func.functional_call(model, params, x.unsqueeze(0))
        return nn.functional.cross_entropy(out, y.unsqueeze(0))

    task = AttributionTask(loss_func=loss_func, model=model, checkpoints=checkpoints)
    attributor = TracInAttributor(task=task, weight_list=torch.tensor(weights), normalized_grad=False)
    attributor.projector_kwargs = None  # exact inner products, no random projection
    theirs = attributor.attribute(loader(train, 4), loader(test, 4))
    assert ours.shape == theirs.shape == (10, 4)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)
    assert ours.abs().max() > 1e-2  # not trivially zero
