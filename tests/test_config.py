import re
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from beitdomain.config import (
    Recipe,
    RecipeError,
    dump_recipe,
    find_recipe,
    load_recipe,
    parse_set,
    recipe_to_dict,
)


def write(p: Path, data: dict) -> Path:
    p.write_text(yaml.safe_dump(data))
    return p


def test_defaults_are_the_paper_recipe():
    r = load_recipe()
    assert r.mask.kind == "block" and r.mask.ratio == pytest.approx(0.4)
    assert r.pretrain.optim.weight_decay == pytest.approx(0.05)
    assert r.pretrain.optim.grad_clip == pytest.approx(3.0)
    # 1.5e-3 at batch 2048, per 256 images
    assert r.pretrain.optim.base_lr * 2048 / 256 == pytest.approx(1.5e-3)
    assert r.finetune.optim.layer_decay == pytest.approx(0.65)
    assert r.model.drop_path == pytest.approx(0.1)


def test_precedence_defaults_extends_file_options_set(tmp_path):
    base = {"pretrain": {"optim": {"lr": 1.0, "min_lr": 0.5}, "train": {"steps": 10}}}
    write(tmp_path / "base.yaml", base)
    child = write(
        tmp_path / "child.yaml",
        {"extends": "base.yaml", "pretrain": {"optim": {"lr": 2.0}, "train": {"batch_size": 8}}},
    )
    r = load_recipe(child)
    p = r.pretrain
    assert (p.optim.lr, p.optim.min_lr, p.train.steps, p.train.batch_size) == (2.0, 0.5, 10, 8)
    r = load_recipe(child, options={"pretrain.optim.lr": 3.0, "pretrain.train.steps": None})
    # None means "option not given"
    assert r.pretrain.optim.lr == 3.0 and r.pretrain.train.steps == 10
    r = load_recipe(child, options={"pretrain.optim.lr": 3.0}, sets=["pretrain.optim.lr=4e-4"])
    # --set wins, and YAML's '4e-4' string becomes float
    assert r.pretrain.optim.lr == pytest.approx(4e-4)


def test_partial_nested_section_keeps_section_defaults(tmp_path):
    r = load_recipe(write(tmp_path / "r.yaml", {"finetune": {"optim": {"lr": 1e-3}}}))
    assert r.finetune.optim.lr == pytest.approx(1e-3)
    assert r.finetune.optim.layer_decay == pytest.approx(0.65)  # not the pre-training default
    assert r.tokenizer.optim.weight_decay == pytest.approx(0.01)


def test_unknown_key_names_key_file_and_valid_keys(tmp_path):
    p = write(tmp_path / "bad.yaml", {"pretrain": {"optim": {"learning_rate": 1e-3}}})
    with pytest.raises(RecipeError) as e:
        load_recipe(p)
    msg = str(e.value)
    assert "pretrain.optim.learning_rate" in msg and str(p) in msg and "weight_decay" in msg


def test_unknown_key_in_base_names_the_base_file(tmp_path):
    write(tmp_path / "base.yaml", {"pretrian": {"train": {"steps": 1}}})
    child = write(tmp_path / "child.yaml", {"extends": "base.yaml"})
    with pytest.raises(
        RecipeError, match=r"base\.yaml.*unknown key 'pretrian'.*Did you mean 'pretrain'"
    ):
        load_recipe(child)


def test_wrong_type_and_choice_errors(tmp_path):
    with pytest.raises(RecipeError, match=r"pretrain.train.steps.*'many'"):
        load_recipe(write(tmp_path / "a.yaml", {"pretrain": {"train": {"steps": "many"}}}))
    with pytest.raises(RecipeError, match=r"--set mask.kind=grid.*'block', 'random'"):
        load_recipe(sets=["mask.kind=grid"])
    with pytest.raises(RecipeError, match="expected section.key=value"):
        load_recipe(sets=["pretrain.optim.lr"])
    with pytest.raises(RecipeError, match="is a value, not a section"):
        load_recipe(sets=["pretrain.optim.lr.x=1"])


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


def test_recipe_sections_mirror_the_jobs():
    import dataclasses

    from beitdomain.config import JOBS

    r = load_recipe()
    sections = [f.name for f in dataclasses.fields(r) if dataclasses.is_dataclass(f.type)]
    names = [f.name for f in dataclasses.fields(r)]
    first = ["data", "model", "mask", "tokenizer", "pretrain", "finetune", "curve"]
    assert names[2:] == [*first, "segment"]
    assert not sections or set(sections) <= set(names)
    for job in JOBS:  # every job section has the same train + optim shape
        section = getattr(r, job)
        assert type(section.train).__name__ == "TrainConfig"
        assert type(section.optim).__name__ == "OptimConfig"


@pytest.mark.parametrize(
    ("old", "new"),
    [("train.steps=5", "pretrain.train.steps"), ("optim.lr=1e-3", "pretrain.optim.lr")],
)
def test_old_top_level_keys_say_where_they_moved(tmp_path, old, new):
    with pytest.raises(RecipeError, match=rf"'{old.split('=')[0]}' has moved to '{new}'"):
        load_recipe(sets=[old])
    section, key = old.split("=")[0].split(".")
    p = write(tmp_path / "old.yaml", {section: {key: 5}})
    with pytest.raises(RecipeError, match=rf"old\.yaml.*has moved to '{new}'"):
        load_recipe(p)
    with pytest.raises(RecipeError, match=rf"has moved to '{new}'"):
        load_recipe(options={old.split("=")[0]: 5})


def test_trust_cannot_come_from_a_recipe(tmp_path):
    for source in (
        lambda: load_recipe(sets=["model.trust_pickle=true"]),
        lambda: load_recipe(write(tmp_path / "a.yaml", {"model": {"trust_pickle": True}})),
        lambda: load_recipe(write(tmp_path / "b.yaml", {"model": {"trust_pickle": False}})),
        lambda: load_recipe(sets=["model={trust_pickle: true}"]),
    ):
        with pytest.raises(RecipeError, match="model.trust_pickle.*--trust-pickle"):
            source()
    assert "trust_pickle" not in yaml.safe_dump(recipe_to_dict(load_recipe()))


@pytest.mark.parametrize(
    ("item", "needs"),
    [
        ("pretrain.train.epochs=-1", "> 0"),
        ("pretrain.train.epochs=0", "> 0"),
        ("pretrain.train.epochs=1e400", "finite"),
        ("pretrain.train.steps=0", ">= 1"),
        ("finetune.train.steps=-5", ">= 1"),
        ("tokenizer.train.accum_steps=0", ">= 1"),
        ("pretrain.train.batch_size=0", ">= 1"),
        ("finetune.train.batch_size=-8", ">= 1"),
        ("pretrain.optim.lr=-1", ">= 0"),
        ("pretrain.optim.lr=.nan", "finite"),
        ("pretrain.train.ckpt_every=0", ">= 1"),
        ("finetune.train.log_every=0", ">= 1"),
        ("model.patch_size=0", ">= 1"),
        ("data.crop_scale=[2, 1]", "<= 1"),
        ("data.crop_scale=[0.8, 0.5]", "must not exceed"),
        ("data.num_workers=-1", ">= 0"),
        ("mask.ratio=1.5", "< 1"),
        ("curve.seeds=[0, -1]", ">= 0"),
    ],
)
def test_out_of_range_values_name_key_value_and_range(item, needs):
    key = item.split("=")[0]
    with pytest.raises(RecipeError, match=re.escape(key)) as e:
        load_recipe(sets=[item])
    assert needs in str(e.value)


def _numeric_keys() -> list[tuple[str, object]]:
    """Every numeric recipe key (dotted) and its type hint."""
    import dataclasses
    import typing

    from beitdomain.config import Recipe

    out = []

    def walk(cls, prefix):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            hint = hints[f.name]
            inner = [a for a in (hint, *typing.get_args(hint)) if dataclasses.is_dataclass(a)]
            if inner:
                walk(inner[0], f"{prefix}{f.name}.")
            elif {int, float} & {hint, *typing.get_args(hint)}:
                out.append((f"{prefix}{f.name}", hint))

    walk(Recipe, "")
    return out


NUMERIC_KEYS = _numeric_keys()


def test_the_fuzzed_keys_cover_every_job_section():
    keys = {k for k, _ in NUMERIC_KEYS}
    for job in ("tokenizer", "pretrain", "finetune"):
        assert {f"{job}.train.steps", f"{job}.optim.lr"} <= keys
    assert {"data.num_workers", "model.patch_size", "mask.ratio", "seed"} <= keys


@settings(max_examples=300, deadline=None)
@given(
    key=st.sampled_from([k for k, _ in NUMERIC_KEYS]),
    value=st.one_of(
        st.integers(min_value=-(10**30), max_value=10**30),
        st.floats(allow_nan=True, allow_infinity=True),
        st.sampled_from([0, -1, 1, 2, 0.5, 1e400, -1e400, 10**400, True, "x", None]),
    ),
    via=st.sampled_from(["set", "option", "file"]),
)
def test_random_numeric_values_load_or_name_the_key(tmp_path_factory, key, value, via):
    # Whatever the value, the loader either builds a recipe or raises a RecipeError naming the
    # key: never another exception.
    try:
        if via == "set":
            r = load_recipe(sets=[f"{key}={yaml.safe_dump(value).splitlines()[0]}"])
        elif via == "option":
            r = load_recipe(options={key: value})
        else:
            node: dict = {}
            cur = node
            parts = key.split(".")
            for p in parts[:-1]:
                cur = cur.setdefault(p, {})
            cur[parts[-1]] = value
            path = tmp_path_factory.mktemp("fuzz") / "r.yaml"
            path.write_text(yaml.safe_dump(node))
            r = load_recipe(path)
    except RecipeError as e:
        assert key in str(e) or key.rsplit(".", 1)[-1] in str(e)
    else:
        assert r is not None


@pytest.mark.parametrize(
    "sets, key",
    [
        (["finetune.labels=1pct"], "finetune.labels"),
        (['curve.fractions=["1%", "5 pct"]'], "curve.fractions"),
        (['curve.fraction_seeds={"ten%": [0]}'], "curve.fraction_seeds"),
    ],
)
def test_a_label_amount_that_does_not_parse_fails_when_the_recipe_loads(sets, key):
    # It used to pass the recipe and fail only once the data had been scanned.
    with pytest.raises(RecipeError, match=key):
        load_recipe(sets=sets)
    assert load_recipe(sets=["finetune.labels=5/class"]).finetune.labels == "5/class"
