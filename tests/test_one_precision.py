"""One autocast context for the models' own passes and the engine's training step."""

import torch

from beitdomain.engine.train import distributed as D
from beitdomain.precision import autocast


def test_engine_autocast_is_the_models_one():
    assert D.autocast is autocast


def test_autocast_casts_only_when_a_dtype_is_set():
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with autocast(torch.device("cpu"), torch.bfloat16):
        assert (a @ b).dtype == torch.bfloat16
    with autocast(torch.device("cpu"), None):
        assert (a @ b).dtype == torch.float32
