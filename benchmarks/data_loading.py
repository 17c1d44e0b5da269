"""Data loading throughput on one CPU core: raw decode vs. the cache vs. cache + augmentation.

Run: ``python benchmarks/data_loading.py [--n 200] [--seconds 2]``. Prints a markdown table.

What is measured (images per CPU-second of one single-threaded process, so shared machines
still give one-core figures; 224 x 224 single-channel model input):

* raw decode, per format: ``load_image`` (read, decode, normalize to float32 [0, 1]) plus the
  resize to 224 x 224 an uncached loader would need. Files are synthetic but realistic:
  512 x 512 int16 CT slices (uncompressed DICOM, rescale slope/intercept, window ct-lung),
  512 x 512 uint16 TIFF (LZW), 300 x 300 uint8 PNG (ELPV solar-cell size).
* cached load: one item from the memory-mapped cache (256 x 256 uint8), as a float32 tensor.
* cached + pre-training augmentation: ``ImageDataset(cache, PretrainTransform(224, 112))``,
  i.e. random resized crop, flip, intensity jitter, 224 view + 112 tokenizer view, tensors;
  and the same with a BEiT block mask (75 of 196 patches) when ``beitdomain.data.masking``
  is available.

The goal (issue 3): cached + augmentation >= 1,500 img/s on one core and >= 20x raw DICOM.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import torch


def _throughput(fn: Callable[[int], object], n_items: int, seconds: float) -> float:
    """Calls ``fn(i)`` over shuffled indices for about ``seconds``; returns calls per second."""
    order = np.random.default_rng(0).permutation(n_items)
    for i in order[: min(20, n_items)]:  # warm-up (imports, page cache, lazy maps)
        fn(int(i))
    # CPU time of this (single-threaded) process: a fair one-core figure even when other jobs
    # share the machine; wall-clock rates match it on an idle core.
    count, start = 0, time.process_time()
    while time.process_time() - start < seconds:
        fn(int(order[count % n_items]))
        count += 1
    return count / (time.process_time() - start)


def _make_files(root: Path, n: int) -> dict[str, list[Path]]:
    import pydicom
    import tifffile
    from PIL import Image
    from pydicom.data import get_testdata_file

    rng = np.random.default_rng(0)
    files: dict[str, list[Path]] = {"DICOM": [], "TIFF": [], "PNG": []}
    template = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    yy, xx = np.mgrid[:512, :512]
    body = ((yy - 256) ** 2 + (xx - 256) ** 2 < 220**2).astype(np.int16)
    for k in range(n):
        noise = rng.normal(0, 30, (512, 512))
        ct = (body * (1040 + noise) + (1 - body) * 24).astype(np.int16)  # air ~ -1000 HU
        ds = template.copy()
        ds.Rows, ds.Columns = 512, 512
        ds.PixelData = ct.tobytes()
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        path = root / f"ct_{k:04d}.dcm"
        ds.save_as(path)
        files["DICOM"].append(path)
        path = root / f"img_{k:04d}.tif"
        tifffile.imwrite(path, (ct.astype(np.int32) + 1024).astype(np.uint16), compression="lzw")
        files["TIFF"].append(path)
        path = root / f"cell_{k:04d}.png"
        Image.fromarray(rng.integers(0, 255, (300, 300), dtype=np.uint8)).save(path)
        files["PNG"].append(path)
    return files


def _user_pipelines(cache: object, tmp: Path, seconds: float) -> list[tuple[str, float]]:
    """`data.augment`: the same kind of augmentation as the built-in path (random resized
    crop, flip, brightness/contrast), as an albumentations file and as a MONAI chain, reseeded
    per item from (seed, epoch, index); 224 + 112 views from one crop."""
    from beitdomain.data.dataset import ImageDataset
    from beitdomain.data.transforms import UserAugment

    rows = []

    def add_row(label: str, augment: str) -> None:
        ds = ImageDataset(cache, UserAugment(augment, 224, 112), seed=0)
        rows.append(
            (
                f"{label} (data.augment, 224 + 112 views)",
                _throughput(ds.__getitem__, len(ds), seconds),
            )
        )

    try:
        import albumentations as A

        path = tmp / "albu.json"
        pipeline = A.Compose(
            [
                A.RandomResizedCrop(size=(224, 224), scale=(0.2, 1.0)),
                A.HorizontalFlip(p=0.5),
                A.RandomBrightnessContrast(p=0.8),
                A.RandomGamma(p=0.8),
            ]
        )
        A.save(pipeline, str(path), data_format="json")
        add_row("cached + albumentations file", str(path))
    except ImportError:
        pass
    try:
        import sys

        import monai.transforms  # noqa: F401  (skip the row when MONAI is missing)

        module = tmp / "bench_monai_chain.py"
        module.write_text(
            "from monai.transforms import Compose, RandAdjustContrast, RandFlip, "
            "RandSpatialCrop, RandScaleIntensity\n"
            "def build():\n"
            "    return Compose([RandSpatialCrop((115, 115), max_roi_size=(256, 256), "
            "random_size=True), RandFlip(prob=0.5, spatial_axis=1), "
            "RandScaleIntensity(factors=0.1, prob=0.8), RandAdjustContrast(prob=0.8)])\n"
        )
        sys.path.insert(0, str(tmp))
        add_row("cached + MONAI chain", "bench_monai_chain:build")
    except ImportError:
        pass
    return rows


def _volume_rows(tmp: Path, seconds: float) -> list[tuple[str, float]]:
    """A 256 x 256 x 64 int16 CT volume (NIfTI, gzipped): slices per CPU-second from files
    (``ManifestImages``: one decode per volume, kept while its slices are read) and the
    one-off MONAI import."""
    try:
        import nibabel as nib
    except ImportError:
        return []
    import subprocess
    import sys

    from beitdomain.data.dataset import ManifestImages
    from beitdomain.data.index import scan
    from beitdomain.io import IntensitySpec

    root = tmp / "volumes"
    root.mkdir()
    rng = np.random.default_rng(0)
    for k in range(4):
        vol = rng.normal(40, 200, (256, 256, 64)).astype(np.int16)
        nib.save(nib.Nifti1Image(vol, np.diag([0.8, 0.8, 2.5, 1.0])), root / f"ct{k}.nii.gz")
    start = time.perf_counter()
    code = "import monai.data"
    subprocess.run([sys.executable, "-c", code], check=True)
    monai_import = time.perf_counter() - start
    from beitdomain.io import load_image

    spec = IntensitySpec(window="ct-abdomen")
    paths = sorted(root.iterdir())
    items = ManifestImages(scan(root), spec)
    rows = [
        (
            "NIfTI volume decode, 256 x 256 x 64 (load_image; volumes/s)",
            _throughput(lambda i: load_image(paths[i % len(paths)], spec), len(paths), seconds),
        ),
        (
            "NIfTI slices from files (ManifestImages; every volume kept after its decode)",
            _throughput(items.__getitem__, len(items), seconds),
        ),
    ]
    print(f"one-off `import monai.data` in a fresh process: {monai_import:.1f} s wall")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200, help="files per format")
    parser.add_argument("--seconds", type=float, default=2.0, help="time per measurement")
    args = parser.parse_args()

    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    warnings.simplefilter("ignore")

    from beitdomain.data.cache import build_cache
    from beitdomain.data.dataset import ImageDataset
    from beitdomain.data.index import scan
    from beitdomain.data.transforms import PretrainTransform
    from beitdomain.io import IntensitySpec, load_image

    rows: list[tuple[str, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        root.mkdir()
        files = _make_files(root, args.n)
        specs = {
            "DICOM": IntensitySpec(window="ct-lung"),
            "TIFF": IntensitySpec(),
            "PNG": IntensitySpec(),
        }
        for fmt, paths in files.items():
            spec = specs[fmt]

            def raw(i: int, paths=paths, spec=spec) -> object:
                image, _ = load_image(paths[i], spec)
                return cv2.resize(image[0], (224, 224), interpolation=cv2.INTER_AREA)

            rows.append((f"raw decode {fmt} (load_image + resize to 224)", 0.0))
            rows[-1] = (rows[-1][0], _throughput(raw, len(paths), args.seconds))

        dicom_dir = Path(tmp) / "dicom"
        dicom_dir.mkdir()
        for p in files["DICOM"]:
            p.rename(dicom_dir / p.name)
        cache = build_cache(
            scan(dicom_dir), Path(tmp) / "cache", size=256, spec=IntensitySpec(window="ct-lung")
        )

        def cached(i: int) -> object:
            return torch.from_numpy(cache[i].astype(np.float32) * np.float32(1 / 255))

        rows.append(
            (
                "cached load (256 uint8 -> float tensor)",
                _throughput(cached, len(cache), args.seconds),
            )
        )
        ds = ImageDataset(cache, PretrainTransform(224, 112), seed=0)
        rows.append(
            (
                "cached + pretrain augmentation (224 + 112 views)",
                _throughput(ds.__getitem__, len(ds), args.seconds),
            )
        )
        try:
            from beitdomain.data.masking import BlockMaskGenerator

            gen = BlockMaskGenerator((14, 14), 75)
            ds_mask = ImageDataset(cache, PretrainTransform(224, 112), seed=0, mask_generator=gen)
            rows.append(
                (
                    "cached + augmentation + block mask (75/196)",
                    _throughput(ds_mask.__getitem__, len(ds), args.seconds),
                )
            )
        except ImportError:
            pass
        rows += _user_pipelines(cache, Path(tmp), args.seconds)
        rows += _volume_rows(Path(tmp), args.seconds)

    dicom = rows[0][1]
    print(
        f"\nData loading, images per CPU-second on one core ({args.n} files per format, "
        f"{args.seconds:.0f} s each)\n"
    )
    print("| pipeline | images/s | vs raw DICOM |")
    print("|---|---:|---:|")
    for name, rate in rows:
        print(f"| {name} | {rate:,.0f} | {rate / dicom:.1f}x |")


if __name__ == "__main__":
    main()
