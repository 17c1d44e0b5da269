"""The demo's chain through the library API (no CLI): tokenizer -> pre-training -> curve.

    python examples/elpv_chain.py --out runs/elpv-api            # the CPU recipe, ~18 minutes
    python examples/elpv_chain.py --out runs/elpv-api --quick    # a few steps per stage, ~2 min

Needs the ELPV images: pip install -e ".[demo]".
"""

from __future__ import annotations

import argparse
from pathlib import Path

from beitdomain.config import load_recipe
from beitdomain.data.cache import build_cache
from beitdomain.data.index import scan
from beitdomain.engine.curve.run import run_curve
from beitdomain.engine.demo import export_elpv
from beitdomain.engine.pretrain import pretrain
from beitdomain.engine.tokenizer import train_tokenizer
from beitdomain.io import IntensitySpec

QUICK = [
    "tokenizer.train.steps=20",
    "pretrain.train.steps=20",
    "finetune.train.epochs=1",
    "finetune.train.min_steps=10",
    "curve.seeds=[0]",
    "curve.fractions=[10%, 100%]",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/elpv-api"))
    parser.add_argument("--quick", action="store_true", help="a few steps per stage")
    args = parser.parse_args()

    # 1. The images as an ordinary labelled folder: images/<class>/*.png + labels.csv (split).
    images = export_elpv(args.out / "data")
    labels = args.out / "data" / "labels.csv"

    # 2. The recipe: the shipped CPU recipe, pointed at the data; --quick shortens every stage.
    recipe = load_recipe(
        "elpv-cpu",
        options={"data.root": str(images), "data.labels": str(labels)},
        sets=QUICK if args.quick else [],
    )

    # 3. Decode once into a cache; training reads only the cache from here on.
    spec = IntensitySpec.from_config(recipe.data)
    manifest = scan(images, labels)
    build_cache(manifest, args.out / "cache", size=80, spec=spec)
    recipe = load_recipe(
        "elpv-cpu",
        options={
            "data.root": str(images),
            "data.labels": str(labels),
            "data.cache": str(args.out / "cache"),
            "tokenizer.path": str(args.out / "tokenizer"),
            "curve.inits": {"domain": str(args.out / "pretrain"), "scratch": None},
        },
        sets=QUICK if args.quick else [],
    )

    # 4. Tokenizer, pre-training, curve: each a resumable run folder.
    tok = train_tokenizer(recipe, args.out / "tokenizer", resume=True)
    print(f"tokenizer: held-out PSNR {tok['psnr']:.2f} dB, {100 * tok['fraction_used']:.0f}% codes")
    pre = pretrain(recipe, args.out / "pretrain", resume=True)
    print(f"pre-training: {pre['steps']} steps, masked-token accuracy {pre.get('acc', 0):.3f}")
    curve = run_curve(recipe, args.out / "curve")
    for eff in curve["efficiency"]:
        print(eff["statement"])
    print(f"report: {args.out / 'curve' / 'report.md'}")


if __name__ == "__main__":
    main()
