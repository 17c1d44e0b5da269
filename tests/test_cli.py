"""The command line: every command's --help, env, version, and clean errors."""

from __future__ import annotations

import pytest
import typer
from typer.testing import CliRunner

from beitdomain import __version__
from beitdomain.cli.app import app

runner = CliRunner()


def _command_paths(typer_app: typer.Typer, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    paths = []
    for cmd in typer_app.registered_commands:
        name = cmd.name or cmd.callback.__name__.replace("_", "-")
        paths.append((*prefix, name))
    for group in typer_app.registered_groups:
        name = group.name or group.typer_instance.info.name
        paths.append((*prefix, name))
        paths.extend(_command_paths(group.typer_instance, (*prefix, name)))
    return paths


COMMANDS = _command_paths(app)


def test_core_commands_are_registered():
    assert ("version",) in COMMANDS and ("env",) in COMMANDS


@pytest.mark.parametrize("path", COMMANDS, ids=lambda p: " ".join(p))
def test_every_command_has_help(path):
    result = runner.invoke(app, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output
    # help that teaches: more than a usage line
    assert len(result.output.strip().splitlines()) > 4
    # rich reads ':A:' in 'range:A:B' as an emoji code: no help may turn text into emoji
    assert not [ch for ch in result.output if 0x1F000 <= ord(ch) <= 0x1FAFF], result.output


def test_help_paragraphs_wrap_to_the_terminal_and_keep_brackets():
    # A docstring hard-wrapped at 96 columns must not come out ragged: its prose paragraphs are
    # joined (the terminal wraps them), example lines stay apart, and `.[demo]` is not eaten as
    # a rich style tag.
    result = runner.invoke(app, ["finetune", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "unless the labels CSV has a split column" in result.output
    lines = [line.strip() for line in result.output.splitlines()]
    assert "beitdomain finetune -r elpv-cpu --init scratch --labels 5/class" in lines
    demo = runner.invoke(app, ["demo", "--help"], env={"COLUMNS": "200"})
    assert 'pip install -e ".[demo]"' in demo.output


def test_reflow_help_keeps_examples_and_list_items():
    from beitdomain.cli.app import reflow_help

    text = """First line.

    A paragraph wrapped
    over lines.

    - item one
      continued
    - item two

    Example:

        beitdomain demo
        beitdomain curve
    """
    out = reflow_help(text)
    assert "A paragraph wrapped over lines." in out
    assert "- item one\n  continued\n- item two" in out
    assert "    beitdomain demo\n    beitdomain curve" in out


def test_version():
    result = runner.invoke(app, ["version"])
    assert result.exit_code == 0 and __version__ in result.output


def test_env_reports_device_and_codecs():
    result = runner.invoke(app, ["--device", "cpu", "env"])
    assert result.exit_code == 0, result.output
    for needle in ("torch", "timm", "device", "cpu", "bf16", "pylibjpeg", "imagecodecs"):
        assert needle in result.output


def test_env_with_unavailable_cuda_says_so():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = runner.invoke(app, ["--device", "cuda", "env"])
    assert result.exit_code == 0
    assert "unavailable" in result.output


def test_curve_init_set_option_parses_and_refuses_malformed_values():
    from beitdomain.cli.curve import parse_init_sets

    assert parse_init_sets(
        ["domain:finetune.optim.lr=1e-4", "domain:finetune.head_init=probe", "s:seed=1"]
    ) == {"domain": ["finetune.optim.lr=1e-4", "finetune.head_init=probe"], "s": ["seed=1"]}
    result = runner.invoke(
        app, ["curve", "--init", "scratch", "--init-set", "finetune.optim.lr=1e-4"]
    )
    assert result.exit_code == 2 and "NAME:section.key=value" in result.output


def test_a_mistyped_recipe_key_is_reported_before_torch_loads():
    """Importing torch and timm takes seconds; a typo in --set must not wait for them."""
    import subprocess
    import sys

    script = """
import sys
from typer.testing import CliRunner
from beitdomain.cli.app import app
for command in ("pretrain", "finetune", "tokenizer train", "curve", "ablation"):
    r = CliRunner().invoke(app, [*command.split(), "--set", "data.image_sise=64"])
    assert r.exit_code == 2 and "image_sise" in r.output, (command, r.output)
print(sorted(m for m in ("torch", "timm", "sklearn") if m in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"
