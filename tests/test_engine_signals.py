"""SIGTERM/SIGINT mid-step: the last finished step is checkpointed at once (while the step still
runs), and a resumed run ends bitwise equal to an uninterrupted one (issue 39, item 10)."""

import os
import signal
import time

import pytest
import torch
from test_engine_loop import make

from beitdomain.engine.run.checkpoint import CheckpointManager
from beitdomain.engine.train.loop import Interrupted, Trainer


class Calls:
    """A hook whose state the step function advances (as SeededMixup's draw counter does)."""

    def __init__(self):
        self.n = 0

    def on_step_end(self, trainer):
        pass

    def state_dict(self):
        return {"n": self.n}

    def load_state_dict(self, s):
        self.n = s["n"]


def _trainer(path, calls, during=None):
    """make()'s run whose inputs depend on the hook's counter; `during(trainer)` runs after the
    step's forward and backward (RNG drawn, counter advanced), before the update."""
    t = make(path, hooks=[calls])
    inner = t.step_fn

    def step_fn(m, b):
        calls.n += 1
        loss, mets = inner(m, {"x": b["x"] + 0.01 * calls.n, "y": b["y"]})
        if during is not None:
            during(t)
        return loss, mets

    t.step_fn = step_fn
    return t


def _reference(tmp_path):
    ref = _trainer(tmp_path / "ref", Calls())
    ref.fit()
    return ref.model.state_dict()


def _resumed_equals(path, ref):
    b = _trainer(path, Calls())
    b.fit(resume=True)
    assert b.state.step == 20
    for (k, p), q in zip(ref.items(), b.model.state_dict().values()):
        assert torch.equal(p, q), k


def _checkpointed(path, step):
    mgr = CheckpointManager(path / "checkpoints")
    return step in mgr.steps() and mgr.verify(mgr.path_for(step)) is None


def test_the_checkpoint_lands_while_the_main_thread_is_still_inside_the_step(
    tmp_path, monkeypatch
):
    """The main thread never gets to run the Python handler (as inside a long backward pass,
    one C++ call): the watcher thread writes step 7's checkpoint all the same."""
    ref = _reference(tmp_path)
    monkeypatch.setattr(Trainer, "_on_signal", lambda self, signum: None)
    seen = {}

    def during(t):
        if t.state.step == 7 and not seen:
            os.kill(os.getpid(), signal.SIGTERM)
            deadline = time.monotonic() + 20
            while not _checkpointed(t.run.path, 7) and time.monotonic() < deadline:
                time.sleep(0.01)
            seen["written"] = _checkpointed(t.run.path, 7)
            raise SystemExit("SIGKILL at the end of the grace period")

    with pytest.raises(SystemExit):
        _trainer(tmp_path / "a", Calls(), during).fit()
    assert seen["written"], "no checkpoint of the last finished step while the step ran"
    assert CheckpointManager(tmp_path / "a" / "checkpoints").steps() == [5, 7]
    monkeypatch.undo()
    _resumed_equals(tmp_path / "a", ref)


def test_a_signal_mid_step_stops_there_with_the_last_finished_step_saved(tmp_path):
    ref = _reference(tmp_path)
    t0 = {}

    def during(t):
        if t.state.step == 7 and not t0:
            t0["t"] = time.monotonic()
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(30)  # the handler interrupts this: the step does not run to its end

    with pytest.raises(Interrupted, match=r"interrupted \(SIGTERM\) at step 7; checkpoint saved"):
        _trainer(tmp_path / "a", Calls(), during).fit()
    assert time.monotonic() - t0["t"] < 10
    assert CheckpointManager(tmp_path / "a" / "checkpoints").steps() == [5, 7]
    _resumed_equals(tmp_path / "a", ref)


class SignalAfter:
    """Sends SIGINT from inside the update of one step (after the optimizer step)."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, trainer):
        if trainer.state.step == self.step:
            os.kill(os.getpid(), signal.SIGINT)


def test_a_signal_during_the_update_finishes_it_and_saves_that_step(tmp_path):
    ref = _reference(tmp_path)
    calls = Calls()
    t = _trainer(tmp_path / "a", calls)
    t.hooks = [calls, SignalAfter(8)]
    with pytest.raises(Interrupted, match=r"interrupted \(SIGINT\) at step 8"):
        t.fit()
    assert CheckpointManager(tmp_path / "a" / "checkpoints").steps() == [5, 8]
    _resumed_equals(tmp_path / "a", ref)


def test_a_signal_before_the_first_step_finished_says_there_is_nothing_to_resume(tmp_path):
    def during(t):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)

    with pytest.raises(Interrupted, match="before the first step finished; nothing to resume"):
        _trainer(tmp_path / "a", Calls(), during).fit()
    assert CheckpointManager(tmp_path / "a" / "checkpoints").steps() == []


def test_the_handlers_and_the_wakeup_fd_are_restored_after_fit(tmp_path):
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    _trainer(tmp_path / "a", Calls()).fit()
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
    assert signal.set_wakeup_fd(-1) == -1  # none left behind (and none set before)
