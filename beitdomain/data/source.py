"""Recipe -> images: the recipe's images as an indexable source, and a fingerprint of the data.

Images come from a cache (`data.cache`, decoded once: the fast path), a manifest
(`data.manifest`) or a folder scanned now (`data.root`).
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

from beitdomain.config import Recipe
from beitdomain.data.cache import CachedImages
from beitdomain.data.dataset import ManifestImages
from beitdomain.data.index import Manifest, read_labels_csv, scan
from beitdomain.io import IntensitySpec
from beitdomain.rank import dist_info
from beitdomain.user import UserError

log = logging.getLogger(__name__)


def image_source(
    recipe: Recipe, progress: bool = True, report_dir: Path | None = None
) -> tuple[Any, str]:
    """The recipe's images as an indexable source, and a fingerprint of the data.

    With `data.on_error: skip`, unreadable files are listed in `report_dir/quarantine.csv`
    (the run folder), or beside the data folder when no run folder is given.

    Raises:
        UserError: no data configured.
        ScanError / CacheError: unreadable files, a stale cache (named, with the fix).
    """
    d = recipe.data
    spec = IntensitySpec.from_config(d)
    if d.cache:
        src = CachedImages(d.cache, spec=spec)
        if d.labels:
            check_cache_labels(src, d.labels, Path(d.root or src.root), d.cache)
        info = (Path(d.cache) / "cache.json").read_bytes()
        return src, "cache:" + hashlib.sha256(info).hexdigest()
    if d.manifest:
        manifest = Manifest.load(d.manifest, root=d.root)
    elif d.root:
        manifest = scan(
            d.root,
            d.labels,
            on_error=d.on_error,
            allow_outside_root=d.allow_outside_root,
            progress=progress and dist_info().is_main,
            spec=spec,
            group_column=d.group_column,
            patient_groups=d.patient_groups,
            dicom_series=d.dicom_series,
        )
        if manifest.errors and dist_info().is_main:
            report = (
                Path(report_dir) / "quarantine.csv"
                if report_dir is not None
                else Path(d.root).resolve().parent / f"{Path(d.root).name}-errors.csv"
            )
            manifest.save_errors(report)
            log.warning("%d unreadable files skipped; listed in %s", len(manifest.errors), report)
    else:
        raise UserError(
            "no images given: set data.root to a folder (e.g. --data /path/to/images), "
            "data.manifest to a `beitdomain data scan` manifest, or data.cache to a "
            "`beitdomain data cache` folder"
        )
    return ManifestImages(manifest, spec), manifest.fingerprint()


def check_cache_labels(src: CachedImages, labels_csv: str, root: Path, cache: str) -> None:
    """A cache carries the labels and splits of the manifest it was built from; `data.labels`
    beside `data.cache` must agree with them, or the CSV would be silently ignored.

    Raises:
        UserError: naming how many files differ, a few examples, and the commands that rebuild
            the cache with these labels.
    """
    rows, _ = read_labels_csv(labels_csv, root)
    rows = [(p, lab, split) for p, lab, split, _ in rows]  # groups are not compared
    root_resolved = root.resolve()
    quarantined = {path for path, _ in src.errors}  # unreadable files the cache skipped
    wanted = {
        rel: (lab, split)
        for p, lab, split in rows
        if (rel := p.relative_to(root_resolved).as_posix()) not in quarantined
    }
    cached = {f["path"]: (f["label"], f["split"]) for f in src.files}
    differ = [
        f"{path}: cache has {cached.get(path, ('-', '-'))}, CSV has {want}"
        for path, want in wanted.items()
        if cached.get(path) != want
    ]
    differ += [f"{path}: in the cache, not in the CSV" for path in cached if path not in wanted]
    if differ:
        raise UserError(
            f"data.labels {labels_csv} does not match the labels and splits stored in the cache "
            f"{cache} ({len(differ)} file(s) differ), and a cache's own labels are the ones "
            "used. First differences:\n  "
            + "\n  ".join(differ[:5])
            + f"\nRebuild the cache from a manifest with these labels:\n  beitdomain data scan "
            f"{root} --labels {labels_csv} --out manifest.jsonl\n  beitdomain data cache "
            f"manifest.jsonl --out {cache} ...\nor leave data.labels unset to use the cache's."
        )
