"""The original's optimizer and schedule (HF Trainer 4.30.2 + ``src/train/optimization.py``, spec section 2).

- `HFAdamW`: the old ``transformers.optimization.AdamW`` (``optim="adamw_hf"``), which is NOT
  ``torch.optim.AdamW``: eps is added to ``sqrt(v)`` before the bias correction (torch adds it to
  ``sqrt(v / (1 - b2^t))``), and the decoupled decay ``p -= lr * wd * p`` comes AFTER the Adam
  update, from the updated weights (torch decays first). With eps 1e-5 and small second moments
  the two differ measurably (the parity fixture tells them apart), so torch's is not used.
  transformers 5 no longer ships it; this is its update, written out with foreach ops.
- `param_groups`: the Trainer's groups: weight decay on every trainable tensor except biases and
  ``nn.LayerNorm`` weights, which for LLaMA (RMSNorm, no biases) means on EVERYTHING; the
  no-decay group is kept (empty) as the original.
- `warmup_steps`, `lr_factor`, `lr_at_step`, `make_scheduler`: linear warmup over
  ``ceil(max_steps * warmup_ratio)`` steps, then cosine from lr down to ``min_lr_ratio * lr`` at
  ``max_steps``. Step k's optimizer step runs with ``lr_at_step(k)``: 0 for the first.
- `clip_grad_norm`: the total L2 norm of all gradients clipped to ``max_norm`` (returns the norm
  before clipping; FSDP2's sharded gradients included).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn


class HFAdamW(torch.optim.Optimizer):
    """The old HF AdamW (``correct_bias=True``), per step t (from 1) and parameter p with gradient g::

        m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
        p -= lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)
        p -= lr * wd * p            (after the update; only when wd > 0)

    Parameters without a gradient are skipped (their step count does not advance). State per
    parameter: ``step`` (float tensor), ``exp_avg``, ``exp_avg_sq`` (the parameter's shape/dtype).
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0, correct_bias: bool = True):
        if lr < 0 or eps < 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"bad AdamW settings: lr {lr}, betas {betas}, eps {eps}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                      correct_bias=correct_bias))

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D401 - torch's signature
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("HFAdamW does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                t = int(state["step"].item())
                g, m, v = p.grad, state["exp_avg"], state["exp_avg_sq"]
                m.mul_(b1).add_(g, alpha=1.0 - b1)
                v.mul_(b2).addcmul_(g, g, value=1.0 - b2)
                denom = v.sqrt().add_(eps)
                step_size = lr
                if group["correct_bias"]:
                    step_size = lr * math.sqrt(1.0 - b2 ** t) / (1.0 - b1 ** t)
                p.addcdiv_(m, denom, value=-step_size)
                if wd > 0.0:
                    p.add_(p, alpha=-lr * wd)
        return loss


def no_decay(name: str, module: nn.Module | None) -> bool:
    """The Trainer 4.30.2 rule: no decay for biases and weights of ``nn.LayerNorm`` modules
    (``ALL_LAYERNORM_LAYERS``; LLaMA's RMSNorm is not one of them)."""
    return "bias" in name or isinstance(module, nn.LayerNorm)


def param_groups(named: list[tuple[str, nn.Parameter]], weight_decay: float,
                 modules: dict[str, nn.Module] | None = None) -> list[dict]:
    """``[{"params", "names", "weight_decay": weight_decay}, {"params", "names", "weight_decay": 0.0}]``
    from ``named`` (trainable ``(name, parameter)``, in order); ``modules``: ``dict(model.named_modules())``
    to find the LayerNorm ones (None: none are)."""
    def owner(name: str) -> nn.Module | None:
        return modules.get(name.rsplit(".", 1)[0]) if modules else None

    decay = [(n, p) for n, p in named if not no_decay(n, owner(n))]
    rest = [(n, p) for n, p in named if no_decay(n, owner(n))]
    return [{"params": [p for _, p in decay], "names": [n for n, _ in decay], "weight_decay": weight_decay},
            {"params": [p for _, p in rest], "names": [n for n, _ in rest], "weight_decay": 0.0}]


def warmup_steps(max_steps: int, warmup_ratio: float) -> int:
    """``TrainingArguments.get_warmup_steps``: ``ceil(max_steps * warmup_ratio)`` (0.07 x 50000 -> 3501)."""
    return math.ceil(max_steps * warmup_ratio)


def lr_factor(step: int, *, warmup: int, max_steps: int, min_lr_ratio: float) -> float:
    """The LambdaLR factor of ``get_cosine_schedule_with_warmup_and_min_lr`` (``num_cycles`` 0.5)
    at scheduler step ``step``: ``step / warmup`` while warming up, then
    ``max(0, 0.5 * ((1 + m) + (1 - m) * cos(pi * progress)))``; it rises again past ``max_steps``."""
    if step < warmup:
        return float(step) / float(max(1, warmup))
    progress = float(step - warmup) / float(max(1, max_steps - warmup))
    return max(0.0, 0.5 * ((1.0 + min_lr_ratio) + (1.0 - min_lr_ratio) * math.cos(math.pi * progress)))


def lr_at_step(step: int, *, lr: float, max_steps: int, warmup_ratio: float, min_lr_ratio: float) -> float:
    """The learning rate of optimizer step ``step`` (from 0)."""
    return lr * lr_factor(step, warmup=warmup_steps(max_steps, warmup_ratio), max_steps=max_steps,
                          min_lr_ratio=min_lr_ratio)


def make_scheduler(optimizer: torch.optim.Optimizer, *, max_steps: int, warmup_ratio: float,
                   min_lr_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    """The original's LambdaLR (step it after each optimizer step); its ``state_dict`` is plain numbers."""
    from functools import partial

    fn = partial(lr_factor, warmup=warmup_steps(max_steps, warmup_ratio), max_steps=max_steps,
                 min_lr_ratio=min_lr_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)


def clip_grad_norm(params: Iterable[nn.Parameter], max_norm: float | None) -> float:
    """Clip the total L2 gradient norm of ``params`` to ``max_norm`` (None: only measure); the norm before."""
    params = [p for p in params if p.grad is not None]
    if not params:
        return 0.0
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm is not None else float("inf"))
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # sharded (FSDP2): whole
