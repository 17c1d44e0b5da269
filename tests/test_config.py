from pathlib import Path

import pytest
import yaml

from beitdomain.config import (
    Recipe,
    RecipeError,
    dump_recipe,
    find_recipe,
    load_recipe,
    parse_set,
)


def write(p: Path, data: dict) -> Path:
    p.write_text(yaml.safe_dump(data))
    return p


def test_defaults_are_the_paper_recipe():
    r = load_recipe()
    assert r.mask.kind == "block" and r.mask.ratio == pytest.approx(0.4)
    assert r.optim.weight_decay == pytest.approx(0.05)
    assert r.optim.grad_clip == pytest.approx(3.0)
    # 1.5e-3 at batch 2048, per 256 images
    assert r.optim.base_lr * 2048 / 256 == pytest.approx(1.5e-3)
    assert r.finetune.optim.layer_decay == pytest.approx(0.65)
    assert r.model.drop_path == pytest.approx(0.1)


def test_precedence_defaults_extends_file_options_set(tmp_path):
    write(tmp_path / "base.yaml", {"optim": {"lr": 1.0, "min_lr": 0.5}, "train": {"steps": 10}})
    child = write(
        tmp_path / "child.yaml",
        {"extends": "base.yaml", "optim": {"lr": 2.0}, "train": {"batch_size": 8}},
    )
    r = load_recipe(child)
    assert (r.optim.lr, r.optim.min_lr, r.train.steps, r.train.batch_size) == (2.0, 0.5, 10, 8)
    r = load_recipe(child, options={"optim.lr": 3.0, "train.steps": None})
    assert r.optim.lr == 3.0 and r.train.steps == 10  # None means "option not given"
    r = load_recipe(child, options={"optim.lr": 3.0}, sets=["optim.lr=4e-4"])
    assert r.optim.lr == pytest.approx(4e-4)  # --set wins, and YAML's '4e-4' string becomes float


def test_partial_nested_section_keeps_section_defaults(tmp_path):
    r = load_recipe(write(tmp_path / "r.yaml", {"finetune": {"optim": {"lr": 1e-3}}}))
    assert r.finetune.optim.lr == pytest.approx(1e-3)
    assert r.finetune.optim.layer_decay == pytest.approx(0.65)  # not the pre-training default
    assert r.tokenizer.optim.weight_decay == pytest.approx(0.01)


def test_unknown_key_names_key_file_and_valid_keys(tmp_path):
    p = write(tmp_path / "bad.yaml", {"optim": {"learning_rate": 1e-3}})
    with pytest.raises(RecipeError) as e:
        load_recipe(p)
    msg = str(e.value)
    assert "optim.learning_rate" in msg and str(p) in msg and "weight_decay" in msg


def test_unknown_key_in_base_names_the_base_file(tmp_path):
    write(tmp_path / "base.yaml", {"trian": {"steps": 1}})
    child = write(tmp_path / "child.yaml", {"extends": "base.yaml"})
    with pytest.raises(RecipeError, match=r"base\.yaml.*unknown key 'trian'.*Did you mean 'train'"):
        load_recipe(child)


def test_wrong_type_and_choice_errors(tmp_path):
    with pytest.raises(RecipeError, match=r"train.steps.*'many'"):
        load_recipe(write(tmp_path / "a.yaml", {"train": {"steps": "many"}}))
    with pytest.raises(RecipeError, match=r"--set mask.kind=grid.*'block', 'random'"):
        load_recipe(sets=["mask.kind=grid"])
    with pytest.raises(RecipeError, match="expected section.key=value"):
        load_recipe(sets=["optim.lr"])
    with pytest.raises(RecipeError, match="is a value, not a section"):
        load_recipe(sets=["optim.lr.x=1"])


def test_extends_cycle_is_reported(tmp_path):
    write(tmp_path / "a.yaml", {"extends": "b.yaml"})
    write(tmp_path / "b.yaml", {"extends": "a.yaml"})
    with pytest.raises(RecipeError, match="cycle"):
        load_recipe(tmp_path / "a.yaml")


def test_missing_recipe_lists_shipped(tmp_path):
    with pytest.raises(RecipeError, match="not found"):
        find_recipe(tmp_path / "nope.yaml")


def test_dump_round_trip(tmp_path):
    r = load_recipe(
        sets=["data.window={center: 40, width: 400}", "curve.inits={domain: runs/x, scratch: null}"]
    )
    dump_recipe(r, tmp_path / "r.yaml")
    again = load_recipe(tmp_path / "r.yaml")
    assert again == r
    assert isinstance(again, Recipe) and again.data.percentiles == (0.5, 99.5)


def test_parse_set_yaml_values():
    assert parse_set("curve.seeds=[0, 1]") == ("curve.seeds", [0, 1])
    assert parse_set("model.init=null") == ("model.init", None)
    assert parse_set("data.root=/a=b") == ("data.root", "/a=b")
