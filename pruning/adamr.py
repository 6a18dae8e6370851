"""AdamR: Adam with a decoupled pull toward reference (pre-trained) weights (DAREx-L2).

Per step t, for every parameter W with reference W0:

    m <- b1 m + (1-b1) g ;  v <- b2 v + (1-b2) g^2
    vbar = mean over all elements of all parameters of v / (1 - b2^t)
           (every parameter with a gradient, those of reg = 0 groups too; no pull at 0)
    W <- W - lr * reg * (W - W0) / (sqrt(vbar) + eps)        (norm="l2")
    W <- W - lr * reg * sign(W - W0) / (sqrt(vbar) + eps)    (norm="l1")
    W <- W - lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps)   (the Adam step)

The L2 pull factor ``lr*reg/sqrt(vbar)`` is capped at 1 (never past the reference).
``reg = 0`` skips the pull, and the Adam step is the same arithmetic as
``torch.optim.Adam(foreach=False)``, so the two agree step for step. The pull keeps the
delta ``W - W0`` small, so DARE at a high rate hurts less afterwards.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch.optim import Optimizer


class AdamR(Optimizer):
    """Adam with a decoupled L2/L1 pull toward ``reference`` (default: the initial params)."""

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        reg: float = 0.0,
        norm: str = "l2",
        reference: Iterable[torch.Tensor] | None = None,
    ) -> None:
        defaults = {"lr": lr, "betas": betas, "eps": eps, "reg": reg, "norm": norm}
        _check_options(defaults, "AdamR")
        super().__init__(params, defaults)  # each group through add_param_group
        plist = [p for g in self.param_groups for p in g["params"]]
        refs = list(reference) if reference is not None else [p.detach() for p in plist]
        if len(refs) != len(plist):
            raise ValueError(f"reference has {len(refs)} tensors, params have {len(plist)}")
        for p, r in zip(plist, refs, strict=True):
            if tuple(r.shape) != tuple(p.shape):
                raise ValueError(f"reference shape {tuple(r.shape)} != param {tuple(p.shape)}")
            self.state[p]["reference"] = r.detach().to(p.device, p.dtype).clone()

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """A group's options are checked like the constructor's (a ``norm`` other than l2
        or l1, a NaN or negative ``reg`` would otherwise pass unnoticed), and a group
        added after construction is pulled toward its weights as they are now."""
        where = f"param group {len(self.param_groups)}"
        _check_options({**self.defaults, **param_group}, where)  # before it is added
        super().add_param_group(param_group)
        for p in self.param_groups[-1]["params"]:
            if "reference" not in self.state[p]:
                self.state[p]["reference"] = p.detach().clone()

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        live = []  # (param, group, state) with a gradient this step
        v_sum, v_count = None, 0
        # vbar is the mean over every parameter with a gradient, the reg = 0 ones too (a new
        # classification head): only needed when some group is pulled
        pulled = any(g["reg"] > 0 for g in self.param_groups)
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("AdamR does not support sparse gradients")
                st = self.state[p]
                if "step" not in st:
                    st["step"] = torch.tensor(0.0)
                    st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["step"] += 1
                g = p.grad
                st["exp_avg"].lerp_(g, 1 - b1)
                st["exp_avg_sq"].mul_(b2).addcmul_(g, g, value=1 - b2)
                live.append((p, group, st))
                if pulled:
                    bc2 = 1 - b2 ** st["step"].item()
                    s = st["exp_avg_sq"].sum(dtype=torch.float64).to("cpu") / bc2
                    v_sum = s if v_sum is None else v_sum + s
                    v_count += p.numel()
        vbar = 0.0 if v_sum is None else float(v_sum) / max(v_count, 1)  # global mean of v_hat
        for p, group, st in live:
            lr, eps, reg = group["lr"], group["eps"], group["reg"]
            b1, b2 = group["betas"]
            # vbar = 0 (no gradient has ever been nonzero) has no scale to normalise by: no
            # pull, where lr*reg/eps would send an L1 step far past the reference
            if reg > 0 and vbar > 0:
                ref = st["reference"]
                if ref.device != p.device:  # the model moved after the optimizer was built
                    ref = st["reference"] = ref.to(p.device)
                diff = p - ref
                rate = lr * reg / (vbar**0.5 + eps)
                if group["norm"] == "l2":  # a rate above 1 would overshoot the reference
                    p.sub_(diff, alpha=min(rate, 1.0))
                else:
                    p.sub_(diff.sign(), alpha=rate)
            step = st["step"].item()
            bias_correction1 = 1 - b1**step
            bias_correction2 = 1 - b2**step
            step_size = lr / bias_correction1
            denom = (st["exp_avg_sq"].sqrt() / (bias_correction2**0.5)).add_(eps)
            p.addcdiv_(st["exp_avg"], denom, value=-step_size)
        return loss


def _check_options(opts: dict[str, Any], where: str) -> None:
    """``ValueError`` naming ``where`` and the option unless lr, eps, reg are finite and
    >= 0, betas in [0, 1) and norm l2 or l1 (NaN fails every comparison, so it fails)."""

    def number(v: Any) -> float:
        try:
            return float(v)
        except (TypeError, ValueError):
            return math.nan

    for key in ("lr", "eps", "reg"):
        if not 0 <= number(opts[key]) < math.inf:
            raise ValueError(f"{where}: {key} must be a finite number >= 0, got {opts[key]!r}")
    betas = opts["betas"]
    ok = isinstance(betas, tuple | list) and len(betas) == 2
    if not (ok and all(0 <= number(b) < 1 for b in betas)):
        raise ValueError(f"{where}: betas must be two numbers in [0, 1), got {betas!r}")
    if opts["norm"] not in ("l2", "l1"):
        raise ValueError(f"{where}: norm must be 'l2' or 'l1', got {opts['norm']!r}")
