"""AdamR: equals Adam at reg = 0, shrinks the delta at reg > 0, works with transformers' Trainer."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from pruning.adamr import AdamR


def _problem(seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2))
    x = torch.randn(64, 8)
    y = torch.randn(64, 2)
    return net, x, y


def _train(net: nn.Module, opt: torch.optim.Optimizer, x, y, steps: int) -> list[torch.Tensor]:
    snaps = []
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.mse_loss(net(x), y).backward()
        opt.step()
        snaps.append(torch.cat([p.detach().flatten().clone() for p in net.parameters()]))
    return snaps


@pytest.mark.parametrize("foreach", [False, None])
def test_reg_zero_matches_adam_step_for_step(foreach: bool | None) -> None:
    net_a, x, y = _problem()
    net_b, _, _ = _problem()
    a = _train(net_a, AdamR(net_a.parameters(), lr=1e-2, betas=(0.8, 0.99), eps=1e-7), x, y, 25)
    adam = torch.optim.Adam(
        net_b.parameters(), lr=1e-2, betas=(0.8, 0.99), eps=1e-7, foreach=foreach
    )
    b = _train(net_b, adam, x, y, 25)
    for sa, sb in zip(a, b, strict=True):
        if foreach is False:  # same arithmetic as the single-tensor Adam: bit-exact
            assert torch.equal(sa, sb)
        else:
            assert torch.allclose(sa, sb, rtol=0, atol=1e-6)


@pytest.mark.parametrize("norm", ["l2", "l1"])
def test_reg_shrinks_the_delta_norm(norm: str) -> None:
    norms = {}
    for reg in (0.0, 0.05):
        net, x, y = _problem()
        ref = [p.detach().clone() for p in net.parameters()]
        _train(net, AdamR(net.parameters(), lr=1e-2, reg=reg, norm=norm), x, y, 100)
        pairs = zip(net.parameters(), ref, strict=True)
        norms[reg] = sum(float((p.detach() - r).norm() ** 2) for p, r in pairs) ** 0.5
    assert norms[0.05] < 0.8 * norms[0.0], norms


@pytest.mark.parametrize("norm", ["l2", "l1"])
def test_vbar_is_the_mean_over_every_parameter_with_a_gradient(norm: str) -> None:
    """One step by hand: a pulled group with small gradients and a reg = 0 group (a new
    head) with large ones; vbar is the mean of v_hat over both, as PAPER.md has it."""
    pulled, head = torch.nn.Parameter(torch.ones(1000)), torch.nn.Parameter(torch.zeros(10))
    lr, reg = 0.1, 0.5
    opt = AdamR(
        [{"params": [pulled], "reg": reg}, {"params": [head], "reg": 0.0}], lr=lr, norm=norm
    )
    opt.state[pulled]["reference"] = torch.zeros(1000)  # a delta of 1 everywhere
    pulled.grad, head.grad = torch.full((1000,), 1e-3), torch.full((10,), 10.0)
    opt.step()
    v_hat = torch.cat([pulled.grad**2, head.grad**2]).double()  # bias-corrected, step 1: g^2
    rate = lr * reg / (float(v_hat.mean()) ** 0.5 + 1e-8)  # 0.05 / 0.995: well below 1
    adam = lr  # the first Adam step is lr * sign(g)
    torch.testing.assert_close(pulled.detach(), torch.full((1000,), 1 - rate - adam))


def test_no_pull_while_every_gradient_has_been_zero() -> None:
    """vbar = 0 gives no scale: lr*reg/eps would send an L1 step 2e-5*0.1/1e-8 = 200 past
    the reference; instead nothing moves."""
    w = torch.nn.Parameter(torch.full((4,), 1e-3))
    opt = AdamR([w], lr=2e-5, reg=0.1, norm="l1", reference=[torch.zeros(4)])
    w.grad = torch.zeros(4)
    opt.step()
    assert torch.equal(w.detach(), torch.full((4,), 1e-3))


def test_explicit_reference_pulls_toward_it() -> None:
    net, x, y = _problem()
    target = [torch.zeros_like(p) for p in net.parameters()]
    opt = AdamR(net.parameters(), lr=1e-3, reg=1e3, reference=target)
    _train(net, opt, x, y, 5)
    # with a huge reg the L2 pull factor is capped at 1: every step lands on the
    # reference, then one Adam step of size ~lr moves away from it
    for p in net.parameters():
        assert float(p.abs().max()) < 2e-3


def test_bad_arguments() -> None:
    net, _, _ = _problem()
    with pytest.raises(ValueError, match="norm"):
        AdamR(net.parameters(), norm="l3")
    with pytest.raises(ValueError, match="reference has 1 tensors"):
        AdamR(net.parameters(), reference=[torch.zeros(1)])


@pytest.mark.parametrize(
    ("options", "says"),
    [
        ({"lr": float("nan")}, "lr must be a finite number >= 0"),
        ({"reg": -1.0}, "reg must be a finite number >= 0"),
        ({"reg": float("nan")}, "reg must be a finite number >= 0"),
        ({"eps": float("inf")}, "eps must be a finite number >= 0"),
        ({"betas": (0.9, 1.0)}, "betas must be two numbers in [0, 1)"),
        ({"norm": "L2"}, "norm must be 'l2' or 'l1', got 'L2'"),
    ],
)
def test_options_of_each_param_group_are_checked(options: dict, says: str) -> None:
    """In the constructor and in a group of their own (where a norm of "L2" ran the L1
    pull and a NaN reg was skipped, unannounced)."""
    net, _, _ = _problem()
    first, second = list(net[0].parameters()), list(net[2].parameters())
    with pytest.raises(ValueError, match=f"AdamR: {re.escape(says)}"):
        AdamR(net.parameters(), **options)
    with pytest.raises(ValueError, match=f"param group 1: {re.escape(says)}"):
        AdamR([{"params": first}, {"params": second, **options}], reg=0.1)


def test_a_group_added_later_is_pulled_toward_its_weights_at_that_time() -> None:
    net, x, y = _problem()
    opt = AdamR(net[0].parameters(), lr=1e-2, reg=0.5)
    added = [p.detach().clone() for p in net[2].parameters()]
    opt.add_param_group({"params": list(net[2].parameters())})  # was a KeyError at step()
    _train(net, opt, x, y, 3)
    ref = [opt.state[p]["reference"] for p in net[2].parameters()]
    assert all(torch.equal(r, a) for r, a in zip(ref, added, strict=True))
    with pytest.raises(ValueError, match="param group 2: norm"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))], "norm": "ridge"})
    assert len(opt.param_groups) == 2  # the refused group was not added


def test_works_as_the_optimizer_of_transformers_trainer(tmp_path) -> None:
    from transformers import Trainer, TrainingArguments

    class Reg(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 1)

        def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"loss": nn.functional.mse_loss(self.lin(x).squeeze(-1), labels)}

    torch.manual_seed(0)
    data = [{"x": torch.randn(4), "labels": torch.randn(())} for _ in range(16)]
    model = Reg()
    w0 = model.lin.weight.detach().clone()
    opt = AdamR(model.parameters(), lr=1e-2, reg=0.01)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        num_train_epochs=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        logging_strategy="no",
    )
    trainer = Trainer(model=model, args=args, train_dataset=data, optimizers=(opt, None))
    out = trainer.train()
    assert out.global_step == 4
    assert not torch.equal(model.lin.weight.detach(), w0)
    assert int(opt.state[model.lin.weight]["step"]) == 4
