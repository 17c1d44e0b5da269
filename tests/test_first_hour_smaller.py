"""Smaller first-hour findings (issue 39 item 10): a smoke test's `curve.seeds=[0]`, through
BEITDOMAIN_SET or --set, names every cell's seeds, as --seeds does, so it does not still run
the recipe's six seeds at 1%; a `curve.fraction_seeds` given beside it is kept."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from beitdomain.cli.app import app


@pytest.mark.parametrize(
    ("env", "sets", "expected"),
    [
        ("curve.seeds=[0]", [], {}),
        ("", ["--set", "curve.seeds=[0]"], {}),
        ("curve.seeds=[0];curve.fraction_seeds={'1%': [0, 1]}", [], {"1%": [0, 1]}),
        ("finetune.train.steps=2", [], {"1%": [0, 1, 2, 3, 4, 5], "100%": [0]}),  # the recipe's
    ],
)
def test_curve_seeds_set_anywhere_names_every_cells_seeds(
    env, sets, expected, tmp_path, monkeypatch
):
    seen = []

    def capture(recipe, out, **kw):
        seen.append(recipe.curve.fraction_seeds)
        return {}

    monkeypatch.setattr("beitdomain.engine.curve.run.run_curve", capture)
    args = ["curve", "-r", "elpv-cpu", "--out", str(tmp_path / "o"), *sets]
    res = CliRunner().invoke(app, args, env={"BEITDOMAIN_SET": env})
    assert res.exit_code == 0, res.output
    assert seen == [expected]
