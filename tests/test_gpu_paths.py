"""Multi-GPU paths checked on the CPU: what NCCL is handed, and which `no_sync` is entered.

The CPU tests run DDP over gloo, which takes CPU tensors and never sees a compiled DDP module
during gradient accumulation, so two multi-GPU failures went unseen: the tokenizer's code counts
were all-reduced as a CPU tensor (NCCL has none), and `torch.compile(DDP(m))` all-reduced the
gradients of every micro-batch. These tests stand in for the GPU: the model on the `meta`
device and a recorded all-reduce, and a one-process gloo group.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from helpers import TOKENIZER_SETS, recipe
from torch import nn

from beitdomain.engine.train import distributed as D
from beitdomain.tokenizer import CodeUsage, create_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


class _Reduced(Exception):
    """Raised by the fake all-reduce once it has seen its argument (stops the hook there)."""


def test_code_counts_live_on_the_models_device_when_all_reduced(monkeypatch) -> None:
    from beitdomain.engine.tokenizer import TokenizerMonitor

    torch.manual_seed(0)
    model = create_tokenizer("tiny").to("meta")  # stands in for a GPU: not the CPU
    r = recipe(TOKENIZER_SETS)
    monitor = TokenizerMonitor(model, r, total_steps=100, seed=0, out=None)
    assert monitor.usage.counts.device == model.codebook.weight.device

    seen: list[torch.device] = []

    def all_reduce(t, *args, **kwargs):
        seen.append(t.device)
        raise _Reduced

    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    monitor.last_batch = torch.zeros(1)
    every = r.tokenizer.dead_code_every
    trainer = SimpleNamespace(
        state=SimpleNamespace(step=every),
        total_steps=100,
        dist=SimpleNamespace(enabled=True, is_main=True),
        model=model,
    )
    with pytest.raises(_Reduced):
        monitor.on_step_end(trainer)
    assert seen == [torch.device("meta")]


def test_code_counts_follow_the_tokens_device() -> None:
    usage = CodeUsage(8)
    assert usage.counts.device.type == "cpu"
    usage.update(torch.tensor([0, 1, 1], device="meta"))
    assert usage.counts.device.type == "meta"
    assert CodeUsage(8).to("meta").counts.device.type == "meta"
    usage = CodeUsage(8)
    usage.update(torch.tensor([[0, 1], [1, 7]]))
    assert usage.counts.tolist() == [1, 2, 0, 0, 0, 0, 0, 1]


def test_monitor_state_dict_is_on_the_cpu() -> None:
    from beitdomain.engine.tokenizer import TokenizerMonitor

    model = create_tokenizer("tiny")
    monitor = TokenizerMonitor(model, recipe(TOKENIZER_SETS), total_steps=10, seed=0, out=None)
    monitor.usage.update(torch.tensor([3, 3]))
    state = monitor.state_dict()
    assert state["counts"].device.type == "cpu"
    monitor.usage.counts.zero_()  # the saved copy is not a view of the live counts
    assert int(state["counts"][3]) == 2
    monitor.load_state_dict(state)
    assert int(monitor.usage.counts[3]) == 2


@pytest.fixture
def gloo_group(tmp_path):
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.usefixtures("gloo_group")
def test_no_sync_reaches_ddp_under_torch_compile() -> None:
    ddp = nn.parallel.DistributedDataParallel(nn.Linear(3, 2))
    compiled = torch.compile(ddp)  # as prepare_for_training wraps it; never called here
    assert compiled is not ddp
    with D.maybe_no_sync(compiled, skip_sync=True):
        assert ddp.require_backward_grad_sync is False
    assert ddp.require_backward_grad_sync is True
    with D.maybe_no_sync(compiled, skip_sync=False):
        assert ddp.require_backward_grad_sync is True


class _Items(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        return {"x": torch.zeros(2)}


@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # 16 cores, as patched
def test_a_short_epoch_on_a_gpu_gets_loader_workers(monkeypatch) -> None:
    """elpv-gpu on two GPUs: 4 batches per rank per epoch still load in worker processes."""
    from beitdomain.engine.train.plan import build_loader

    monkeypatch.setattr(D, "usable_cores", lambda: list(range(16)))
    gpu = torch.device("cuda")  # only named: the loader is built, never iterated
    short = build_loader(_Items(4 * 256), 256, seed=0, device=gpu)
    assert len(short.batch_sampler) == 4
    assert short.num_workers == D.default_num_workers(gpu) == 8
    assert short.persistent_workers  # started once for the run, not every epoch
    # An explicit data.num_workers (the tiny test recipes' 0) is still obeyed.
    assert build_loader(_Items(8), 4, seed=0, num_workers=0, device=gpu).num_workers == 0


def _job(tmp_path, rank: int, world_size: int = 2):
    """A tokenizer `Job` as rank `rank` of `world_size` would hold it (no process group)."""
    from beitdomain.engine.job import Job
    from beitdomain.engine.run.folder import RunDir
    from beitdomain.rank import DistInfo

    info = DistInfo(rank=rank, world_size=world_size)
    run = RunDir.open(tmp_path / f"rank{rank}", resume=True)
    r = recipe(TOKENIZER_SETS, seed=5)
    return Job("tokenizer", r, torch.device("cpu"), info, run, resume=False, quiet=True)


def _trainer_of(job):
    from beitdomain.engine.train.plan import RunPlan, build_loader

    torch.manual_seed(job.recipe.seed)  # as Job.open seeds every rank
    model = nn.Linear(2, 1)
    loader = build_loader(_Items(8), 2, seed=job.recipe.seed, num_workers=0)
    plan = RunPlan(loader, total_steps=2, global_batch=4)
    trainer = job.trainer(model, plan, model.parameters(), lambda m, b: (m(b["x"]).sum(), {}))
    return model, trainer


def test_each_rank_draws_its_own_noise_and_rank_0_keeps_its_stream(tmp_path) -> None:
    models, draws = [], []
    for rank in (0, 1):
        model, trainer = _trainer_of(_job(tmp_path, rank))
        models.append(model.state_dict())
        draws.append(torch.rand(4))  # what drop path and the Gumbel noise draw next
        assert trainer.loader.batch_sampler.seed == 5  # the data order: the recipe's seed
    # Every rank built the same model; after that their streams differ.
    assert all(torch.equal(models[0][k], models[1][k]) for k in models[0])
    assert not torch.equal(draws[0], draws[1])
    # Rank 0 (and a single process) goes on with the stream it was seeded with.
    torch.manual_seed(5)
    nn.Linear(2, 1)
    assert torch.equal(draws[0], torch.rand(4))
    assert D.rank_seed(5, 0) == 5
    assert len({D.rank_seed(5, r) for r in range(8)} | {D.rank_seed(6, 1)}) == 9


def test_a_cuda_job_turns_on_tf32_unless_fp32_is_asked_for(monkeypatch, tmp_path) -> None:
    from beitdomain.engine.job import Job
    from beitdomain.rank import DistInfo

    cuda = torch.device("cuda")  # only named: nothing runs on it
    monkeypatch.setattr(D, "resolve_device", lambda name="auto": cuda)
    monkeypatch.setattr(D, "init_distributed", lambda device: DistInfo())
    # torch's backend flags are not plain attributes (pytest's monkeypatch cannot undo them on
    # every version): set and restored by hand, so no later test inherits them.
    before = D.tf32_enabled()
    try:
        for precision, want in [("fp32", False), ("auto", True)]:
            D.set_tf32(False)
            r = recipe(TOKENIZER_SETS, **{"tokenizer.train.precision": precision})
            job = Job.open("tokenizer", r, tmp_path / precision)
            assert job.device == cuda
            assert D.tf32_enabled() is want
        assert not D.use_tf32(torch.device("cpu"), "auto")
    finally:
        D.set_tf32(before)


def test_every_rank_embeds_its_share_of_the_knn_check(monkeypatch, tmp_path) -> None:
    """Two ranks played in turn: each embeds half the images, and both score what one
    process scores alone, so no rank waits in a collective while rank 0 embeds everything."""
    from helpers import FINETUNE_SETS, write_separable_set

    from beitdomain.data.labeled import labeled_data
    from beitdomain.engine.represent import FrozenBackbone
    from beitdomain.engine.represent_eval import KnnMonitor
    from beitdomain.models.backbone import create_backbone, get_preset
    from beitdomain.rank import DistInfo

    data = write_separable_set(tmp_path / "data", per_class=6)
    r = recipe(FINETUNE_SETS, **{"data.root": str(data)})
    ld = labeled_data(r, progress=False)
    test = ld.val or ld.test
    torch.manual_seed(0)
    bb = create_backbone(get_preset("tiny", in_chans=1), final_norm="tokens")
    mon = KnnMonitor(lambda m: m, ld.train, test, ld.classes, 64, k=3)
    alone = mon.measure(bb, torch.device("cpu"))

    embedded: list[int] = []
    embed = FrozenBackbone.embed_dataset
    monkeypatch.setattr(
        FrozenBackbone,
        "embed_dataset",
        lambda self, ds, *a, **kw: embedded.append(len(ds)) or embed(self, ds, *a, **kw),
    )
    shares: dict[int, list] = {0: [], 1: []}  # each rank's (X, y), train then test

    def play(rank: int, others: list | None) -> dict:
        monkeypatch.setattr(D, "dist_info", lambda: DistInfo(rank=rank, world_size=2))
        calls = iter(range(2))

        def gather(obj):
            shares[rank].append(obj)
            other = others[next(calls)] if others else obj
            return [obj, other] if rank == 0 else [other, obj]

        monkeypatch.setattr(D, "all_gather_object", gather)
        return mon.measure(bb, torch.device("cpu"))

    play(0, None)  # records rank 0's shares
    embedded.clear()
    as_rank1 = play(1, shares[0])
    assert embedded == [len(ld.train) // 2, len(test) // 2]  # half of each set
    as_rank0 = play(0, shares[1][-2:])
    for key in ("balanced_accuracy", "accuracy"):
        assert as_rank0[key] == as_rank1[key] == alone[key]

    # The hook itself runs the check on a rank other than 0 too (it logs only on rank 0).
    measured, logged = [], []
    monkeypatch.setattr(mon, "measure", lambda model, device: measured.append(1) or alone)
    trainer = SimpleNamespace(
        model=bb,
        device=torch.device("cpu"),
        total_steps=1,
        loader=SimpleNamespace(batch_sampler=[0]),
        dist=DistInfo(rank=1, world_size=2),
        state=SimpleNamespace(step=1, epoch=0, batch_in_epoch=1),
        log=lambda **v: logged.append(v),
    )
    mon.on_step_end(trainer)
    assert measured == [1] and logged == []


@pytest.fixture
def device_tensors(monkeypatch) -> list[str]:
    """Records each `torch.tensor(...)` / `torch.as_tensor(...)` given a device: on a GPU, a
    copy from the host that waits for the work queued before it."""
    built: list[str] = []
    for name in ("tensor", "as_tensor"):
        real = getattr(torch, name)

        def record(*args, _real=real, _name=name, **kwargs):
            if kwargs.get("device") is not None:
                built.append(f"torch.{_name}(device={kwargs['device']})")
            return _real(*args, **kwargs)

        monkeypatch.setattr(torch, name, record)
    return built


@pytest.mark.parametrize("target", ["tokens", "pixels"])
def test_the_mim_loss_builds_no_tensor_from_the_host(device_tensors, target) -> None:
    from beitdomain.models.backbone import get_preset
    from beitdomain.models.mim import BeitMIM

    torch.manual_seed(0)
    mim = BeitMIM.from_config(get_preset("tiny", img_size=32), target=target, vocab_size=32)
    images = torch.randn(2, 3, 32, 32)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, :6] = True
    tokens = torch.randint(0, 32, (2, 16)) if target == "tokens" else None
    loss, metrics = mim.loss(images, mask, tokens, num_masked=6)
    loss.backward()
    assert device_tensors == []
    assert metrics["num_masked"].dtype == torch.long and int(metrics["num_masked"]) == 12


def test_a_steps_python_numbers_stay_on_the_host(device_tensors) -> None:
    """The tokenizer's step returns its temperature and KL weight as Python floats."""
    from beitdomain.config import TrainConfig
    from beitdomain.engine.train.loop import Trainer
    from beitdomain.engine.train.plan import build_loader

    torch.manual_seed(0)
    model = nn.Linear(2, 1)

    def step_fn(m, b):
        loss = m(b["x"]).pow(2).mean()
        return loss, {"temperature": 0.1, "kl_weight": 3, "out": loss.detach()}

    trainer = Trainer(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        loader=build_loader(_Items(8), 2, seed=0, num_workers=0),
        step_fn=step_fn,
        lr_at=lambda s: 0.1,
        total_steps=2,
        train=TrainConfig(steps=2, accum_steps=2, log_every=1),
        grad_clip=1.0,
        device=torch.device("cpu"),
        quiet=True,
    )
    trainer.fit()
    assert device_tensors == []
    # Averaged over the two micro-batches on the host, in float64: 0.1, not fp32's 0.10000000149.
    assert trainer.last_metrics["temperature"] == 0.1
    assert trainer.last_metrics["kl_weight"] == 3.0
    assert list(trainer.last_metrics)[:3] == ["temperature", "kl_weight", "out"]


class _HostReads:
    """Counts the reads of tensor values back to the host (`int()`, `float()`, `bool()`,
    `.item()`, `.tolist()`): on a GPU, each waits for the queue."""

    def __init__(self, monkeypatch) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode

        self.n, self.active = 0, False
        reads = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func is torch.ops.aten._local_scalar_dense.default:
                    reads.n += 1
                return func(*args, **(kwargs or {}))

        self.mode = Mode()
        tolist = torch.Tensor.tolist

        def counted(t):
            reads.n += reads.active
            return tolist(t)

        monkeypatch.setattr(torch.Tensor, "tolist", counted)

    def __enter__(self):
        self.active = True
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.active = False
        self.mode.__exit__(*exc)


def _collapsed_tokenizer():
    torch.manual_seed(0)
    model = create_tokenizer("tiny")
    with torch.no_grad():
        model.encoder.logits_conv.bias[0] = 100.0  # code 0 wins everywhere
    return model


def test_reseeding_dead_codes_reads_the_device_a_fixed_number_of_times(monkeypatch) -> None:
    from beitdomain.tokenizer import reinit_dead_codes

    samples = torch.rand(2, 3, 32, 32)
    reads = []
    for dead in (list(range(1, 9)), list(range(1, 64))):
        model = _collapsed_tokenizer()
        with _HostReads(monkeypatch) as r:
            revived = reinit_dead_codes(
                model, torch.tensor(dead), samples=samples, generator=torch.Generator()
            )
        assert revived.tolist() == dead
        reads.append(r.n)
    # dead ids, spread and winners, the seeds' order, every seed usable: 4 for any number
    # of codes (4 per code before, each a wait on a GPU).
    assert reads[0] == reads[1] <= 4


@pytest.mark.parametrize("features", ["images", "a seed on its anchor"])
def test_reseeding_on_the_device_equals_the_checked_split(monkeypatch, features) -> None:
    import beitdomain.tokenizer.codebook as cb

    torch.manual_seed(1)
    if features == "images":
        kwargs = {"samples": torch.rand(2, 3, 32, 32)}
    else:  # the third feature is the mean of all three: code 0's anchor
        a, b = torch.randn(64), torch.randn(64)
        kwargs = {"features": torch.stack([a, b, (a + b) / 2])}
    checked = []
    split_with_checks = cb._split_with_checks
    monkeypatch.setattr(
        cb, "_split_with_checks", lambda *a: checked.append(1) or split_with_checks(*a)
    )
    runs = []
    for on_device in (True, False):
        if not on_device:
            monkeypatch.setattr(cb, "_split_on_device", lambda *a: None)
        model = _collapsed_tokenizer()
        g = torch.Generator().manual_seed(3)
        revived = cb.reinit_dead_codes(model, list(range(1, 64)), generator=g, **kwargs)
        runs.append((revived.tolist(), model.state_dict()))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(v, runs[1][1][k]) for k, v in runs[0][1].items())
    if features == "images":
        assert checked == [1] and len(runs[0][0]) == 63  # only the forced checked run
    else:
        assert checked == [1, 1] and len(runs[0][0]) == 2  # the mean is no seed: fell back


def test_a_tokenizer_run_builds_no_tensor_from_the_host(device_tensors, tmp_path) -> None:
    """The real tokenizer job, two steps past a dead-code check: its step, the loop and the
    monitor build no device tensor from Python values."""
    import warnings

    from helpers import write_elpv_subset

    from beitdomain.engine.tokenizer import train_tokenizer

    root = write_elpv_subset(tmp_path / "data", per_class=4)
    sets = [*TOKENIZER_SETS, "tokenizer.train.steps=2", "tokenizer.dead_code_every=1"]
    r = recipe(sets, **{"data.root": str(root)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # codebook-collapse warnings are expected this early
        train_tokenizer(r, tmp_path / "run", device="cpu", quiet=True)
    assert device_tensors == []


class _Ramp(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 8

    def __getitem__(self, i):
        return {"x": torch.tensor([i / 8, 1.0 - i / 8])}


class _FailInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("inductor: compiling the backward failed")


class _Uncompilable:
    """What the patched torch.compile returns: fails at the first call, or in its backward."""

    def __init__(self, module: nn.Module, where: str) -> None:
        self.module, self.where, self.calls = module, where, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.where == "call":
            raise RuntimeError("inductor: no working C++ compiler")
        return _FailInBackward.apply(self.module(*args, **kwargs))


def _fit_linear(compile: bool) -> tuple[nn.Module, nn.Module]:
    from beitdomain.config import TrainConfig
    from beitdomain.engine.train.loop import Trainer
    from beitdomain.engine.train.plan import build_loader, prepare_for_training

    torch.manual_seed(0)
    model = nn.Linear(2, 1)
    train = TrainConfig(steps=3, accum_steps=2, log_every=1, compile=compile)
    trainer = Trainer(
        model=prepare_for_training(model, train, torch.device("cpu")),
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        loader=build_loader(_Ramp(), 2, seed=0, num_workers=0),
        step_fn=lambda m, b: ((m(b["x"]) - 1).pow(2).mean(), {}),
        lr_at=lambda s: 0.1,
        total_steps=3,
        train=train,
        grad_clip=None,
        device=torch.device("cpu"),
        quiet=True,
    )
    trainer.fit()
    return model, trainer.model


@pytest.mark.parametrize("where", ["torch.compile", "call", "backward"])
def test_a_compile_failure_trains_on_eagerly_with_a_warning(monkeypatch, caplog, where) -> None:
    from beitdomain.engine.train.plan import CompiledWithFallback

    eager, _ = _fit_linear(compile=False)
    fakes: list[_Uncompilable] = []

    def fake_compile(module, **kwargs):
        if where == "torch.compile":
            raise RuntimeError("Dynamo is not supported on this Python")
        fakes.append(_Uncompilable(module, where))
        return fakes[-1]

    monkeypatch.setattr(torch, "compile", fake_compile)
    with caplog.at_level("WARNING"):
        model, held = _fit_linear(compile=True)
    warned = [r.getMessage() for r in caplog.records if "train.compile" in r.getMessage()]
    assert len(warned) == 1 and "RuntimeError" in warned[0] and "eager" in warned[0]
    assert torch.equal(model.weight, eager.weight) and torch.equal(model.bias, eager.bias)
    if where != "torch.compile":
        assert isinstance(held, CompiledWithFallback) and held.eager
        assert fakes[0].calls == 1  # tried once, then never again
        assert D.unwrap(held) is model


def test_an_error_of_the_model_itself_is_not_taken_for_a_compile_failure(monkeypatch) -> None:
    from beitdomain.config import TrainConfig
    from beitdomain.engine.train.plan import prepare_for_training

    class Broken(nn.Module):
        def forward(self, x):
            raise ValueError("the model's own bug")

    monkeypatch.setattr(torch, "compile", lambda module, **kw: _Uncompilable(module, "call"))
    held = prepare_for_training(Broken(), TrainConfig(compile=True), torch.device("cpu"))
    with pytest.raises(ValueError, match="own bug"):
        held(torch.zeros(1))
    assert not held.eager  # still compiling: the failure was not compile's
