"""Pre-training on a folder of DICOMs, with pydicom's own bundled test files as the folder.

    python examples/pretrain_dicom_folder.py --out runs/dicom-example

The bundled files are ~90 real DICOMs of many modalities and transfer syntaxes; some are
deliberately broken. The scan quarantines what cannot be read (--on-error skip) and says why,
then a tiny tokenizer and a tiny BEiT are trained on the rest for a few steps. Swap `--data`
for your own folder and the recipe for `ct-dicom` to do it for real.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from beitdomain.config import load_recipe
from beitdomain.engine.pretrain import pretrain
from beitdomain.engine.tokenizer import train_tokenizer

TINY = [
    "data.image_size=64",
    "data.tokenizer_size=32",
    "data.on_error=skip",
    "data.num_workers=0",
    "data.frames=first",
    "tokenizer.preset=tiny",
    "tokenizer.train.steps=10",
    "tokenizer.train.batch_size=16",
    "model.preset=tiny",
    "pretrain.train.steps=10",
    "pretrain.train.batch_size=16",
]


def bundled_dicoms(dst: Path) -> Path:
    """Copies the DICOMs that ship inside the pydicom package into `dst`.

    The folder is listed directly: `pydicom.data.get_testdata_files("*.dcm")` would also try to
    download pydicom's online test files, which hangs on a machine without network access.
    """
    from pydicom.data import DATA_ROOT

    dst.mkdir(parents=True, exist_ok=True)
    for f in sorted((Path(DATA_ROOT) / "test_files").glob("*.dcm")):
        shutil.copy(f, dst / f.name)
    return dst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/dicom-example"))
    parser.add_argument("--data", type=Path, help="a folder of DICOMs (default: pydicom's)")
    args = parser.parse_args()
    data = args.data or bundled_dicoms(args.out / "dicoms")
    recipe = load_recipe(
        options={"data.root": str(data), "tokenizer.path": str(args.out / "tokenizer")},
        sets=TINY,
    )
    tok = train_tokenizer(recipe, args.out / "tokenizer", resume=True, quiet=True)
    print(f"tokenizer: {tok['steps']} steps, held-out PSNR {tok['psnr']:.2f} dB")
    pre = pretrain(recipe, args.out / "pretrain", resume=True, quiet=True)
    print(f"pre-training: {pre['steps']} steps, loss {pre['loss']:.3f}")
    quarantine = args.out / "tokenizer" / "quarantine.csv"
    if quarantine.is_file():
        n = len(quarantine.read_text().splitlines()) - 1
        print(f"{n} files could not be used; reasons in {quarantine}")
    print(f"backbone for fine-tuning: {args.out / 'pretrain' / 'backbone.safetensors'}")


if __name__ == "__main__":
    main()
