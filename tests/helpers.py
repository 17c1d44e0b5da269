"""Shared pieces of the tests: tiny recipes, small image sets, DICOMs, a frozen tiny tokenizer,
command lines, comparisons, and timm / transformers BEiTs in the official layouts.

Not a conftest: test files import what they need (`from helpers import ...`), so a reader of a
test sees where its data comes from. Sizes follow the presets built for tests: the 'tiny'
tokenizer at 32 px (8x8 tokens) and the 'tiny' backbone at 64 px with 8 px patches (8x8 grid).
"""

from __future__ import annotations

import csv
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent

# The settings every tiny run shares: single-process loading (2 cores), logs each step.
_COMMON = [
    "data.num_workers=0",
    "data.image_size=64",
    "data.tokenizer_size=32",
    "data.in_chans=1",
]

TOKENIZER_SETS = [
    *_COMMON,
    "tokenizer.preset=tiny",
    "tokenizer.train.batch_size=8",
    "tokenizer.train.log_every=1",
    "tokenizer.train.ckpt_every=5",
    "tokenizer.sample_every=1000",
    "tokenizer.dead_code_every=10",
    "tokenizer.optim.lr=3e-3",
    "tokenizer.optim.warmup_steps=2",
]

PRETRAIN_SETS = [
    *_COMMON,
    "model.preset=tiny",
    "model.drop_path=0.0",
    "pretrain.train.batch_size=8",
    "pretrain.train.log_every=1",
    "pretrain.train.ckpt_every=5",
    "pretrain.optim.lr=1e-3",
    "pretrain.optim.warmup_steps=2",
]

FINETUNE_SETS = [
    *_COMMON,
    "model.preset=tiny",
    "finetune.drop_path=0.0",
    "finetune.train.batch_size=8",
    "finetune.train.min_steps=0",
    "finetune.train.log_every=1",
    "finetune.train.ckpt_every=5",
    "finetune.optim.lr=2e-3",
    "finetune.optim.warmup_steps=2",
    "finetune.optim.layer_decay=0.9",
    "finetune.label_smoothing=0.0",
    "finetune.head_init_scale=0.01",
    "data.val_fraction=0.15",
    "data.test_fraction=0.3",
]


def checkpointed_sets(job: str, steps: int, ckpt_every: int) -> list[str]:
    """`--set`s for a deterministic `job` run ('tokenizer', 'pretrain', 'finetune') of `steps`
    steps with a checkpoint every `ckpt_every`: what a bit-for-bit resume check needs."""
    return [
        f"{job}.train.steps={steps}",
        f"{job}.train.ckpt_every={ckpt_every}",
        f"{job}.train.deterministic=true",
    ]


def recipe(sets: Sequence[str], **options: Any) -> Any:
    """A recipe from defaults, dotted `options` (e.g. {'data.root': ...}) and `--set` strings."""
    from beitdomain.config import load_recipe

    return load_recipe(None, {k: v for k, v in options.items()}, list(sets))


def sets_to_args(sets: Iterable[str]) -> list[str]:
    """`--set a=b --set c=d` for the command line."""
    args: list[str] = []
    for s in sets:
        args += ["--set", s]
    return args


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------


def elpv_root() -> Path | None:
    """The elpv-dataset package's image folder (real solar-cell EL images), if installed."""
    try:
        import elpv_dataset
    except ImportError:
        return None
    data = Path(elpv_dataset.__file__).resolve().parent / "data"
    return data if (data / "labels.csv").is_file() else None


def write_elpv_subset(dst: Path, per_class: int = 16, size: int = 64) -> Path:
    """An ImageFolder `dst/{defective,functional}/*.png` of real ELPV cells, resized to `size`.

    Only unambiguous cells are taken (defect probability 1.0 vs 0.0, monocrystalline), so the two
    classes are well separated; the first `per_class` of each in file order, so it is fixed.
    Skips the calling test when the package is missing.
    """
    src = elpv_root()
    if src is None:
        pytest.skip("elpv-dataset is not installed (pip install -e '.[demo]')")
    from PIL import Image

    chosen: dict[str, list[str]] = {"defective": [], "functional": []}
    for line in (src / "labels.csv").read_text().splitlines():
        parts = line.split()
        if len(parts) != 3 or parts[2] != "mono":
            continue
        name = {"1.0": "defective", "0.0": "functional"}.get(parts[1])
        if name and len(chosen[name]) < per_class:
            chosen[name].append(parts[0])
    for label, files in chosen.items():
        (dst / label).mkdir(parents=True, exist_ok=True)
        for rel in files:
            img = Image.open(src / rel).convert("L").resize((size, size), Image.BILINEAR)
            img.save(dst / label / Path(rel).name)
    return dst


def write_separable_set(dst: Path, per_class: int = 16, size: int = 64, seed: int = 0) -> Path:
    """An ImageFolder of generated grayscale PNGs: `horizontal` vs `vertical` stripes, random
    period, phase and noise. Orientation survives per-image percentile normalization, crops and
    horizontal flips, so a tiny model can separate the classes in a few dozen steps."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    for label, coord in (("horizontal", yy), ("vertical", xx)):
        (dst / label).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            period = rng.uniform(10, 20)
            wave = np.sin(2 * np.pi * coord / period + rng.uniform(0, 2 * np.pi))
            img = 128 + 90 * wave + rng.normal(0, 20, size=(size, size))
            img = np.clip(img, 0, 255).astype(np.uint8)
            Image.fromarray(img).save(dst / label / f"{label}_{i:03d}.png")
    return dst


def list_images(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() == ".png")


def bundled_dicom(name: str = "CT_small.dcm") -> Path:
    """A DICOM file shipped with pydicom (no download)."""
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"pydicom test file {name} is not available")
    return Path(path)


def write_dicom_with_phi(
    dst: Path,
    name: str,
    patient_id: str,
    birth_date: str,
    source: str = "CT_small.dcm",
    seed: int | None = None,
) -> Path:
    """A copy of a bundled DICOM with the given identifying attributes (and optional pixel noise,
    so copies differ)."""
    import pydicom

    ds = pydicom.dcmread(bundled_dicom(source))
    ds.PatientName = name
    ds.PatientID = patient_id
    ds.PatientBirthDate = birth_date
    ds.OtherPatientIDs = patient_id
    if seed is not None:
        arr = ds.pixel_array.copy()
        rng = np.random.default_rng(seed)
        arr = (arr + rng.integers(-20, 20, size=arr.shape)).astype(arr.dtype)
        ds.PixelData = arr.tobytes()
    dst.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(dst)
    return dst


def write_tiny_tokenizer(dst: Path, seed: int = 0) -> Path:
    """A frozen 'tiny' tokenizer for the 1-channel test images (32 px views -> 8x8 tokens), its
    weights drawn after `torch.manual_seed(seed)`, saved to the folder `dst`."""
    import torch

    from beitdomain.tokenizer import create_tokenizer
    from beitdomain.tokenizer.io import save_tokenizer

    torch.manual_seed(seed)
    return save_tokenizer(create_tokenizer("tiny", in_chans=1, input_size=32), dst)


# --------------------------------------------------------------------------------------------
# Weights, files and processes
# --------------------------------------------------------------------------------------------


def load_tensors(path: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(path))


def assert_same_tensors(a: dict[str, Any], b: dict[str, Any], what: str = "") -> None:
    """Bitwise equality of two state dicts (same keys, torch.equal on every tensor)."""
    import torch

    assert sorted(a) == sorted(b), f"{what}: different keys"
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{what}: {len(differ)} tensors differ, e.g. {differ[:5]}"


def lose_newest_checkpoint(run: Path, *outputs: str) -> None:
    """Deletes `run`'s newest checkpoint (with its checksum sidecar) and the named files the
    finished run wrote (`outputs`), so that `resume=True` has to redo the last steps."""
    from beitdomain.engine.run.checkpoint import CheckpointManager

    mgr = CheckpointManager(run / "checkpoints")
    step = mgr.steps()[-1]
    mgr.path_for(step).unlink()
    (run / "checkpoints" / f"step-{step:08d}.pt.json").unlink()
    for name in outputs:
        (run / name).unlink()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli_env(**extra: str) -> dict[str, str]:
    """Environment for a `beitdomain` subprocess: two threads, no GPU, this checkout first."""
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        CUDA_VISIBLE_DEVICES="",
        MPLBACKEND="Agg",
        PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
        COLUMNS="200",
    )
    env.update(extra)
    return env


def cli_command(*args: str) -> list[str]:
    """The `beitdomain` command line through this interpreter (works without the console script)."""
    return [sys.executable, "-m", "beitdomain.cli.app", "--device", "cpu", "--quiet", *args]


def run_cli(args: Sequence[str], timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        cli_command(*args),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=cli_env(**env),
        cwd=REPO,
    )


def cli(*args: str) -> Any:
    """`beitdomain --device cpu --quiet ARGS` in this process (typer's CliRunner); the result's
    `.text` is its output with rich's line wrapping undone."""
    from typer.testing import CliRunner

    from beitdomain.cli.app import app

    res = CliRunner().invoke(app, ["--device", "cpu", "--quiet", *args])
    res.text = flat(res.output)
    return res


def scratch_curve_args(data: Path, out: Path, sets: Sequence[str]) -> list[str]:
    """`curve` arguments for one cell from scratch (all labels, one seed) on `data` into `out`."""
    cell = ["--init", "scratch", "--fractions", "100%", "--seeds", "1"]
    return ["curve", "--data", str(data), *cell, "--out", str(out), *sets_to_args(sets)]


def write_labels_csv(path: Path, rows: Iterable[Sequence[str]]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        w.writerows(rows)
    return path


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def flat(text: str) -> str:
    """CLI output with rich's line wrapping undone (for substring checks)."""
    return " ".join(text.split())


def said(output: str, *needles: str) -> bool:
    """Whether CLI output contains every needle, ignoring whitespace (rich wraps long paths
    mid-word at the terminal width)."""
    squashed = "".join(output.split())
    return all("".join(n.split()) in squashed for n in needles)


# --------------------------------------------------------------------------------------------
# Official layouts: timm and transformers BEiTs to convert from and compare against
# --------------------------------------------------------------------------------------------


def randomize(model: Any, seed: int = 0) -> None:
    """Fills every parameter with seeded noise around 0 (matrices) or 1 (vectors): zero-initialized
    tables and unit norms would hide mapping mistakes."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if p.ndim == 1 else 0.0))


def timm_beit_kwargs(cfg: Any, **extra: Any) -> dict[str, Any]:
    """`timm.create_model` keyword arguments for a beitdomain backbone config (its drop path
    left at timm's default), plus `extra`."""
    from beitdomain.models.backbone import beit_kwargs

    kw = beit_kwargs(cfg)
    kw.pop("drop_path_rate")
    return {**kw, **extra}


# `timm_beit` arguments for the token features (no pooling, no fc_norm): unilm's pre-training
# layout, `forward_features` of a BeitMIM.
TIMM_TOKENS = dict(global_pool="", use_fc_norm=False)


def timm_beit(cfg: Any, seed: int, **extra: Any) -> Any:
    """timm's BEiT with `cfg`'s architecture, no head and `extra` `create_model` arguments
    (e.g. `**TIMM_TOKENS`), randomized with `seed`, in eval mode."""
    import timm

    model = timm.create_model(
        "beit_base_patch16_224", num_classes=0, **timm_beit_kwargs(cfg, **extra)
    ).eval()
    randomize(model, seed)
    return model


# The 'tiny' backbone preset (8 px patches, width 64, 2 blocks of 2 heads, MLP 256, 3 channels)
# in transformers' `BeitConfig` names, with timm's LayerNorm eps so that outputs compare exactly.
TINY_HF_BEIT = {
    "patch_size": 8,
    "num_channels": 3,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 256,
    "layer_norm_eps": 1e-6,
}


def tiny_hf_beit_config(image_size: int = 32, **changes: Any) -> Any:
    """A transformers `BeitConfig` of `TINY_HF_BEIT` at `image_size`; `changes` set the rest.
    Skips the calling test without transformers."""
    transformers = pytest.importorskip("transformers")
    return transformers.BeitConfig(image_size=image_size, **TINY_HF_BEIT, **changes)
