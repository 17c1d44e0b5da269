"""An exponential moving average of a model's weights, kept by a trainer hook.

timm's `ModelEmaV3` does the averaging (its foreach lerp, its warm-up of the decay); this hook
calls it after every optimizer step with the loop's step and puts the average into the
trainer's checkpoints, so a resumed run continues the same average bitwise.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from beitdomain.engine.train import distributed as D


class WeightEma:
    """The average of `model`'s weights (and float buffers: BatchNorm statistics) over steps.

    With ``warmup`` the decay of step t is ``min(decay, 1 - (1 + t) ** -2/3)`` (timm's warm-up),
    so a run of a few hundred steps is not dominated by the random or pre-trained weights it
    started from: 0.80 at step 10, 0.95 at step 100, 0.975 at step 250.

    ``module`` is the averaged copy: evaluate or save it in place of the model.
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True) -> None:
        from timm.utils import ModelEmaV3

        if not 0 < decay < 1:
            raise ValueError(f"EMA decay {decay}: need 0 < decay < 1")
        self.decay = decay
        self.ema = ModelEmaV3(D.unwrap(model), decay=decay, use_warmup=warmup)
        self.ema.module.eval()
        self.ema.module.requires_grad_(False)

    @property
    def module(self) -> nn.Module:
        return self.ema.module

    def on_step_end(self, trainer: Any) -> None:
        self.ema.update(D.unwrap(trainer.model), step=trainer.state.step)

    def state_dict(self) -> dict[str, Any]:
        return {"weights": {k: v.detach() for k, v in self.ema.module.state_dict().items()}}

    def load_state_dict(self, s: dict[str, Any]) -> None:
        self.ema.module.load_state_dict(s["weights"])

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Writes the average into `model` (the weights a run without selection keeps)."""
        D.unwrap(model).load_state_dict(self.ema.module.state_dict())


def weight_ema(model: nn.Module, decay: float) -> WeightEma | None:
    """`finetune.ema` as a hook: None when it is 0 (off)."""
    return WeightEma(model, decay) if decay > 0 else None
