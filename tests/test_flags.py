"""One meaning per flag: the label CSV is --labels-csv in every command, --labels the amount;
old spellings keep working with a warning; `data cache --recipe` builds what training accepts."""

from __future__ import annotations

import pytest
from helpers import run_cli, write_labels_csv, write_separable_set
from test_output import _all_commands

CSV_COMMANDS = {
    ("data", "scan"),
    ("finetune",),
    ("pretrain",),
    ("curve",),
    ("eval", "knn"),
    ("eval", "probe"),
}


def _options(cmd):
    return {opt: p for p in cmd.params for opt in getattr(p, "opts", []) if opt.startswith("--")}


def test_label_csv_and_amount_have_one_meaning_each():
    seen_csv = set()
    for path, cmd in _all_commands():
        opts = _options(cmd)
        if "--labels-csv" in opts:
            seen_csv.add(tuple(path))
            assert "csv" in (opts["--labels-csv"].help or "").lower(), path
        visible = {o: p for o, p in opts.items() if not getattr(p, "hidden", False)}
        if "--labels" in visible:  # the amount, wherever it is visible
            text = visible["--labels"].help or ""
            assert "1%" in text and "csv" not in text.lower(), path
    assert seen_csv >= CSV_COMMANDS


def test_data_scan_old_labels_spelling_works_and_says_what_to_use(tmp_path):
    data = write_separable_set(tmp_path / "d", per_class=2)
    files = sorted(p.relative_to(data).as_posix() for p in data.rglob("*.png"))
    csv = write_labels_csv(
        tmp_path / "labels.csv", [(f, f"class{i % 2}") for i, f in enumerate(files)]
    )
    old = run_cli(["--json", "data", "scan", str(data), "--labels", str(csv)])
    new = run_cli(["--json", "data", "scan", str(data), "--labels-csv", str(csv)])
    assert old.returncode == 0 and new.returncode == 0, old.stderr + new.stderr
    assert old.stdout == new.stdout and '"class0": 2' in new.stdout
    assert "--labels is deprecated here: use --labels-csv" in old.stderr
    assert "deprecated" not in new.stderr


def test_data_cache_recipe_builds_the_cache_the_recipe_accepts(tmp_path):
    from beitdomain.config import load_recipe
    from beitdomain.data.cache import CachedImages
    from beitdomain.io import IntensitySpec

    data = write_separable_set(tmp_path / "d", per_class=2)
    spec = IntensitySpec.from_config(load_recipe("cpu-tiff").data)  # percentile
    res = run_cli(["data", "cache", str(data), "-o", str(tmp_path / "plain")])
    assert res.returncode == 0, res.stderr
    with pytest.raises(Exception, match="normalize: 'auto' in the cache, 'percentile' requested"):
        CachedImages(tmp_path / "plain", spec=spec)

    res = run_cli(["data", "cache", str(data), "--recipe", "cpu-tiff", "-o", str(tmp_path / "r")])
    assert res.returncode == 0, res.stderr
    cached = CachedImages(tmp_path / "r", spec=spec)  # accepted
    assert cached.images.shape[-1] == 80  # 5/4 of the recipe's 64 px crops

    res = run_cli(
        [
            "data",
            "cache",
            str(data),
            "-r",
            "cpu-tiff",
            "--normalize",
            "auto",
            "-o",
            str(tmp_path / "x"),
        ]
    )
    assert res.returncode == 2
    assert "--normalize auto (the recipe has normalize: percentile)" in res.stderr
    assert not (tmp_path / "x").exists()


def test_beitdomain_set_applies_to_every_command_and_explicit_set_wins(monkeypatch):
    from beitdomain.cli.common import load

    class ctx:  # the root context of a command line without global options
        obj = None

        @classmethod
        def find_root(cls):
            return cls

    monkeypatch.setenv("BEITDOMAIN_SET", "seed=7; data.image_size=32 ;")
    r = load(ctx, "elpv-cpu", ["data.image_size=48"])
    assert (r.seed, r.data.image_size, r.name) == (7, 48, "elpv-cpu")
    monkeypatch.setenv("BEITDOMAIN_SET", "data.imge_size=32")
    from beitdomain.config import RecipeError

    with pytest.raises(RecipeError, match=r"\$BEITDOMAIN_SET.*Did you mean 'image_size'"):
        load(ctx, None, None)


@pytest.mark.parametrize(
    ("command", "target"),
    [
        ("finetune", "beitdomain.engine.finetune.finetune"),
        ("curve", "beitdomain.engine.curve.run.run_curve"),
    ],
)
def test_selection_flag_sets_the_recipe_and_refuses_unknown_values(
    command, target, tmp_path, monkeypatch
):
    from typer.testing import CliRunner

    from beitdomain.cli.app import app

    seen = []

    def capture(recipe, out, **kw):
        seen.append(recipe.finetune.selection)
        return {}

    monkeypatch.setattr(target, capture)
    out = ["--out", str(tmp_path / "o")]
    res = CliRunner().invoke(app, [command, "--selection", "carve", *out])
    assert res.exit_code == 0, res.output
    assert seen == ["carve"]
    res = CliRunner().invoke(app, [command, "--selection", "best", *out])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert "finetune.selection" in res.output and "'none'" in res.output, res.output


@pytest.mark.parametrize(
    ("command", "target"),
    [
        ("curve", "beitdomain.engine.curve.run.run_curve"),
        ("ablation", "beitdomain.engine.ablation.run_ablation"),
    ],
)
def test_seeds_flag_names_the_seeds_of_every_cell(command, target, tmp_path, monkeypatch):
    """elpv-cpu runs six seeds at 1% (curve.fraction_seeds); --seeds 0,1 means two there too."""
    from typer.testing import CliRunner

    from beitdomain.cli.app import app

    seen = []

    def capture(recipe, out, **kw):
        seen.append((recipe.curve.seeds, recipe.curve.fraction_seeds))
        return {}

    monkeypatch.setattr(target, capture)
    base = [command, "-r", "elpv-cpu", "--out", str(tmp_path / "o")]
    assert CliRunner().invoke(app, base).exit_code == 0
    assert CliRunner().invoke(app, [*base, "--seeds", "0,1"]).exit_code == 0
    assert seen[0][1] == {"1%": [0, 1, 2, 3, 4, 5], "100%": [0]}  # the recipe's
    assert seen[1] == ([0, 1], {})
