"""Flag groups (`cli.options.grouped`): a dataclass of options taken as one parameter."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Annotated

import typer
from typer.testing import CliRunner

from beitdomain.cli import options as opt


@dataclass(frozen=True)
class _Pair:
    left: Annotated[str | None, typer.Option("--left", help="Left side.")] = None
    right: Annotated[int, typer.Option("--right", help="Right side.")] = 1


def _app(fn):
    app = typer.Typer()
    app.command()(opt.grouped(fn))
    return app


def test_a_group_stands_in_its_parameters_place_in_the_order_named():
    got = {}

    def cmd(first: int = 0, pair: _Pair = opt.offers("right", "left"), last: str = "z") -> None:
        got["pair"], got["first"], got["last"] = pair, first, last

    names = list(inspect.signature(opt.grouped(cmd)).parameters)
    assert names == ["first", "right", "left", "last"]
    res = CliRunner().invoke(_app(cmd), ["--left", "a", "--right", "3", "--first", "2"])
    assert res.exit_code == 0, res.output
    assert got == {"pair": _Pair(left="a", right=3), "first": 2, "last": "z"}
    assert res.output == ""
    help_text = CliRunner().invoke(_app(cmd), ["--help"], env={"COLUMNS": "200"}).output
    assert help_text.index("--right") < help_text.index("--left") < help_text.index("--last")


def test_flags_a_command_does_not_offer_keep_the_groups_defaults_and_are_refused():
    got = {}

    def cmd(pair: _Pair = opt.offers("left")) -> None:
        got["pair"] = pair

    assert CliRunner().invoke(_app(cmd), ["--left", "b"]).exit_code == 0
    assert got["pair"] == _Pair(left="b", right=1)
    res = CliRunner().invoke(_app(cmd), ["--right", "4"])
    assert res.exit_code == 2 and "No such option" in res.output


def test_a_command_can_give_a_flag_of_the_group_its_own_default():
    got = {}

    def cmd(pair: _Pair = opt.offers(right=7)) -> None:
        got["pair"] = pair

    assert CliRunner().invoke(_app(cmd), []).exit_code == 0
    assert got["pair"] == _Pair(left=None, right=7)


def test_run_and_data_groups_set_the_recipe_keys_the_flags_name():
    run = opt.RunFlags(resume_other_data=True)
    try:
        run.resuming()
    except typer.BadParameter as e:
        assert "--resume-other-data applies only with --resume" in str(e)
    else:
        raise AssertionError("--resume-other-data without --resume was accepted")
    assert opt.RunFlags(resume=True).resuming() == {"resume": True, "resume_other_data": False}
    data = opt.DataFlags(data="d", labels_csv="l.csv").options(nonfinite="zero")
    assert data == {
        "data.root": "d",
        "data.cache": None,
        "data.labels": "l.csv",
        "data.on_error": None,
        "data.nonfinite": "zero",
        "data.transductive": None,
    }
    assert opt.TrainFlags(steps=5).options("pretrain") == {
        "pretrain.train.steps": 5,
        "pretrain.train.epochs": None,
        "pretrain.train.batch_size": None,
    }
