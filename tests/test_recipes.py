"""Every shipped recipe loads, validates, and describes a buildable model and tokenizer."""

from pathlib import Path

import pytest

from beitdomain.config import RECIPES_DIR, load_recipe
from beitdomain.engine.build import backbone_config, mask_generator

RECIPES = sorted(p for p in RECIPES_DIR.glob("*.yaml") if p.stem != "base")


def test_the_issue_recipes_are_shipped():
    names = {p.stem for p in RECIPES}
    assert {
        "elpv-cpu",
        "elpv-gpu",
        "ct-dicom",
        "xray-dicom",
        "industrial-tiff",
        "continue-official-beit",
    } <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_is_valid(path: Path):
    r = load_recipe(path)
    assert r.name == path.stem
    text = path.read_text()
    assert text.lstrip().startswith("#"), "each recipe says in comments what it is for"
    cfg = backbone_config(r)
    assert cfg.img_size == r.data.image_size and cfg.in_chans == r.data.in_chans
    gen = mask_generator(r, cfg.grid)
    import numpy as np

    mask = gen(np.random.default_rng(0))
    assert mask.shape == cfg.grid
    assert mask.sum() == round(r.mask.ratio * cfg.num_patches)
    # the tokenizer's grid must equal the patch grid, or pre-training refuses to start
    from beitdomain.engine.tokenizer import build_tokenizer

    tok = build_tokenizer(r)
    assert (tok.config.grid_size,) * 2 == cfg.grid
    assert r.tokenizer.train.batch_size > 0 and r.finetune.train.batch_size > 0


def test_recipe_name_resolves_without_path():
    assert load_recipe("elpv-cpu").name == "elpv-cpu"
