"""``beitdomain data scan|cache|inspect`` and ``beitdomain readers list``: thin wrappers.

Each command turns flags into one library call in ``beitdomain.data`` / ``beitdomain.io``.
"""

from __future__ import annotations

import logging
import sys
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Annotated, Any

import typer

from beitdomain.cli.common import global_options, handle_errors, load
from beitdomain.cli.options import LabelsCsvOpt, SetOpt, deprecated, grouped, offers
from beitdomain.cli.output import json_requested, print_json, print_result, request_json
from beitdomain.user import UserError

log = logging.getLogger("beitdomain.cli")
app = typer.Typer(
    help="Scan, cache and inspect image folders (DICOM, TIFF, PNG/JPEG/BMP, plugins).",
    no_args_is_help=True,
)
readers_app = typer.Typer(
    help="Image readers: built-in and installed plugins.", no_args_is_help=True
)

OnErrorOpt = Annotated[
    str | None,
    typer.Option(
        "--on-error",
        help="fail: stop and list every unreadable file; skip: go on without them, listed "
        "beside the manifest (-o scan.jsonl -> scan.errors.csv).",
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


@dataclass(frozen=True)
class IntensityFlags:
    """How pixels become the network's input (`IntensitySpec`); None: not given."""

    normalize: Annotated[
        str | None,
        typer.Option(
            "--normalize",
            help="auto (DICOM: recipe/file window, else percentile), window, percentile, dtype.",
        ),
    ] = None
    window: Annotated[
        str | None,
        typer.Option(
            "--window",
            help="Preset (ct-lung, ct-bone, ct-brain, ct-soft-tissue, ct-abdomen, ct-liver, "
            "ct-mediastinum) or CENTER,WIDTH; negative centers need '=': --window=-600,1500.",
        ),
    ] = None
    in_chans: Annotated[
        int | None, typer.Option("--in-chans", help="1: RGB -> luminance; 3: grayscale replicated.")
    ] = None
    frames: Annotated[
        str | None,
        typer.Option(
            "--frames",
            help="Multi-frame files and volumes: all (one item each), middle, first, every:K, "
            "range:START:STOP (slices START to STOP-1).",
        ),
    ] = None
    nonfinite: Annotated[
        str | None, typer.Option("--nonfinite", help="NaN/Inf in float images: error or zero.")
    ] = None
    channels: Annotated[
        str | None,
        typer.Option(
            "--channels",
            help="Samples to keep from multi-band files (TIFF bands, 4D volumes), e.g. 0,1,2 or 3.",
        ),
    ] = None
    slice_axis: Annotated[
        str | None,
        typer.Option(
            "--slice-axis", help="Volumes (NIfTI, NRRD, MetaImage): axial, coronal or sagittal."
        ),
    ] = None


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


def _counter_table(title: str, counts: Counter, limit: int = 12, frames: Counter | None = None):
    """Files per key; with `frames`, a second column of frames (items training will see)."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    table.add_column(title.split(" ")[-1])
    table.add_column("files", justify="right")
    if frames is not None:
        table.add_column("frames", justify="right")
    for key, n in counts.most_common(limit):
        row = [escape(str(key)), str(n)]
        table.add_row(*row, *([str(frames[key])] if frames is not None else []))
    if len(counts) > limit:
        table.add_row(f"... {len(counts) - limit} more", "", *([""] if frames is not None else []))
    return table


def manifest_summary(manifest: Any) -> dict[str, Any]:
    """What `data scan` reports, as plain data: files and frames, by reader/label/shape, errors."""
    entries = manifest.entries
    by_label_frames: Counter = Counter()
    for e in entries:
        if e.label is not None:
            by_label_frames[str(e.label)] += e.frames
    return {
        "root": str(manifest.root),
        "n_files": len(entries),
        "n_frames": sum(e.frames for e in entries),
        "n_unreadable": len(manifest.errors),
        "by_reader": dict(Counter(e.reader for e in entries)),
        "by_label_files": dict(Counter(str(e.label) for e in entries if e.label is not None)),
        "by_label_frames": dict(by_label_frames),
        "by_shape": dict(Counter(f"{'x'.join(map(str, e.shape))} {e.dtype}" for e in entries)),
        "unreadable": [{"path": p, "reason": r} for p, r in manifest.errors],
    }


def print_manifest_summary(manifest: Any, extra: dict[str, Any] | None = None) -> None:
    """Counts per reader, label and raw shape, and the unreadable files (JSON with --json)."""
    from rich.markup import escape

    if json_requested():
        print_json({**manifest_summary(manifest), **(extra or {})})
        return
    out = _out()
    entries = manifest.entries
    # Counts first: a long root path then wraps after them, not through them.
    out.print(
        f"[bold]{len(entries)}[/] images ({sum(e.frames for e in entries)} frames, one "
        f"training item each), [bold]{len(manifest.errors)}[/] unreadable, under "
        f"{escape(str(manifest.root))}"
    )
    out.print(_counter_table("by reader", Counter(e.reader for e in entries)))
    if any(e.label is not None for e in entries):
        summary = manifest_summary(manifest)
        out.print(
            _counter_table(
                "by label",
                Counter(summary["by_label_files"]),
                frames=Counter(summary["by_label_frames"]),
            )
        )
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


def _open_source(
    source: Path, spec: Any, on_error: str = "fail", workers: int = 0, quiet: bool = False
) -> Any:
    """A cache folder, a manifest file or a data folder (scanned)."""
    from beitdomain.data.cache import CachedImages
    from beitdomain.data.index import Manifest, scan

    if source.is_dir() and (source / "cache.json").is_file():
        return CachedImages(source)
    if source.is_dir():
        return scan(source, on_error=on_error, workers=workers, progress=not quiet, spec=spec)
    if source.is_file():
        return Manifest.load(source)
    from beitdomain.user import MissingPathError

    raise MissingPathError(f"{source}: no such folder, manifest or cache")


@app.command()
@handle_errors
@grouped
def scan(
    ctx: typer.Context,
    root: Annotated[Path, typer.Argument(help="Data folder, scanned recursively.")],
    labels_csv: LabelsCsvOpt = None,
    labels_old: Annotated[Path | None, typer.Option("--labels", hidden=True)] = None,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Write the manifest (.jsonl or .csv).")
    ] = None,
    on_error: OnErrorOpt = "fail",
    allow_outside_root: Annotated[
        bool, typer.Option("--allow-outside-root", help="Let CSV paths leave DIR.")
    ] = False,
    workers: WorkersOpt = 0,
    intensity: IntensityFlags = offers(
        normalize="auto", in_chans=1, frames="all", nonfinite="error", slice_axis="axial"
    ),
    group_column: GroupColumnOpt = "group",
    dicom_series: SeriesOpt = False,
    json_output: Annotated[
        bool, typer.Option("--json", help="The summary as JSON on stdout (as the global --json).")
    ] = False,
) -> None:
    """Read every image once and summarize: readers, labels, shapes, unreadable files.

    Labels come from first-level subfolders (DIR/<label>/...) or from --labels-csv. Each image
    is also normalized as `data cache` and training will (NaN/Inf, channel counts, the window),
    so a file that would fail there is listed now, with the same options to fix it.

    Examples:

        beitdomain data scan data/ct --out ct.jsonl

        beitdomain data scan data/cells --labels-csv labels.csv --on-error skip -o cells.jsonl
    """
    from beitdomain.data.index import errors_path
    from beitdomain.data.index import scan as scan_folder

    request_json(json_output)
    labels = deprecated(
        "--labels",
        "--labels-csv",
        labels_old,
        labels_csv,
        "--labels is the amount of labels in finetune and eval; the CSV is --labels-csv everywhere",
    )
    if on_error not in ("fail", "skip"):
        raise typer.BadParameter(f"--on-error {on_error!r}; valid: fail, skip")
    spec = _spec(**asdict(intensity))
    manifest = scan_folder(
        root,
        labels,
        on_error,
        allow_outside_root,
        workers,
        progress=not global_options(ctx).quiet,
        spec=spec,
        group_column=group_column,
        dicom_series=dicom_series,
    )
    if out is not None:
        manifest.save(out)
    written = {"manifest": str(out) if out else None}
    if out is not None and manifest.errors:
        written["errors_csv"] = str(errors_path(out))
    print_manifest_summary(manifest, written)
    if out is not None and not json_requested():
        _out().print(f"manifest written to {out}")
        if manifest.errors:
            _out().print(f"unreadable files listed in {errors_path(out)}")


@app.command()
@handle_errors
@grouped
def cache(
    ctx: typer.Context,
    source: Annotated[Path, typer.Argument(help="Data folder or manifest (.jsonl/.csv).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Cache folder to write.")],
    size: Annotated[
        int | None,
        typer.Option(
            "--size",
            help="Working resolution, a bit above the training size (default 256; with "
            "--recipe 5/4 of data.image_size).",
        ),
    ] = None,
    dtype: Annotated[str, typer.Option("--dtype", help="uint8, uint16 or float16.")] = "uint8",
    fit: Annotated[
        str, typer.Option("--fit", help="Non-square images: squash, crop or pad.")
    ] = "squash",
    recipe: Annotated[
        str | None,
        typer.Option(
            "--recipe",
            "-r",
            help="Build what this recipe's training will ask for: its normalization, window, "
            "channels, frames and labels (flags may not contradict it).",
        ),
    ] = None,
    sets: SetOpt = None,
    intensity: IntensityFlags = offers(),
    dicom_series: SeriesOpt = False,
    workers: WorkersOpt = 0,
    hash_files: Annotated[
        bool, typer.Option("--hash", help="Store sha256 per file for exact invalidation.")
    ] = False,
    on_error: OnErrorOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Rebuild even if up to date.")] = False,
) -> None:
    """Decode every image once into a memory-mapped cache so epochs never re-decode files.

    The cache remembers file sizes/mtimes and the normalization; it is rebuilt when they
    change and refused by training when stale.

    Examples:

        beitdomain data cache data/ct --out cache/ct-lung --window ct-lung --size 256 -j 8

        beitdomain data cache scan.jsonl --recipe cpu-dicom --out cache/ct

        beitdomain data cache cells.jsonl --out cache/cells --dtype uint16

    With a segmentation recipe (finetune.task: segment) the labels' mask column is cached
    too, each mask beside its image at the cached size (nearest neighbour).
    """
    from beitdomain.data.cache import build_cache

    flags = asdict(intensity)
    labels_csv = None
    r = None
    if recipe is not None or sets:
        r = load(ctx, recipe, sets)
        spec, size, on_error, labels_csv = _cache_settings_from_recipe(
            r, recipe, flags, size, on_error
        )
        dicom_series = dicom_series or r.data.dicom_series
    else:
        spec = _spec_from_flags(flags)
    size = size or 256
    on_error = on_error or "fail"
    quiet = global_options(ctx).quiet
    build = dict(
        size=size,
        dtype=dtype,
        fit=fit,
        workers=workers,
        hash_files=hash_files,
        progress=not quiet,
        force=force,
    )
    if r is not None and r.finetune.task == "segment":
        # (image, mask) pairs from the labels' mask column: each mask stored beside its image
        from beitdomain.data.masks import cache_pairs

        if on_error == "skip":  # a skipped image would leave its mask's fine-tune short of it
            raise UserError(
                "data cache: --on-error skip (data.on_error) does not apply to (image, mask) "
                "pairs: every pair is checked and a bad one stops the cache, naming both files; "
                "fix or remove it from the labels CSV"
            )
        data = replace(r.data, root=str(source), dicom_series=dicom_series)
        cached = cache_pairs(replace(r, data=data), out, **build)
    else:
        source_obj: Any = source
        if source.is_dir():
            from beitdomain.data.index import scan as scan_folder

            # The scan normalizes too, so every bad file is named before the long cache pass.
            source_obj = scan_folder(
                source,
                labels_csv,
                on_error=on_error,
                workers=workers,
                progress=not quiet,
                spec=spec,
                dicom_series=dicom_series,
            )
        cached = build_cache(source_obj, out, spec=spec, on_error=on_error, **build)
    verb = "up to date" if cached.reused else "written"
    shape = "x".join(map(str, cached.images.shape[1:]))
    result = {
        "cache": str(out),
        "reused": bool(cached.reused),
        "n_items": len(cached),
        "item_shape": list(cached.images.shape[1:]),
        "dtype": str(cached.images.dtype),
        "skipped": [{"path": p, "reason": r} for p, r in cached.errors],
    }
    print_result(
        f"cache {verb}: {out} ({len(cached)} items of {shape} {cached.images.dtype})", result
    )
    if not json_requested():
        for path, reason in cached.errors[:20]:
            _out().print(f"[red]skipped[/] {path}: {reason}")


def cache_size_for(image_size: int) -> int:
    """The cache side a recipe wants: 5/4 of its crop size, a multiple of 8 (64 -> 80,
    224 -> 280), so random crops have pixels to choose from."""
    return max(8, round(image_size * 5 / 4 / 8) * 8)


def _cache_settings_from_recipe(
    r: Any, name: str | None, flags: dict[str, Any], size: int | None, on_error: str | None
) -> tuple[Any, int, str, str | None]:
    """(spec, size, on_error, labels CSV) for `data cache --recipe`: the recipe's data section,
    so training with that recipe accepts the cache. A flag that contradicts it is an error."""
    from beitdomain.io import IntensitySpec

    spec = IntensitySpec.from_config(r.data)
    wanted = spec.to_dict()
    given = _given_over(spec, flags)
    clash = [
        f"--{k.replace('_', '-')} {flags[k]} (the recipe has {k}: {wanted[k]})"
        for k in flags
        if flags[k] is not None and given.to_dict()[k] != wanted[k]
    ]
    if clash:
        raise UserError(
            f"data cache --recipe {name}: {'; '.join(clash)}. Training with this recipe would "
            f"refuse such a cache. Drop the flag, or change the recipe (--set data.KEY=VALUE)."
        )
    labels = r.data.labels
    return spec, size or cache_size_for(r.data.image_size), on_error or r.data.on_error, labels


@app.command("inspect")
@handle_errors
@grouped
def data_inspect(
    ctx: typer.Context,
    source: Annotated[Path, typer.Argument(help="Data folder, manifest or cache folder.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="PNG to write.")] = Path("sheet.png"),
    n: Annotated[int, typer.Option("--n", help="Number of images.")] = 16,
    seed: Annotated[int, typer.Option("--seed", help="Sampling seed.")] = 0,
    recipe: Annotated[
        str | None,
        typer.Option(
            "--recipe",
            "-r",
            help="Show what this recipe's training will see: its normalization, window, "
            "channels and frames (a flag that differs is used, with a warning).",
        ),
    ] = None,
    sets: SetOpt = None,
    intensity: IntensityFlags = offers(),
) -> None:
    """Write a contact sheet: sampled images after normalization with intensity histograms.

    Use it to check a window or percentile setting before caching or training. With --recipe
    (and --set) it shows the normalization that recipe trains on, as `data cache --recipe`
    builds it.

    Examples:

        beitdomain data inspect data/ct --window ct-lung --out lung.png

        beitdomain data inspect scan.jsonl --recipe cpu-dicom --out sheet.png

        beitdomain data inspect cache/ct-lung --n 25
    """
    from beitdomain.data.inspect import contact_sheet

    flags = asdict(intensity)
    if recipe is not None or sets:
        spec = _spec_beside_recipe(load(ctx, recipe, sets), recipe, flags)
    else:
        spec = _spec_from_flags(flags)
    src = _open_source(source, spec, on_error="skip", quiet=global_options(ctx).quiet)
    skipped = list(getattr(src, "errors", None) or [])
    if skipped:  # the sheet samples the others; a dropped volume must not go unsaid
        log.warning(
            "data inspect: %d unreadable file%s left out, e.g. %s: %s (`data scan` lists them all)",
            len(skipped),
            "" if len(skipped) == 1 else "s",
            *skipped[0],
        )
    path = contact_sheet(src, spec, out, n=n, seed=seed)
    print_result(f"contact sheet written to {path}", {"contact_sheet": str(path)})


def _spec_from_flags(flags: dict[str, Any]) -> Any:
    """The intensity spec of the flags alone (no recipe), each unset flag at its default."""
    return _spec(
        flags["normalize"] or "auto",
        flags["window"],
        flags["in_chans"] or 1,
        flags["frames"] or "all",
        flags["nonfinite"] or "error",
        flags["channels"],
        flags["slice_axis"] or "axial",
    )


def _spec_beside_recipe(r: Any, name: str | None, flags: dict[str, Any]) -> Any:
    """The recipe's normalization with the flags given over it, warning for each flag that
    differs from it: the sheet then shows something the recipe's training will not see."""
    from beitdomain.io import IntensitySpec

    wanted = IntensitySpec.from_config(r.data).to_dict()
    spec = _given_over(IntensitySpec.from_config(r.data), flags)
    for k in flags:
        if flags[k] is not None and spec.to_dict()[k] != wanted[k]:
            log.warning(
                "data inspect: --%s %s differs from the recipe %s (%s: %s): training with that "
                "recipe will not see what this sheet shows",
                k.replace("_", "-"),
                flags[k],
                name or "(defaults and --set)",
                k,
                wanted[k],
            )
    return spec


def _given_over(spec: Any, flags: dict[str, Any]) -> Any:
    """`spec` with the intensity flags that were given in place of its values."""
    wanted = spec.to_dict()
    return _spec(
        flags["normalize"] or spec.normalize,
        flags["window"] if flags["window"] is not None else wanted["window"],
        flags["in_chans"] or spec.in_chans,
        flags["frames"] or spec.frames,
        flags["nonfinite"] or spec.nonfinite,
        flags["channels"]
        if flags["channels"] is not None
        else (",".join(map(str, spec.channels)) if spec.channels else None),
        flags["slice_axis"] or spec.slice_axis,
    )


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

    if json_requested():
        print_json(
            [
                {"name": i.name, "from": i.source, "status": i.status, "description": i.description}
                for i in READERS.info()
            ]
        )
        return
    table = Table(title="image readers", title_justify="left")
    for col in ("name", "from", "status", "description"):
        table.add_column(col)
    for info in READERS.info():
        table.add_row(*(escape(x) for x in (info.name, info.source, info.status, info.description)))
    _out().print(table)
