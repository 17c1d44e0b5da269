"""Every error a user can act on is a `UserError`: the command line prints it as one line and
exits 2, with no traceback; a recipe can never grant trust to a pickle."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import yaml
from helpers import FINETUNE_SETS, PRETRAIN_SETS, sets_to_args, write_separable_set
from typer.testing import CliRunner

from beitdomain.cli.app import app

runner = CliRunner()


class RunsCode:
    """Unpickling this creates a folder: proof that a pickle's code ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """A small image folder, a tiny tokenizer, a broken tokenizer and DALL-E-like pickles."""
    from beitdomain.tokenizer import create_tokenizer
    from beitdomain.tokenizer.io import save_tokenizer

    tmp = tmp_path_factory.mktemp("bad")
    root = write_separable_set(tmp / "data", per_class=4)
    tok = save_tokenizer(create_tokenizer("tiny", in_chans=1, input_size=32), tmp / "tok")
    broken = tmp / "broken-tok"
    broken.mkdir()
    (broken / "tokenizer.json").write_text("{not json")
    (broken / "tokenizer.safetensors").write_bytes(b"")
    for name in ("encoder.pkl", "decoder.pkl"):
        torch.save({"w": torch.zeros(1)}, tmp / name)
    return {"root": root, "tok": tok, "broken": broken, "tmp": tmp}


def _bad_inputs(f: dict[str, Path]) -> dict[str, tuple[list[str], str]]:
    """name -> (arguments, a piece of the message that says what to change)."""
    root, tmp = str(f["root"]), f["tmp"]
    out = ["--out", str(tmp / "never")]
    tiny_pre = sets_to_args([*PRETRAIN_SETS, "pretrain.train.steps=1"])
    tiny_ft = sets_to_args([*FINETUNE_SETS, "finetune.train.steps=1"])
    pre_tok = ["pretrain", "--data", root, "--tokenizer"]
    tok_train = ["tokenizer", "train", "--data", root, "--set"]
    dalle = ["tokenizer", "import-dalle", str(tmp / "encoder.pkl"), str(tmp / "decoder.pkl")]

    def setting(command: str, value: str) -> list[str]:
        return [command, "--data", root, "--set", value, *out]

    return {
        "old top-level train key": (setting("pretrain", "train.steps=5"), "pretrain.train.steps"),
        "old top-level optim key": (setting("finetune", "optim.lr=1e-3"), "pretrain.optim.lr"),
        "steps out of range": (setting("finetune", "finetune.train.steps=0"), ">= 1"),
        "nan learning rate": (setting("pretrain", "pretrain.optim.lr=.nan"), "finite"),
        "crop scale reversed": (setting("pretrain", "data.crop_scale=[2, 1]"), "data.crop_scale"),
        "trust in a --set": (setting("finetune", "model.trust_pickle=true"), "--trust-pickle"),
        "unknown recipe": (["finetune", "-r", "no-such-recipe", *out], "not found"),
        "missing data folder": (["finetune", "--data", str(tmp / "nowhere"), *out], "nowhere"),
        "missing labels CSV": (
            ["finetune", "--data", root, "--labels-csv", str(tmp / "none.csv"), *tiny_ft, *out],
            "none.csv",
        ),
        "bad --labels": (
            ["finetune", "--data", root, "--labels", "lots", *tiny_ft, *out],
            "5/class",
        ),
        "missing tokenizer": (
            ["pretrain", "--data", root, "--tokenizer", str(tmp / "no-tok"), *tiny_pre, *out],
            "no-tok",
        ),
        "broken tokenizer": (
            ["pretrain", "--data", root, "--tokenizer", str(f["broken"]), *tiny_pre, *out],
            "not valid JSON",
        ),
        "tokenizer of another channel count": (
            [*pre_tok, str(f["tok"]), *tiny_pre, "--set", "data.in_chans=3", *out],
            "in_chans",
        ),
        "tokenizer.init of another channel count": (
            [*tok_train, f"tokenizer.init={f['tok']}", "--set", "data.in_chans=3", *out],
            "in_chans",
        ),
        "untrusted DALL-E pickles": (
            [*dalle, "--out", str(tmp / "dalle")],
            "--trust-pickle",
        ),
        "not a fine-tuning run": (["predict", str(tmp), root], "not a finished fine-tuning run"),
        "inspect a missing folder": (["data", "inspect", str(tmp / "nowhere")], "nowhere"),
        "bad curve fraction": (
            ["curve", "--data", root, "--init", "scratch", "--fractions", "100%,abc", *out],
            "'abc'",
        ),
        "unknown device": (["--device", "tpu", "finetune", "--data", root, *out], "--device"),
    }


# Bad recipe values are refused where the recipe is loaded, before any run folder exists.
RECIPE_CASES = 7


def test_known_bad_inputs_end_in_one_line_and_exit_2(files):
    failures = []
    for k, (name, (args, hint)) in enumerate(_bad_inputs(files).items()):
        res = runner.invoke(app, args, env={"COLUMNS": "2000"})
        lines = [line for line in res.output.splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("error:")]
        ok = (
            res.exit_code == 2
            and "Traceback" not in res.output
            and len(errors) == 1
            and hint in errors[0]
        )
        if k < RECIPE_CASES and (files["tmp"] / "never").exists():
            ok, name = False, f"{name} (wrote a run folder)"
        if not ok:
            failures.append(
                f"{name}: exit {res.exit_code}, {res.output[-600:]!r} {res.exception!r}"
            )
    assert not failures, "\n".join(failures)


def test_the_cli_catches_user_errors_and_nothing_else(monkeypatch, files):
    # a bug (any other exception) keeps its traceback: it is not dressed up as a user error
    import beitdomain.engine.finetune as ft

    def bug(*a, **k):
        raise KeyError("a bug")

    monkeypatch.setattr(ft, "finetune", bug)
    res = runner.invoke(app, ["finetune", "--data", str(files["root"])])
    assert res.exit_code == 1 and isinstance(res.exception, KeyError)


@pytest.mark.parametrize("where", ["file", "extends", "saved run"])
def test_a_recipe_cannot_grant_trust_to_a_pickle(files, tmp_path, where):
    # A recipe holding trust_pickle and a code-running checkpoint: refused before any load.
    from helpers import recipe

    from beitdomain.engine.build import build_classifier

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    state = build_classifier(recipe(FINETUNE_SETS), 2).state_dict()
    torch.save({"model": state, "args": RunsCode(str(marker))}, evil)
    body = {"model": {"trust_pickle": True, "init": str(evil)}}
    path = tmp_path / "evil.yaml"
    if where == "extends":
        (tmp_path / "base.yaml").write_text(yaml.safe_dump(body))
        path.write_text(yaml.safe_dump({"extends": "base.yaml"}))
    elif where == "saved run":  # an old run's recipe.yaml, loaded back with --recipe
        path = tmp_path / "old-run" / "recipe.yaml"
        path.parent.mkdir()
        path.write_text(yaml.safe_dump({**body, "name": "old"}))
    else:
        path.write_text(yaml.safe_dump(body))
    args = ["pretrain", "-r", str(path), "--data", str(files["root"])]
    args += [*sets_to_args([*PRETRAIN_SETS, "pretrain.train.steps=1", "model.target=pixels"])]
    res = runner.invoke(app, [*args, "--out", str(tmp_path / "run")], env={"COLUMNS": "2000"})
    assert res.exit_code == 2, res.output
    assert "model.trust_pickle" in res.output and "--trust-pickle" in res.output
    assert not marker.exists() and not (tmp_path / "run").exists()
    # without the key, the pickle is still refused unless the person passes the flag
    path.write_text(yaml.safe_dump({"model": {"init": str(evil)}}))
    res = runner.invoke(app, [*args, "--out", str(tmp_path / "run2")], env={"COLUMNS": "2000"})
    assert res.exit_code == 2 and "--trust-pickle" in res.output, res.output
    assert not marker.exists()


def test_curve_seeds_option_is_a_list_of_seeds(monkeypatch, files):
    import beitdomain.engine.curve.run as curve_engine

    seen = {}

    def fake_run_curve(r, out, **kw):
        seen["seeds"] = r.curve.seeds
        return {}

    monkeypatch.setattr(curve_engine, "run_curve", fake_run_curve)
    for text, seeds in (("0", [0]), ("0,1,2", [0, 1, 2]), ("3", [3])):
        res = runner.invoke(
            app, ["curve", "--data", str(files["root"]), "--init", "scratch", "--seeds", text]
        )
        assert res.exit_code == 0, res.output
        assert seen["seeds"] == seeds
    res = runner.invoke(app, ["curve", "--init", "scratch", "--seeds", "-1"])
    assert res.exit_code == 2 and "--seeds" in res.output
