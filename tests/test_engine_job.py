"""The pieces every job shares: what a finished run holds, the safetensors writer, the parallel
map with a progress bar."""

from __future__ import annotations

import math

import pytest
import torch

from beitdomain.data.parallel import parallel_map
from beitdomain.engine.job import FINISHED_FILES, is_finished
from beitdomain.fileio import atomic_write_safetensors


@pytest.mark.parametrize("kind", sorted(FINISHED_FILES))
def test_a_run_is_finished_when_all_its_final_files_are_there(tmp_path, kind):
    assert not is_finished(tmp_path, kind)
    *first, last = FINISHED_FILES[kind]
    for name in first:
        (tmp_path / name).write_text("x")
    assert not is_finished(tmp_path, kind)
    (tmp_path / last).write_text("x")
    assert is_finished(tmp_path, kind)


def test_safetensors_writer_takes_any_tensor_layout(tmp_path):
    from safetensors.torch import load_file

    state = {
        "conv": torch.randn(2, 3, 4, 4).to(memory_format=torch.channels_last),  # not contiguous
        "t": torch.arange(6.0).reshape(2, 3).t(),
        "frozen": torch.ones(3, requires_grad=True),
    }
    atomic_write_safetensors(tmp_path / "w.safetensors", state, {"format": "test"})
    back = load_file(str(tmp_path / "w.safetensors"))
    assert set(back) == set(state)
    for k, v in state.items():
        torch.testing.assert_close(back[k], v.detach())
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize("workers", [0, 2])
def test_parallel_map_keeps_order(workers):
    items = list(range(7))
    got = list(parallel_map(math.factorial, items, workers=workers, progress=False, description=""))
    assert got == [math.factorial(i) for i in items]
