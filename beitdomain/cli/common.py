"""What every command shares: global options, recipe loading, running a job, and the one place
that turns known errors into messages (the shared flags are in `options.py`).

Commands are thin: flags -> recipe -> one library call. Heavy imports (torch, timm) happen inside
commands, so `beitdomain --help` stays fast.
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import typer
from rich.console import Console

from beitdomain.cli.options import RunFlags
from beitdomain.user import UserError

console = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])


@dataclass
class GlobalOptions:
    device: str = "auto"
    seed: int | None = None
    quiet: bool = False


def global_options(ctx: typer.Context) -> GlobalOptions:
    obj = ctx.find_root().obj
    return obj if isinstance(obj, GlobalOptions) else GlobalOptions()


def handle_errors(fn: F) -> F:
    """Prints a `UserError` as one clear line and exits 2; Ctrl-C exits 130 after saving.

    Any other exception is a bug, and keeps its traceback.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except KeyboardInterrupt as e:
            from rich.markup import escape

            msg = (
                f"[yellow]interrupted[/]: {escape(str(e))}" if str(e) else "[yellow]interrupted[/]"
            )
            console.print(msg)
            raise typer.Exit(130) from None
        except UserError as e:
            from rich.markup import escape

            # escape: messages hold paths and commands like `pip install -e ".[demo]"`
            console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is when a record comes, not the stream it was at setup
    (a caller that redirects stderr, as a test runner does, may have closed that one since)."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def setup_logging(quiet: bool) -> None:
    """Logs on stderr: rich on a terminal; timestamped plain lines in batch jobs (files, pipes)."""
    from beitdomain.progress import stderr_is_terminal

    if stderr_is_terminal():
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(console=console, show_path=False, show_time=False)
        fmt = "%(message)s"
    else:
        handler = _StderrHandler()
        fmt = "%(asctime)s %(levelname)s %(message)s"
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO,
        format=fmt,
        datefmt="%Y-%m-%d %H:%M:%S",
        handlers=[handler],
        force=True,
    )
    # Third-party chatter is not the user's concern unless it is a warning.
    for name in ("PIL", "matplotlib", "timm", "monai"):
        logging.getLogger(name).setLevel(logging.WARNING)


def load(
    ctx: typer.Context,
    recipe: str | None,
    sets: list[str] | None,
    options: dict[str, Any] | None = None,
) -> Any:
    """The recipe from a file (or shipped name), typed options and --set, plus --seed.

    `BEITDOMAIN_SET` (overrides separated by `;`) applies to every command before its own
    --set, e.g. to smoke-test a pipeline script with a few steps per stage.
    """
    from beitdomain.config import ENV_SETS, apply_sets, env_sets, load_recipe

    opts = dict(options or {})
    seed = global_options(ctx).seed
    if seed is not None:
        opts["seed"] = seed
    extra = env_sets()
    given = [*extra, *(sets or [])]
    # As --seeds does: the seeds named are every cell's, so a smoke test setting
    # curve.seeds=[0] does not still run the recipe's six seeds at 1% (a None option: the
    # flags left it to the recipe).
    if (
        _sets_key(given, "curve.seeds")
        and not _sets_key(given, "curve.fraction_seeds")
        and opts.get("curve.fraction_seeds") is None
    ):
        opts["curve.fraction_seeds"] = {}
    if not extra:
        return load_recipe(recipe, opts, sets)
    r = apply_sets(load_recipe(recipe, opts), extra, source=f"${ENV_SETS}")
    return apply_sets(r, sets or [])


def _sets_key(sets: list[str], key: str) -> bool:
    """Whether one of the `--set` overrides sets `key`."""
    return any(s.partition("=")[0].strip() == key for s in sets)


def default_out(recipe: Any, command: str) -> Path:
    """runs/<recipe name>-<command>, or runs/<command> for an unnamed recipe."""
    name = getattr(recipe, "name", None)
    return Path("runs") / (f"{name}-{command}" if name else command)


def load_job(
    ctx: typer.Context, command: str, recipe: str | None, run: RunFlags, options: dict[str, Any]
) -> tuple[Any, Path]:
    """The recipe (as `load` builds it, with `run.sets`) and the run folder: `run.out`, or
    `default_out`.

    Light on purpose: a command calls it before importing its engine module (torch, timm,
    scikit-learn: seconds), so a mistyped key is reported at once (`tests/test_cli.py`).
    """
    r = load(ctx, recipe, run.sets, options)
    return r, run.out or default_out(r, command)


def run_job(ctx: typer.Context, job: Callable[..., Any], r: Any, out: Path, **kwargs: Any) -> Any:
    """`job(r, out, **kwargs)` on the global --device, with progress unless --quiet."""
    g = global_options(ctx)
    return job(r, out, device=g.device, quiet=g.quiet, **kwargs)
