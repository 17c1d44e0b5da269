"""``beitdomain data scan|cache|inspect`` and ``beitdomain readers list``: thin wrappers.

Each command turns flags into one library call in ``beitdomain.data`` / ``beitdomain.io``.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path
from typing import Annotated, Any

import typer

from beitdomain.cli.common import handle_errors

app = typer.Typer(
    help="Scan, cache and inspect image folders (DICOM, TIFF, PNG/JPEG/BMP, plugins).",
    no_args_is_help=True,
)
readers_app = typer.Typer(
    help="Image readers: built-in and installed plugins.", no_args_is_help=True
)

NormalizeOpt = Annotated[
    str,
    typer.Option(
        "--normalize",
        help="auto (DICOM: recipe/file window, else percentile), window, percentile, dtype.",
    ),
]
WindowOpt = Annotated[
    str | None,
    typer.Option(
        "--window",
        help="Preset (ct-lung, ct-bone, ct-brain, ct-soft-tissue, ct-abdomen, ct-liver, "
        "ct-mediastinum) or CENTER,WIDTH; negative centers need '=': --window=-600,1500.",
    ),
]
InChansOpt = Annotated[
    int, typer.Option("--in-chans", help="1: RGB -> luminance; 3: grayscale replicated.")
]
FramesOpt = Annotated[
    str,
    typer.Option(
        "--frames",
        help="Multi-frame files and volumes: all (one item each), middle, first, every:K, "
        "range:A:B (slices A to B-1).",
    ),
]
SliceAxisOpt = Annotated[
    str,
    typer.Option(
        "--slice-axis", help="Volumes (NIfTI, NRRD, MetaImage): axial, coronal or sagittal."
    ),
]
ChannelsOpt = Annotated[
    str | None,
    typer.Option(
        "--channels",
        help="Samples to keep from multi-band files (TIFF bands, 4D volumes), e.g. 0,1,2 or 3.",
    ),
]
NonfiniteOpt = Annotated[
    str, typer.Option("--nonfinite", help="NaN/Inf in float images: error or zero.")
]
OnErrorOpt = Annotated[
    str,
    typer.Option(
        "--on-error",
        help="fail: stop and list every unreadable file; skip: quarantine them into "
        "<manifest>.errors.csv and go on.",
    ),
]
WorkersOpt = Annotated[int, typer.Option("--workers", "-j", help="Decoding processes (0: none).")]
GroupColumnOpt = Annotated[
    str,
    typer.Option(
        "--group-column",
        help="Labels-CSV column naming each image's patient/wafer/slide (kept in one split).",
    ),
]
SeriesOpt = Annotated[
    bool,
    typer.Option(
        "--dicom-series",
        help="A folder holding only DICOMs is one volume (slices ordered by position).",
    ),
]


def parse_channels(text: str | None) -> tuple[int, ...] | None:
    """``'0,1,2'`` -> ``(0, 1, 2)``; None stays None."""
    if text is None or not text.strip():
        return None
    try:
        return tuple(int(c) for c in text.replace(" ", "").split(","))
    except ValueError:
        raise typer.BadParameter(
            f"--channels {text!r}: give sample indices separated by commas, e.g. 0,1,2"
        ) from None


def _spec(
    normalize: str,
    window: str | None,
    in_chans: int,
    frames: str,
    nonfinite: str,
    channels: str | None = None,
    slice_axis: str = "axial",
):
    from beitdomain.io import IntensitySpec

    try:
        return IntensitySpec(
            normalize=normalize,
            window=window,
            in_chans=in_chans,
            frames=frames,
            nonfinite=nonfinite,
            channels=parse_channels(channels),
            slice_axis=slice_axis,
        )
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None


def _out():
    from rich.console import Console

    return Console(file=sys.stdout, highlight=False)


def _counter_table(title: str, counts: Counter, limit: int = 12):
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    table.add_column(title.split(" ")[-1])
    table.add_column("files", justify="right")
    for key, n in counts.most_common(limit):
        table.add_row(escape(str(key)), str(n))
    if len(counts) > limit:
        table.add_row(f"... {len(counts) - limit} more", "")
    return table


def print_manifest_summary(manifest: Any) -> None:
    """Counts per reader, label and raw shape, and the unreadable files."""
    from rich.markup import escape

    out = _out()
    entries = manifest.entries
    # Counts first: a long root path then wraps after them, not through them.
    out.print(
        f"[bold]{len(entries)}[/] images ({sum(e.frames for e in entries)} frames), "
        f"[bold]{len(manifest.errors)}[/] unreadable, under {escape(str(manifest.root))}"
    )
    out.print(_counter_table("by reader", Counter(e.reader for e in entries)))
    if any(e.label is not None for e in entries):
        out.print(_counter_table("by label", Counter(e.label for e in entries)))
    if any(e.group is not None for e in entries):
        groups = {e.group for e in entries if e.group is not None}
        alone = sum(e.group is None for e in entries)
        out.print(
            f"{len(groups)} groups (patients, wafers, slides) hold "
            f"{len(entries) - alone} images; {alone} images are their own group"
        )
    shapes = Counter(f"{'x'.join(map(str, e.shape))} {e.dtype}" for e in entries)
    out.print(_counter_table("by S x C x H x W dtype", shapes))
    for path, reason in manifest.errors[:20]:
        out.print(f"[red]unreadable[/] {escape(path)}: {escape(reason)}")
    if len(manifest.errors) > 20:
        out.print(f"... and {len(manifest.errors) - 20} more (see the errors report)")


def _open_source(source: Path, spec: Any, on_error: str = "fail", workers: int = 0) -> Any:
    """A cache folder, a manifest file or a data folder (scanned)."""
    from beitdomain.data.cache import CachedImages
    from beitdomain.data.index import Manifest, scan

    if source.is_dir() and (source / "cache.json").is_file():
        return CachedImages(source)
    if source.is_dir():
        return scan(source, on_error=on_error, workers=workers, progress=True, spec=spec)
    if source.is_file():
        return Manifest.load(source)
    from beitdomain.user import MissingPathError

    raise MissingPathError(f"{source}: no such folder, manifest or cache")


@app.command()
@handle_errors
def scan(
    root: Annotated[Path, typer.Argument(help="Data folder, scanned recursively.")],
    labels: Annotated[
        Path | None, typer.Option("--labels", help="CSV path,label[,split]; paths inside DIR.")
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Write the manifest (.jsonl or .csv).")
    ] = None,
    on_error: OnErrorOpt = "fail",
    allow_outside_root: Annotated[
        bool, typer.Option("--allow-outside-root", help="Let CSV paths leave DIR.")
    ] = False,
    workers: WorkersOpt = 0,
    normalize: NormalizeOpt = "auto",
    window: WindowOpt = None,
    in_chans: InChansOpt = 1,
    frames: FramesOpt = "all",
    nonfinite: NonfiniteOpt = "error",
    channels: ChannelsOpt = None,
    slice_axis: SliceAxisOpt = "axial",
    group_column: GroupColumnOpt = "group",
    dicom_series: SeriesOpt = False,
) -> None:
    """Read every image once and summarize: readers, labels, shapes, unreadable files.

    Labels come from first-level subfolders (DIR/<label>/...) or from --labels. Each image is
    also normalized as `data cache` and training will (NaN/Inf, channel counts, the window),
    so a file that would fail there is listed now, with the same options to fix it.

    Examples:

        beitdomain data scan data/ct --out ct.jsonl

        beitdomain data scan data/cells --labels labels.csv --on-error skip -o cells.jsonl
    """
    from beitdomain.data.index import errors_path
    from beitdomain.data.index import scan as scan_folder

    if on_error not in ("fail", "skip"):
        raise typer.BadParameter(f"--on-error {on_error!r}; valid: fail, skip")
    spec = _spec(normalize, window, in_chans, frames, nonfinite, channels, slice_axis)
    manifest = scan_folder(
        root,
        labels,
        on_error,
        allow_outside_root,
        workers,
        progress=True,
        spec=spec,
        group_column=group_column,
        dicom_series=dicom_series,
    )
    print_manifest_summary(manifest)
    if out is not None:
        manifest.save(out)
        _out().print(f"manifest written to {out}")
        if manifest.errors:
            _out().print(f"unreadable files listed in {errors_path(out)}")


@app.command()
@handle_errors
def cache(
    source: Annotated[Path, typer.Argument(help="Data folder or manifest (.jsonl/.csv).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Cache folder to write.")],
    size: Annotated[
        int, typer.Option("--size", help="Working resolution; a bit above the training size.")
    ] = 256,
    dtype: Annotated[str, typer.Option("--dtype", help="uint8, uint16 or float16.")] = "uint8",
    fit: Annotated[
        str, typer.Option("--fit", help="Non-square images: squash, crop or pad.")
    ] = "squash",
    normalize: NormalizeOpt = "auto",
    window: WindowOpt = None,
    in_chans: InChansOpt = 1,
    frames: FramesOpt = "all",
    nonfinite: NonfiniteOpt = "error",
    channels: ChannelsOpt = None,
    slice_axis: SliceAxisOpt = "axial",
    dicom_series: SeriesOpt = False,
    workers: WorkersOpt = 0,
    hash_files: Annotated[
        bool, typer.Option("--hash", help="Store sha256 per file for exact invalidation.")
    ] = False,
    on_error: OnErrorOpt = "fail",
    force: Annotated[bool, typer.Option("--force", help="Rebuild even if up to date.")] = False,
) -> None:
    """Decode every image once into a memory-mapped cache so epochs never re-decode files.

    The cache remembers file sizes/mtimes and the normalization; it is rebuilt when they
    change and refused by training when stale.

    Examples:

        beitdomain data cache data/ct --out cache/ct-lung --window ct-lung --size 256 -j 8

        beitdomain data cache cells.jsonl --out cache/cells --dtype uint16
    """
    from beitdomain.data.cache import build_cache

    spec = _spec(normalize, window, in_chans, frames, nonfinite, channels, slice_axis)
    source_obj: Any = source
    if source.is_dir():
        from beitdomain.data.index import scan as scan_folder

        # The scan normalizes too, so every bad file is named before the long cache pass.
        source_obj = scan_folder(
            source,
            on_error=on_error,
            workers=workers,
            progress=True,
            spec=spec,
            dicom_series=dicom_series,
        )
    cached = build_cache(
        source_obj,
        out,
        size=size,
        dtype=dtype,
        spec=spec,
        fit=fit,
        workers=workers,
        hash_files=hash_files,
        on_error=on_error,
        progress=True,
        force=force,
    )
    verb = "up to date" if cached.reused else "written"
    shape = "x".join(map(str, cached.images.shape[1:]))
    _out().print(f"cache {verb}: {out} ({len(cached)} items of {shape} {cached.images.dtype})")
    for path, reason in cached.errors[:20]:
        _out().print(f"[red]skipped[/] {path}: {reason}")


@app.command()
@handle_errors
def inspect(
    source: Annotated[Path, typer.Argument(help="Data folder, manifest or cache folder.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="PNG to write.")] = Path("sheet.png"),
    n: Annotated[int, typer.Option("--n", help="Number of images.")] = 16,
    seed: Annotated[int, typer.Option("--seed", help="Sampling seed.")] = 0,
    normalize: NormalizeOpt = "auto",
    window: WindowOpt = None,
    in_chans: InChansOpt = 1,
    frames: FramesOpt = "all",
    nonfinite: NonfiniteOpt = "error",
    channels: ChannelsOpt = None,
    slice_axis: SliceAxisOpt = "axial",
) -> None:
    """Write a contact sheet: sampled images after normalization with intensity histograms.

    Use it to check a window or percentile setting before caching or training.

    Examples:

        beitdomain data inspect data/ct --window ct-lung --out lung.png

        beitdomain data inspect cache/ct-lung --n 25
    """
    from beitdomain.data.inspect import contact_sheet

    spec = _spec(normalize, window, in_chans, frames, nonfinite, channels, slice_axis)
    src = _open_source(source, spec, on_error="skip")
    path = contact_sheet(src, spec, out, n=n, seed=seed)
    _out().print(f"contact sheet written to {path}")


@readers_app.callback()
def _readers_group() -> None:
    """Image readers: built-in and installed plugins."""
    # A callback keeps `readers` a group, so `readers list` works with a single command.


@readers_app.command("list")
@handle_errors
def list_readers() -> None:
    """List built-in readers and plugins (entry-point group 'beitdomain.readers').

    Example:

        beitdomain readers list
    """
    from rich.markup import escape
    from rich.table import Table

    from beitdomain.io import READERS

    table = Table(title="image readers", title_justify="left")
    for col in ("name", "from", "status", "description"):
        table.add_column(col)
    for info in READERS.info():
        table.add_row(*(escape(x) for x in (info.name, info.source, info.status, info.description)))
    _out().print(table)
