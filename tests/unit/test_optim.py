"""``raykd.train.optim.adamw``: torch's fused AdamW where every parameter allows it, the same
update as torch's default AdamW up to fp32 rounding, and the default kept where it does not."""

from __future__ import annotations

import torch
from torch import nn

from raykd.train.optim import adamw


def test_fused_on_the_cpu_and_the_same_update_as_torchs_default():
    torch.manual_seed(0)
    a = nn.Sequential(nn.Embedding(50, 8), nn.Linear(8, 50))
    b = nn.Sequential(nn.Embedding(50, 8), nn.Linear(8, 50))
    b.load_state_dict(a.state_dict())
    plain = torch.optim.AdamW(a.parameters(), lr=1e-2, weight_decay=0.1)
    fused = adamw(list(b.parameters()), lr=1e-2, weight_decay=0.1)
    assert fused.defaults["fused"] and not plain.defaults["fused"]
    start = [p.detach().clone() for p in b.parameters()]
    for step in range(5):
        x = torch.randint(0, 50, (4, 3), generator=torch.Generator().manual_seed(step))
        for model, opt in ((a, plain), (b, fused)):
            model(x).logsumexp(-1).mean().backward()
            opt.step()
            opt.zero_grad()
    for p, q, p0 in zip(a.parameters(), b.parameters(), start):
        assert (q - p0).abs().max() > 1e-3  # it trained
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)


def test_param_groups_and_the_state_dict_round_trip():
    model = nn.Linear(4, 4)
    groups = lambda: [{"params": [model.weight]}, {"params": [model.bias], "lr": 0.0}]  # noqa: E731
    opt = adamw(groups(), lr=1e-2)
    assert opt.defaults["fused"] and [len(g["params"]) for g in opt.param_groups] == [1, 1]
    bias = model.bias.detach().clone()
    model(torch.ones(2, 4)).sum().backward()
    opt.step()
    assert torch.equal(model.bias, bias)  # the group's own lr (0) holds
    again = adamw(groups(), lr=1e-2)
    again.load_state_dict(opt.state_dict())
    assert float(again.state_dict()["state"][0]["step"]) == 1.0


def test_parameters_without_the_kernel_keep_torchs_default():
    counts = nn.Parameter(torch.zeros(3, dtype=torch.int64), requires_grad=False)
    assert not adamw([nn.Parameter(torch.zeros(2)), counts], lr=1e-3).defaults["fused"]
    assert adamw([nn.Parameter(torch.zeros(2))], lr=1e-3).defaults["fused"]
