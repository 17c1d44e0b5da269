"""`train_tokenizer` on real images: it learns, writes its files, follows its schedules."""

from __future__ import annotations

import itertools
import json
import math
import warnings

import numpy as np
import pytest
import torch
from helpers import TOKENIZER_SETS, recipe, write_elpv_subset
from PIL import Image

from beitdomain.engine.run.metrics_log import read_metrics
from beitdomain.tokenizer import anneal_steps, gumbel_temperature, kl_weight
from beitdomain.tokenizer.io import load_tokenizer

STEPS = 20


@pytest.fixture(scope="module")
def tok_run(tmp_path_factory):
    """One 20-step run of the tiny tokenizer on 24 real ELPV cells (shared by the tests)."""
    from beitdomain.engine.tokenizer import train_tokenizer

    tmp = tmp_path_factory.mktemp("tok")
    root = write_elpv_subset(tmp / "data", per_class=12)
    r = recipe(
        [
            *TOKENIZER_SETS,
            f"tokenizer.train.steps={STEPS}",
            "tokenizer.kl_warmup_fraction=0.25",
            "tokenizer.edge_weight=0.5",
        ],
        **{"data.root": str(root)},
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # codebook-collapse warnings are expected this early
        result = train_tokenizer(r, tmp / "run", device="cpu", quiet=True)
    return r, tmp / "run", result


def _steps(run) -> list[dict]:
    # the monitor also logs dead-code records; keep the per-step training records
    return [m for m in read_metrics(run / "metrics.jsonl") if "loss" in m]


def test_writes_its_files(tok_run):
    _, run, result = tok_run
    for name in ("tokenizer.safetensors", "tokenizer.json", "eval.json", "reconstructions.png"):
        assert (run / name).is_file(), name
    saved = json.loads((run / "eval.json").read_text())
    assert saved["psnr"] == pytest.approx(result["psnr"])
    assert saved["steps"] == STEPS and saved["heldout_images"] >= 1
    assert 0 < saved["fraction_used"] <= 1
    with Image.open(run / "reconstructions.png") as im:
        im.verify()
    with Image.open(run / "reconstructions.png") as im:
        # originals over reconstructions: at least two rows of 32 px tiles
        assert im.width >= 32 and im.height >= 2 * 32
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "completed" and manifest["command"] == "tokenizer train"


def test_reconstruction_improves(tok_run):
    _, run, _ = tok_run
    rec = _steps(run)
    assert [m["step"] for m in rec] == list(range(1, STEPS + 1))
    psnr = np.array([m["psnr"] for m in rec])
    recon = np.array([m["recon_loss"] for m in rec])
    assert np.all(np.isfinite(psnr)) and np.all(np.isfinite(recon))
    # a few dozen steps on real cells: clearly better than the start
    assert psnr[-5:].mean() > psnr[:5].mean() + 1.0, psnr
    assert recon[-5:].mean() < recon[:5].mean(), recon


def test_edge_term_enters_the_objective(tok_run):
    # tokenizer.edge_weight adds the L1 of image gradients to what is minimised; the logged loss
    # is the sum of the logged terms with their weights.
    r, run, _ = tok_run
    t = r.tokenizer
    for m in _steps(run):
        assert np.isfinite(m["edge_loss"]) and m["edge_loss"] > 0
        terms = m["recon_loss"] + m["kl_weight"] * m["kl"] + t.usage_weight * m["usage_kl"]
        assert m["loss"] == pytest.approx(terms + t.edge_weight * m["edge_loss"], rel=1e-4)


def test_run_folder_loads_as_a_tokenizer(tok_run):
    _, run, _ = tok_run
    tok = load_tokenizer(run)
    assert tok.config.in_chans == 1 and tok.config.input_size == 32
    x = torch.rand(3, 1, 32, 32)
    tokens = tok.eval().encode(x)
    assert tokens.shape == (3, 8, 8)  # 32 px / downsample 4
    assert tokens.dtype in (torch.int64, torch.int32, torch.long)
    assert int(tokens.min()) >= 0 and int(tokens.max()) < tok.vocab_size
    # the saved weights are the trained ones: the file's PSNR on held-out images is reproducible
    again = load_tokenizer(run / "tokenizer.safetensors")
    for (k, a), b in zip(tok.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k


def test_temperature_and_kl_follow_the_recipe(tok_run):
    r, run, _ = tok_run
    t = r.tokenizer
    warm = math.ceil(t.kl_warmup_fraction * STEPS)
    anneal = anneal_steps(t.temperature_anneal_fraction, STEPS)
    rec = _steps(run)
    for m in rec:
        s = m["step"] - 1  # logged after the optimizer step that used step s's values
        assert m["temperature"] == pytest.approx(
            gumbel_temperature(s, anneal, t.temperature_start, t.temperature_end), rel=1e-6
        )
        assert m["kl_weight"] == pytest.approx(kl_weight(s, warm, t.kl_weight), rel=1e-6, abs=0)
    temps = [m["temperature"] for m in rec]
    assert temps[0] == pytest.approx(1.0) and temps[-1] < 0.1  # annealed towards 1/16
    assert all(a > b for a, b in itertools.pairwise(temps[: anneal + 1]))
    assert temps[anneal:] == pytest.approx([t.temperature_end] * len(temps[anneal:]))  # held
    kls = [m["kl_weight"] for m in rec]
    assert kls[0] == 0.0 and kls[-1] == pytest.approx(t.kl_weight)
    assert kls[warm] == pytest.approx(t.kl_weight)  # warmed up after kl_warmup_fraction
