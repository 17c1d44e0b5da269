"""The `beitdomain` command: global options and the command groups.

beitdomain env                       what this machine can do (device, bf16, codecs)
beitdomain data scan|cache|inspect   look at and prepare images
beitdomain tokenizer train|inspect|encode
beitdomain pretrain [export]
beitdomain finetune / predict
beitdomain curve
beitdomain eval knn|probe RUN         frozen features: k-NN / linear probe on the labelled splits
beitdomain demo
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import inspect
import platform
import sys
from typing import Annotated, Any

import typer

from beitdomain import __version__
from beitdomain.cli import ablation as ablation_cli
from beitdomain.cli import curve as curve_cli
from beitdomain.cli import data as data_cli
from beitdomain.cli import demo as demo_cli
from beitdomain.cli import eval as eval_cli
from beitdomain.cli import finetune as finetune_cli
from beitdomain.cli import pretrain as pretrain_cli
from beitdomain.cli import tokenizer as tokenizer_cli
from beitdomain.cli.common import GlobalOptions, global_options, setup_logging
from beitdomain.cli.output import print_kv

app = typer.Typer(
    name="beitdomain",
    help=(
        "BEiT masked image modeling for your own images (DICOM, TIFF, RGB).\n\n"
        "The chain: retrain the tokenizer on your domain, continue BEiT pre-training without "
        "labels, fine-tune with 1% or 10% of the labels, and plot how many labels pre-training "
        "saved. Start with `beitdomain demo` or `beitdomain data scan DIR`."
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"beitdomain {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    ctx: typer.Context,
    device: Annotated[
        str, typer.Option(help="auto (CUDA when available), cpu, cuda or cuda:N.")
    ] = "auto",
    seed: Annotated[
        int | None, typer.Option(help="Seed for everything (overrides recipe).")
    ] = None,
    quiet: Annotated[
        bool,
        typer.Option("--quiet", "-q", help="No progress, no info logs: warnings, errors, results."),
    ] = False,
    json_output: Annotated[
        bool,
        typer.Option(
            "--json", help="Print each command's result as JSON on stdout (logs stay on stderr)."
        ),
    ] = False,
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    from beitdomain.cli.output import set_json

    ctx.obj = GlobalOptions(device=device, seed=seed, quiet=quiet)
    set_json(json_output)
    for stream in (sys.stdout, sys.stderr):
        # A file name that is not UTF-8 prints as \xff escapes, never as UnicodeEncodeError.
        with contextlib.suppress(AttributeError, ValueError):
            stream.reconfigure(errors="backslashreplace")
    setup_logging(quiet)
    from beitdomain.progress import stderr_is_terminal

    if quiet or not stderr_is_terminal():
        _no_hf_progress_bars(ctx)


def _no_hf_progress_bars(ctx: typer.Context) -> None:
    """No Hugging Face progress bars for this command (-q, or stderr not a terminal: a bar
    there is lines of carriage returns), put back as they were when it ends.

    transformers draws them through huggingface_hub's switch (its save_pretrained writes
    "Writing model shards" in `pretrain export --format hf`), and reads that switch when it
    is imported, so the switch is turned before any command imports transformers.
    """
    import os

    try:
        from huggingface_hub import utils as hub
    except ImportError:  # transformers needs it: no huggingface_hub, no transformers bars
        return
    if hub.are_progress_bars_disabled() or "HF_HUB_DISABLE_PROGRESS_BARS" in os.environ:
        return  # off already, or the user chose with HF_HUB_DISABLE_PROGRESS_BARS
    hub.disable_progress_bars()
    hf_logging = sys.modules.get("transformers.utils.logging")
    if hf_logging is not None:  # imported already: it keeps its own copy of the switch
        hf_logging.disable_progress_bar()

    def restore() -> None:
        hf_logging = sys.modules.get("transformers.utils.logging")  # maybe imported since
        if hf_logging is not None:
            hf_logging.enable_progress_bar()  # (and huggingface_hub's)
        else:
            hub.enable_progress_bars()

    ctx.call_on_close(restore)


@app.command()
def version() -> None:
    """Print the beitdomain version."""
    from beitdomain.cli.output import print_result

    print_result(f"beitdomain {__version__}", {"beitdomain": __version__})


_OPTIONAL_MODULES = {
    "pylibjpeg": "JPEG/JPEG-LS/JPEG 2000 DICOM (pylibjpeg)",
    "libjpeg": "pylibjpeg-libjpeg: JPEG lossless / JPEG-LS DICOM",
    "openjpeg": "pylibjpeg-openjpeg: JPEG 2000 DICOM",
    "imagecodecs": "TIFF LZW/deflate/JPEG/zstd (imagecodecs)",
    "elpv_dataset": "the demo's solar-cell images (pip install -e '.[demo]')",
    "tensorboard": "TensorBoard event files (pip install tensorboard)",
    "mlflow": "MLflow tracking (pip install mlflow-skinny)",
    "wandb": "Weights & Biases tracking (pip install wandb)",
    "transformers": "Hugging Face reference for benchmarks (pip install -e '.[dev]')",
}


def environment_report(device_name: str = "auto") -> dict[str, str]:
    """Versions, device, CUDA/bf16 support and which optional codecs import."""
    import torch

    from beitdomain.engine.run.folder import versions
    from beitdomain.engine.train.distributed import resolve_device

    rows: dict[str, str] = dict(versions())
    rows["platform"] = platform.platform()
    try:
        rows["device"] = str(resolve_device(device_name))
    except (RuntimeError, ValueError) as e:
        rows["device"] = f"unavailable ({e})"
    rows["cuda available"] = str(torch.cuda.is_available())
    if torch.cuda.is_available():
        rows["cuda version"] = str(torch.version.cuda)
        rows["gpus"] = ", ".join(
            torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())
        )
        rows["bf16"] = str(torch.cuda.is_bf16_supported())
    else:
        from beitdomain.engine.train.distributed import cpu_has_native_bf16

        rows["bf16"] = (
            "native on this CPU (precision=auto trains in bf16 autocast)"
            if cpu_has_native_bf16()
            else "not native on this CPU (precision=auto trains in fp32)"
        )
    rows["cpu threads"] = str(torch.get_num_threads())
    for module, what in _OPTIONAL_MODULES.items():
        try:
            importlib.import_module(module)
            try:
                ver = importlib.metadata.version(module.replace("_", "-"))
            except importlib.metadata.PackageNotFoundError:
                ver = "installed"
            rows[f"{module}"] = f"{ver} — {what}"
        except Exception:
            rows[f"{module}"] = f"missing — {what}"
    return rows


@app.command()
def env(
    ctx: typer.Context,
    json_output: Annotated[
        bool, typer.Option("--json", help="As JSON on stdout (same as the global --json).")
    ] = False,
) -> None:
    """Show versions, the device that would be used, CUDA/bf16 support and optional codecs."""
    from beitdomain.cli.output import request_json

    request_json(json_output)
    rows = environment_report(global_options(ctx).device)
    # JSON gets the values' own types (true, 8), the table their text
    typed = {k: _typed(v) for k, v in rows.items()}
    print_kv("beitdomain environment", rows, typed)


def _typed(text: str) -> bool | int | str:
    """`'True'` -> True, `'8'` -> 8; any other text unchanged."""
    if text in ("True", "False"):
        return text == "True"
    return int(text) if text.isdigit() else text


def _add_groups() -> None:
    """Registers the command groups, each from its own module (imported at the top)."""
    groups = [
        (data_cli.app, "data", "Scan, cache and inspect image folders."),
        (data_cli.readers_app, "readers", "List image readers (built-in, plugins)."),
        (tokenizer_cli.app, "tokenizer", "Train, inspect and use the tokenizer."),
        (pretrain_cli.app, "pretrain", "BEiT masked image modeling on unlabeled images; export."),
        (
            eval_cli.app,
            "eval",
            "Check frozen features: k-NN and linear probe on the labelled splits.",
        ),
    ]
    for sub, name, help_text in groups:
        app.add_typer(sub, name=name, help=help_text)
    # top-level commands: finetune, predict, curve, ablation, demo
    for sub in (finetune_cli.app, curve_cli.app, ablation_cli.app, demo_cli.app):
        app.registered_commands.extend(sub.registered_commands)


def reflow_help(text: str) -> str:
    """Joins the hard-wrapped lines of each prose paragraph so the terminal wraps them.

    Typer's rich help keeps every newline of a docstring past its first paragraph, so a docstring
    wrapped at 96 columns comes out ragged in an 80-column terminal. Indented lines (examples)
    and list items ("- ...") keep their own lines; a line that continues a list item is joined
    to it. Square brackets are escaped: rich would read `pip install -e ".[demo]"` as a style tag
    and print `pip install -e "."`.
    """
    from rich.markup import escape

    paragraphs = []
    for para in inspect.cleandoc(text).split("\n\n"):
        lines: list[str] = []
        for line in para.split("\n"):
            keep = (
                not lines
                or line.startswith((" ", "\t", "- ", "* ", "\b"))
                or (lines[-1].startswith((" ", "\t", "\b")))
            )
            if keep:
                lines.append(line)
            else:
                lines[-1] = f"{lines[-1].rstrip()} {line.strip()}"
        paragraphs.append("\n".join(lines))
    return escape("\n\n".join(paragraphs))


def _reflow_commands(typer_app: typer.Typer) -> None:
    for cmd in typer_app.registered_commands:
        doc = cmd.help or (cmd.callback.__doc__ if cmd.callback else None)
        if doc:
            cmd.help = reflow_help(doc)
    for group in typer_app.registered_groups:  # group help is one line, given to add_typer
        if group.typer_instance is not None:
            _reflow_commands(group.typer_instance)


def _flags_without_metavar() -> None:
    """On/off flags show no `<bool>` in --help, as if they took a value (typer 0.2x's rich help
    prints each option's type, flags included; plain click prints none).

    A patch, not a setting: `metavar=""` on each of our flags hides theirs, but `--help` itself is
    built by typer and showed `<bool>` in every command (typer 0.29.3, tried in issue 36)."""
    core = importlib.import_module("typer.core")
    option = getattr(core, "TyperOption", None)
    original = getattr(option, "display_type_rich", None)
    if original is None or getattr(original, "_beitdomain", False):
        return

    def display_type_rich(self: Any, ctx: Any) -> str | None:
        if getattr(self, "is_flag", False) and not getattr(self, "count", False):
            return None
        return original(self, ctx)

    display_type_rich._beitdomain = True  # type: ignore[attr-defined]
    option.display_type_rich = display_type_rich


_add_groups()
_reflow_commands(app)
_flags_without_metavar()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
