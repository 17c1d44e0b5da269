"""`beitdomain ablation`: each variant pre-trains with its own masking and target and nothing
else changed, every variant reaches one curve, a re-run skips what is finished, a reused run is
checked, and the model regresses raw pixels when `model.norm_pix_loss` is false."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import FINETUNE_SETS, PRETRAIN_SETS, flat, recipe, write_separable_set
from typer.testing import CliRunner

from beitdomain.cli.app import app
from beitdomain.config import load_recipe
from beitdomain.engine.ablation import VARIANTS, parse_variants, run_ablation
from beitdomain.eval.report import read_csv
from beitdomain.models.backbone import BackboneConfig
from beitdomain.models.mim import BeitMIM
from beitdomain.tokenizer import create_tokenizer
from beitdomain.tokenizer.io import save_tokenizer
from beitdomain.user import UserError

CURVE = [
    "pretrain.train.steps=2",
    "finetune.train.steps=2",
    "curve.fractions=[50%]",
    "curve.seeds=[0,1]",
    "curve.metric=accuracy",
    "curve.baselines=false",
    "curve.init_sets={domain: [finetune.optim.lr=1e-3]}",
]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ablation")
    root = write_separable_set(tmp / "data", per_class=10)
    tok = save_tokenizer(create_tokenizer("tiny", in_chans=1, input_size=32), tmp / "tok")
    return root, tok


def _recipe(data, *sets):
    root, tok = data
    return recipe(
        [*PRETRAIN_SETS, *FINETUNE_SETS, *CURVE, *sets],
        **{"data.root": str(root), "tokenizer.path": str(tok)},
    )


@pytest.fixture(scope="module")
def ablation(data, tmp_path_factory):
    """All four variants, then the same call again with pre-training patched to fail."""
    out = tmp_path_factory.mktemp("abl") / "run"
    result = run_ablation(_recipe(data), out, device="cpu", quiet=True)
    return out, result


def test_each_variant_changes_only_its_own_keys(ablation):
    out, _ = ablation
    base = None
    for name, v in VARIANTS.items():
        r = load_recipe(out / f"pretrain-{name}" / "recipe.yaml")
        want = dict(s.split("=", 1) for s in v.sets)
        assert r.mask.kind == want["mask.kind"], name
        assert r.model.target == want["model.target"], name
        if "model.norm_pix_loss" in want:
            assert r.model.norm_pix_loss is (want["model.norm_pix_loss"] == "true"), name
        rest = (r.pretrain, r.data.image_size, r.model.preset, r.mask.ratio, r.seed)
        base = base or rest
        assert rest == base, f"{name} changed more than its ablation's keys"


def test_every_variant_is_an_arm_of_one_curve_with_the_same_settings(ablation):
    out, result = ablation
    rows = read_csv(out / "curve" / "curve.csv")
    assert {str(r["init"]) for r in rows} == {*VARIANTS, "scratch"}
    assert {(str(r["init"]), int(r["seed"])) for r in rows} == {
        (i, s) for i in (*VARIANTS, "scratch") for s in (0, 1)
    }
    grid = json.loads((out / "curve" / "grid.json").read_text())
    # Every pre-trained variant fine-tunes with the recipe's pre-trained arm's settings.
    assert grid["init_sets"] == {n: ["finetune.optim.lr=1e-3"] for n in VARIANTS}
    assert set(result["variants"]) == set(VARIANTS)
    text = (out / "ablation.md").read_text()
    for name in (*VARIANTS, "scratch"):
        assert f"| {name} |" in text
    for question in ("blockwise vs random masking", "visual tokens vs raw pixel regression"):
        assert f"- {question}, 50% (6 labels):" in text
        assert "of 2 seeds" in text


def test_a_rerun_skips_finished_variants_and_cells(ablation, data, monkeypatch):
    out, _ = ablation
    before = (out / "curve" / "curve.csv").read_bytes()

    def no_training(*a, **kw):
        raise AssertionError("a finished variant was pre-trained again")

    monkeypatch.setattr("beitdomain.engine.ablation.pretrain", no_training)
    monkeypatch.setattr("beitdomain.engine.curve.run.finetune", no_training)
    run_ablation(_recipe(data), out, device="cpu", quiet=True)
    assert (out / "curve" / "curve.csv").read_bytes() == before


def test_a_reused_run_must_match_its_variant(ablation, data, tmp_path):
    out, _ = ablation
    with pytest.raises(UserError, match=r"mask\.kind=random.*'beit' needs mask\.kind=block"):
        run_ablation(
            _recipe(data),
            tmp_path / "a",
            variants=["beit"],
            pretrained={"beit": str(out / "pretrain-random-mask")},
            device="cpu",
        )
    with pytest.raises(UserError, match=r"model depth=2, the variant 'beit' needs model depth=3"):
        run_ablation(
            _recipe(data, "model.depth=3"),
            tmp_path / "d",
            variants=["beit"],
            pretrained={"beit": str(out / "pretrain-beit")},
            device="cpu",
        )
    with pytest.raises(UserError, match="not a finished pre-training run"):
        run_ablation(
            _recipe(data),
            tmp_path / "b",
            variants=["beit"],
            pretrained={"beit": str(tmp_path)},
            device="cpu",
        )
    with pytest.raises(UserError, match="not among the variants"):
        run_ablation(_recipe(data), tmp_path / "c", variants=["beit"], pretrained={"pixels": "x"})


def test_a_reused_run_is_not_pre_trained_again(ablation, data, tmp_path, monkeypatch):
    out, _ = ablation
    trained = []

    def record(recipe, folder, **kw):
        trained.append(folder)

    monkeypatch.setattr("beitdomain.engine.ablation.pretrain", record)
    run_ablation(
        _recipe(data, "curve.seeds=[0]"),
        tmp_path / "r",
        variants=["beit", "pixels"],
        pretrained={"beit": str(out / "pretrain-beit"), "pixels": str(out / "pretrain-pixels")},
        scratch=False,
        device="cpu",
        quiet=True,
    )
    assert trained == []
    rows = read_csv(tmp_path / "r" / "curve" / "curve.csv")
    assert {str(r["init"]) for r in rows} == {"beit", "pixels"}


def test_token_variants_need_a_tokenizer(data, tmp_path):
    r = _recipe(data, "tokenizer.path=null")
    with pytest.raises(UserError, match=r"--tokenizer RUN.*--variants pixels,pixels-norm"):
        run_ablation(r, tmp_path / "x", variants=["beit", "pixels"], device="cpu")
    assert not (tmp_path / "x").exists()  # refused before anything was written


def test_unknown_variant_names_the_valid_ones():
    assert parse_variants(None) == list(VARIANTS)
    assert parse_variants("pixels, beit,pixels") == ["pixels", "beit"]
    with pytest.raises(UserError, match="unknown blocks; choose from beit, random-mask"):
        parse_variants("beit,blocks")


def test_cli_refuses_unknown_variant_in_one_line(tmp_path):
    res = CliRunner().invoke(app, ["ablation", "--variants", "nope", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2
    assert "unknown nope" in flat(res.output) and "Traceback" not in res.output


def test_raw_pixel_target_is_the_patch_itself_and_normalized_is_per_patch():
    cfg = BackboneConfig(img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2, in_chans=1)
    x = torch.rand(2, 1, 16, 16)
    raw = BeitMIM.from_config(cfg, target="pixels", norm_pix_loss=False).pixel_targets(x)
    norm = BeitMIM.from_config(cfg, target="pixels", norm_pix_loss=True).pixel_targets(x)
    assert torch.equal(raw[0, 0], x[0, 0, :8, :8].reshape(-1))
    assert torch.allclose(norm.mean(-1), torch.zeros(2, 4), atol=1e-5)
    assert torch.allclose(norm.std(-1), torch.ones(2, 4), atol=1e-3)
