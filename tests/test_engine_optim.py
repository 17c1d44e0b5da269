"""Tests for engine.train.optim.build_adamw: fused kernels, same updates as the reference."""

from __future__ import annotations

import torch

from beitdomain.config import OptimConfig
from beitdomain.engine.train.optim import build_adamw


def test_cpu_adamw_is_fused_and_steps_like_the_foreach_one() -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4))
    ref = [p.detach().clone().requires_grad_() for p in net.parameters()]
    start = [p.detach().clone() for p in net.parameters()]
    cfg = OptimConfig(lr=1e-2, weight_decay=0.05)
    groups = [{"params": list(net.parameters())[:2]}, {"params": list(net.parameters())[2:]}]
    opt = build_adamw(groups, cfg, torch.device("cpu"))
    assert opt.defaults["fused"] is True
    ref_opt = torch.optim.AdamW(
        [{"params": ref[:2]}, {"params": ref[2:]}],
        lr=1e-2,
        betas=tuple(cfg.betas),
        eps=cfg.eps,
        weight_decay=0.05,
        foreach=True,
    )
    for _ in range(3):
        x = torch.randn(8, 16)
        for params, o in ((list(net.parameters()), opt), (ref, ref_opt)):
            w1, b1, w2, b2 = params
            out = torch.nn.functional.linear(
                torch.nn.functional.gelu(torch.nn.functional.linear(x, w1, b1)), w2, b2
            )
            out.square().mean().backward()
            o.step()
            o.zero_grad(set_to_none=True)
    for p, q in zip(net.parameters(), ref):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)
    # The updates moved every tensor (the comparison is not between two untouched copies).
    assert all(not torch.equal(p.detach(), s) for p, s in zip(net.parameters(), start))
