"""Every flag a message suggests exists on the command that can show that message.

The walk reads every string (and f-string) of the library outside `cli/` (docstrings aside) and
finds each `--flag`. A flag following `beitdomain <command>` in the same string belongs to
that command; any other flag is checked against every command that can show a message from
that module (the table below, from which command runs which code).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import click
import typer

from beitdomain.cli.app import app

PKG = Path(__file__).resolve().parent.parent / "beitdomain"

READ_IMAGES = {
    "tokenizer train",
    "pretrain",
    "finetune",
    "curve",
    "predict",
    "data scan",
    "data cache",
    "data inspect",
    "ablation",
}
TRAIN = {"tokenizer train", "pretrain", "finetune"}
WEIGHTS = {"pretrain", "finetune", "tokenizer train", "curve"}
RECIPE = {"tokenizer train", "pretrain", "finetune", "curve", "demo", "ablation"}

# module (inside beitdomain/) -> the commands that can show its messages
SHOWN_BY = {
    "config.py": RECIPE,
    "data/cache.py": {"data cache", "data inspect", *TRAIN, "curve"},
    "data/index.py": READ_IMAGES,
    "data/inspect.py": {"data inspect"},
    "data/splits.py": {"finetune", "curve"},
    "io/dicom.py": READ_IMAGES,
    "io/intensity.py": READ_IMAGES,
    "data/labeled.py": {*TRAIN, "curve", "ablation"},
    "data/source.py": {*TRAIN, "curve", "ablation"},
    # unlabeled_dataset: only the tokenizer and pre-training (the ablation's too) build it;
    # fine-tuning and the curve read labelled data, which its test-split refusal is not about
    "data/unlabeled.py": {"tokenizer train", "pretrain", "ablation"},
    "engine/train/distributed.py": RECIPE | {"predict"},
    "engine/train/estimate.py": TRAIN,  # the CPU time warning, said before training starts
    "engine/demo.py": {"demo"},
    "engine/build.py": {"pretrain", "finetune", "curve"},
    "engine/finetune.py": {"finetune", "curve"},
    "engine/predict.py": {"predict"},
    "engine/job.py": TRAIN,
    "engine/tokenizer.py": {"tokenizer train", "tokenizer encode"},
    # the run folder's lock: every command that writes a run folder or a cache
    "fileio.py": {*TRAIN, "curve", "demo", "ablation", "data cache"},
    "engine/train/loop.py": TRAIN,  # curve and demo reword the interrupt (tested below)
    "engine/pretrain.py": {"pretrain", "ablation"},
    "engine/curve/run.py": {"curve", "ablation"},
    "engine/ablation.py": {"ablation"},
    "engine/run/folder.py": {*TRAIN, "curve"},
    "engine/run/guard.py": {*TRAIN, "curve"},
    "models/convert/adapt.py": WEIGHTS,
    "models/convert/keys.py": WEIGHTS,
    "models/convert/load.py": WEIGHTS,
    "models/convert/read.py": WEIGHTS,
    "models/convert/report.py": WEIGHTS,
    "models/hub.py": {"pretrain", "finetune", "curve"},
    "models/export.py": {"pretrain export"},
    "tokenizer/io.py": {"tokenizer train", "pretrain"},
    "tokenizer/dalle.py": {"tokenizer import-dalle"},
}
# (module, flag, command): messages the command cannot reach (or whose advice does not
# concern it), with why.
UNREACHABLE = {
    # curve opens its folder with resume=True or overwrite=True only, so neither the
    # "pass --resume ..." advice nor the contradiction message can reach it.
    ("engine/run/folder.py", "--resume", "curve"),
    # a curve cell cut off on other data is refused with the curve's own advice
    # (curve/run.py _finetune_cell), never with the jobs' --resume-other-data
    ("engine/run/folder.py", "--resume-other-data", "curve"),
    ("engine/run/guard.py", "--resume", "curve"),
    # data inspect reads with on_error='skip' and draws unreadable files as such.
    ("data/index.py", "--on-error", "data inspect"),
    ("io/dicom.py", "--on-error", "data inspect"),
    ("data/cache.py", "--on-error", "data inspect"),
    # The demo loads no weight files: the advice is for the commands that do.
    ("config.py", "--trust-pickle", "demo"),
    # The ablation's curve always has its variants as inits, and it passes on only the
    # init_sets of those: neither --init message can reach it.
    ("engine/curve/run.py", "--init", "ablation"),
}
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
MENTION = re.compile(r"beitdomain ((?:[a-z][a-z-]* ?){1,2})")


def command_options() -> dict[str, set[str]]:
    """'data scan' -> its option names, global options included."""
    root = typer.main.get_command(app)
    globals_ = {o for p in root.params for o in getattr(p, "opts", [])}
    out: dict[str, set[str]] = {}

    def walk(cmd: click.Command, path: list[str]) -> None:
        if path:
            opts = {o for p in cmd.params for o in [*p.opts, *p.secondary_opts]}
            out[" ".join(path)] = opts | globals_ | {"--help"}
        for name, sub in getattr(cmd, "commands", {}).items():
            walk(sub, [*path, name])

    walk(root, [])
    return out


def hint_strings(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        first = body[0] if isinstance(body, list) and body else None
        if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
            skip.add(id(first.value))  # a docstring
    texts = []
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            parts = []
            for v in node.values:
                skip.add(id(v))
                parts.append(v.value if isinstance(v, ast.Constant) else "{}")
            texts.append("".join(parts))
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
            texts.append(node.value)
    return [t for t in texts if FLAG.search(t)]


def resolve(command_words: str, options: dict[str, set[str]]) -> str | None:
    words = command_words.split()
    for n in (2, 1):
        name = " ".join(words[:n])
        if name in options:
            return name
    return None


def test_every_hinted_flag_exists_on_the_commands_that_show_it():
    options = command_options()
    assert {"pretrain", "finetune", "predict", "curve", "data scan"} <= set(options)
    problems = []
    modules = sorted(p for p in PKG.rglob("*.py") if "cli" not in p.relative_to(PKG).parts)
    seen = set()
    for path in modules:
        rel = path.relative_to(PKG).as_posix()
        for text in hint_strings(path):
            seen.add(rel)
            # split the text at each `beitdomain <command>`: flags after it are that command's
            pieces = MENTION.split(text)
            spans = [(None, pieces[0])] + [
                (resolve(pieces[i], options), pieces[i + 1] if i + 1 < len(pieces) else "")
                for i in range(1, len(pieces), 2)
            ]
            for i, (named, chunk) in enumerate(spans):
                chunk = (pieces[2 * i - 1] if i else "") + chunk
                for flag in FLAG.findall(chunk):
                    commands = {named} if named else SHOWN_BY.get(rel)
                    if commands is None:
                        problems.append(f"{rel}: {flag} in {text!r}: module not in SHOWN_BY")
                        continue
                    for cmd in sorted(commands):
                        if flag not in options[cmd] and (rel, flag, cmd) not in UNREACHABLE:
                            problems.append(f"{rel}: `beitdomain {cmd}` has no {flag}: {text!r}")
    assert not problems, "\n".join(problems)
    stale = {(m, f, c) for m, f, c in UNREACHABLE if f in options[c]}
    assert not stale, f"exemptions for flags the command now has: {stale}"
    assert {
        "engine/train/loop.py",
        "io/intensity.py",
        "data/index.py",
    } <= seen  # the walk found them


def test_training_commands_have_the_data_options_their_hints_name():
    options = command_options()
    for cmd in ("tokenizer train", "pretrain", "finetune", "curve", "predict"):
        assert {"--on-error", "--nonfinite"} <= options[cmd], cmd
