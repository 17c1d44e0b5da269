"""The shared training loop: exact resume, checkpoint safety, non-finite handling."""

import itertools
import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from beitdomain.config import TrainConfig
from beitdomain.engine.run.checkpoint import CheckpointManager
from beitdomain.engine.run.folder import RunDir
from beitdomain.engine.run.guard import RunDirError
from beitdomain.engine.run.metrics_log import read_metrics
from beitdomain.engine.train.loop import NonFiniteLossError, Trainer
from beitdomain.engine.train.plan import build_loader
from beitdomain.engine.train.schedule import cosine_lr


class Noisy(torch.utils.data.Dataset):
    """Items depend on (seed, epoch, index) only, like the real datasets."""

    def __init__(self, n=40):
        self.n, self.epoch = n, 0

    def set_epoch(self, e):
        self.epoch = e

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(1000 * self.epoch + i)
        x = torch.randn(8, generator=g)
        return {"x": x, "y": (x[:2].sum() > 0).long()}


def make(tmp_path, steps=20, hooks=(), train_kw=None):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.3), nn.ReLU(), nn.Linear(16, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loader = build_loader(Noisy(), 6, seed=3, num_workers=0)
    cfg = TrainConfig(
        steps=steps, log_every=2, ckpt_every=5, keep_checkpoints=2, **(train_kw or {})
    )

    def step_fn(m, b):
        loss = nn.functional.cross_entropy(m(b["x"]), b["y"])
        return loss, {"acc": (m(b["x"]).argmax(1) == b["y"]).float().mean()}

    run = RunDir.open(tmp_path, resume=True)
    return Trainer(
        model=model,
        optimizer=opt,
        loader=loader,
        step_fn=step_fn,
        lr_at=lambda s: cosine_lr(s, steps, 1e-2, 1e-4, 3),
        total_steps=steps,
        train=cfg,
        grad_clip=1.0,
        device=torch.device("cpu"),
        run=run,
        hooks=hooks,
        quiet=True,
    )


class KillAt:
    def __init__(self, step):
        self.step = step

    def on_step_end(self, trainer):
        if trainer.state.step == self.step:
            raise SystemExit("simulated kill")


@pytest.mark.parametrize("kill_step", [3, 7, 13])
def test_resume_is_bitwise_identical(tmp_path, kill_step):
    ref = make(tmp_path / "ref")
    ref.fit()
    a = make(tmp_path / "a", hooks=[KillAt(kill_step)])
    with pytest.raises(SystemExit):
        a.fit()
    b = make(tmp_path / "a")
    b.fit(resume=True)
    for (k, p), q in zip(ref.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(p, q), k
    # the resumed run's log has every step once
    steps = [r["step"] for r in read_metrics(tmp_path / "a" / "metrics.jsonl")]
    assert steps == sorted(set(steps)) and steps[-1] == 20


def test_corrupt_latest_checkpoint_falls_back(tmp_path, caplog):
    t = make(tmp_path, steps=10)
    t.fit()
    mgr = CheckpointManager(tmp_path / "checkpoints")
    assert mgr.steps() == [5, 10]
    p = mgr.path_for(10)
    p.write_bytes(p.read_bytes()[:100])  # truncated
    step, state = mgr.load_latest()
    assert step == 5 and state["step"] == 5
    assert "truncated" in caplog.text


def test_checkpoint_without_checksum_is_not_trusted(tmp_path):
    t = make(tmp_path, steps=10)
    t.fit()
    mgr = CheckpointManager(tmp_path / "checkpoints")
    (tmp_path / "checkpoints" / "step-00000010.pt.json").unlink()
    assert mgr.load_latest()[0] == 5


def test_nonfinite_losses_are_skipped_then_stop(tmp_path):
    t = make(tmp_path, steps=10, train_kw={"max_nonfinite": 3})
    inner = t.step_fn
    calls = {"n": 0}

    def sometimes_nan(m, b):
        calls["n"] += 1
        loss, mets = inner(m, b)
        return (loss * float("nan") if calls["n"] in (2, 4) else loss), mets

    t.step_fn = sometimes_nan
    t.fit()
    assert t.state.step == 10 and t.state.nonfinite_total == 2
    t2 = make(tmp_path / "b", steps=10, train_kw={"max_nonfinite": 3})
    t2.step_fn = lambda m, b: (torch.tensor(float("inf"), requires_grad=True), {})
    with pytest.raises(NonFiniteLossError, match="3 non-finite losses in a row") as e:
        t2.fit()
    # C1: no checkpoint was written, so none is said to be intact
    assert "No checkpoint was written yet" in str(e.value)
    assert "intact" not in str(e.value)
    t3 = make(tmp_path / "c", steps=10, train_kw={"max_nonfinite": 2})
    inner3, calls["n"] = t3.step_fn, 0

    def nan_after_six(m, b):
        calls["n"] += 1
        loss, mets = inner3(m, b)
        return (loss * float("nan") if calls["n"] > 6 else loss), mets

    t3.step_fn = nan_after_six
    with pytest.raises(NonFiniteLossError, match=r"checkpoint \(step 5\) is intact in"):
        t3.fit()


def test_rundir_refuses_overwrite_without_flag(tmp_path):
    run = RunDir.open(tmp_path / "r")
    run.start("test", None, "cpu")
    with pytest.raises(RunDirError, match="--resume.*--overwrite"):
        RunDir.open(tmp_path / "r")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "precious.txt").write_text("x")
    with pytest.raises(RunDirError, match="not a beitdomain run"):
        RunDir.open(tmp_path / "other", overwrite=True)
    assert (tmp_path / "other" / "precious.txt").exists()
    assert RunDir.open(tmp_path / "r", overwrite=True).path.exists()
    manifest = (
        json.loads((tmp_path / "r").joinpath("manifest.json").read_text())
        if (tmp_path / "r" / "manifest.json").exists()
        else {}
    )
    assert manifest == {}  # overwrite removed the old run


def test_cosine_schedule_shape():
    lrs = [cosine_lr(s, 100, 1.0, 0.0, 10) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(lrs[10:]))
    assert lrs[-1] < 0.01


def test_the_fine_tuning_schedule_scales_with_the_number_of_labels():
    """cpu-base's fine-tune is `epochs` passes with a floor of `min_steps`, planned by the loader
    training uses: the demo's 1% and 10% subsets (18 and 177 labels) get the floor, i.e. far
    more passes over fewer labels, and 100% (1,771) its 10 epochs; `train.steps` overrides."""
    import dataclasses

    from beitdomain.config import load_recipe
    from beitdomain.engine.train.plan import plan_run

    train = load_recipe("cpu-base").finetune.train
    assert (train.epochs, train.min_steps, train.batch_size) == (10, 250, 32)

    def planned(n_labels, **over):
        plan = plan_run(
            Noisy(n_labels),
            dataclasses.replace(train, **over),
            seed=0,
            num_workers=0,
            device=torch.device("cpu"),
        )
        return plan.total_steps

    assert [planned(n) for n in (18, 177, 1771)] == [250, 250, 550]  # 1771 // 32 = 55 a pass
    assert planned(18, steps=40) == 40
    assert planned(18, min_steps=0) == 10  # one 18-image batch a pass
    assert planned(177, min_steps=0) == 50


def test_auto_precision_is_bf16_only_where_the_hardware_has_it(monkeypatch):
    from beitdomain.engine.train import distributed as D

    cpu = torch.device("cpu")
    assert D.resolve_precision("fp32", cpu) is None
    assert D.resolve_precision("bf16", cpu) is torch.bfloat16
    monkeypatch.setattr(D, "cpu_has_native_bf16", lambda: True)
    assert D.resolve_precision("auto", cpu) is torch.bfloat16
    monkeypatch.setattr(D, "cpu_has_native_bf16", lambda: False)
    assert D.resolve_precision("auto", cpu) is None
    # The probe itself answers without raising on any CPU.
    monkeypatch.undo()
    assert isinstance(D.cpu_has_native_bf16(), bool)


def test_short_epochs_get_the_machines_loader_workers(monkeypatch):
    # issue 37 item 3: a 4-batch epoch on GPUs used to load in the trainer's process
    from beitdomain.engine.train import distributed as D

    monkeypatch.setattr(D, "default_num_workers", lambda device=None: 3)
    assert build_loader(Noisy(n=6 * 2), 6, seed=0).num_workers == 3
    assert build_loader(Noisy(n=6 * 40), 6, seed=0).num_workers == 3
    # An explicit data.num_workers is obeyed whatever the epoch length.
    assert build_loader(Noisy(n=6), 6, seed=0, num_workers=2).num_workers == 2


@pytest.mark.parametrize(
    ("cores", "threads", "device", "want"),
    [
        (2, 2, "cpu", 0),  # the demo's machine: the trainer's threads take both cores
        (2, 2, "cuda", 1),  # an accelerator does the math: every core but one loads
        (4, 2, "cpu", 2),  # hyper-threads (or cores) torch's threads leave free
        (32, 32, "cpu", 4),  # a big CPU keeps one core in eight for loading
        (64, 16, "cpu", 8),  # capped
        (16, 16, None, 8),  # no device given: as for an accelerator, capped
    ],
)
def test_default_num_workers_leaves_a_cpu_trainers_cores_to_it(
    monkeypatch, cores: int, threads: int, device: str | None, want: int
):
    from beitdomain.engine.train import distributed as D

    monkeypatch.setattr(D.os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    monkeypatch.setattr(D.torch, "get_num_threads", lambda: threads)
    dev = torch.device(device) if device else None
    assert D.default_num_workers(dev) == want


_FAULTS_SCRIPT = """
import resource, sys, torch
from beitdomain.engine.train import distributed as D
applied = D.keep_freed_cpu_memory() if sys.argv[1] == "keep" else False
MB = 1 << 20
def step():  # a training step's pattern: activations kept, then each one's gradient, freed
    acts = [torch.empty(s * MB // 4).fill_(1.0) for s in (3, 8, 2, 8, 5, 8, 1, 8)]
    while acts:
        a = acts.pop()
        g = torch.empty_like(a).fill_(2.0)
        del a, g
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):  # malloc's thresholds settle
    step()
per_step = []  # faults of each step: a rare heap growth lands in one, re-faults in every one
for _ in range(15):
    before = faults()
    step()
    per_step.append(faults() - before)
print(applied, sorted(per_step)[len(per_step) // 2])
"""


def _glibc() -> bool:
    try:
        return "glibc" in (os.confstr("CS_GNU_LIBC_VERSION") or "")
    except (AttributeError, ValueError, OSError):  # no confstr, or no such name here
        return False


@pytest.mark.skipif(not _glibc(), reason="glibc's malloc only")
def test_a_cpu_trainer_reuses_freed_pages_instead_of_faulting_them_in_again():
    """With `keep_freed_cpu_memory` the pages a step freed serve the next step; when freed
    blocks go back to the kernel (glibc's 128 KiB mmap threshold) thousands of them fault in
    again every step (the 51 MiB a step here allocates are 13,000 pages of 4 KiB). A user's
    own MALLOC_* settings are left alone."""

    # Its own processes, with no allocator settings inherited from whatever ran before
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    clean.pop("LD_PRELOAD", None)

    def run(mode: str, **env: str) -> tuple[str, int]:
        out = subprocess.run(
            [sys.executable, "-c", _FAULTS_SCRIPT, mode],
            env={**clean, "OMP_NUM_THREADS": "1", **env},
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        return out[0], int(out[1])

    applied, kept = run("keep")
    # The baseline holds glibc's initial mmap threshold (128 KiB) fixed: freed blocks go back
    # to the kernel and fault in again, 22,032 pages every step in 8 of 8 runs. Under glibc's
    # dynamic threshold the count depends on the order of the first frees: 4,064 to 16,769
    # in 8 runs, and 0 in 2 of 10 test runs (session 29), which made this test flaky.
    _, default = run("default", MALLOC_MMAP_THRESHOLD_="131072")
    assert applied == "True"
    # The median step's page faults: kept, 0 in 20 of 20 runs (a heap growth of 128-153
    # pages lands in one step, which the median of 15 ignores; the mean over 10 steps let it
    # count).
    assert default > 1000 and kept * 20 < default, (kept, default)
    applied, _ = run("keep", MALLOC_TRIM_THRESHOLD_="131072")
    assert applied == "False"
