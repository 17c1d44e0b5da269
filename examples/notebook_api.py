# %% [markdown]
# # beitdomain from Python: pre-train on a folder of DICOMs, embed images, check the features
#
# A notebook in script form: run it whole (`python examples/notebook_api.py --out runs/nb`,
# about a minute on a laptop CPU) or cell by cell (`# %%` cells: VS Code, PyCharm, Jupytext).
# Every call is what a `beitdomain` command runs, with the same recipes; the data is the MR and
# secondary-capture files that ship inside pydicom, labelled by modality.

# %%
from __future__ import annotations

import argparse
import csv
import shutil
from pathlib import Path

from beitdomain import api

parser = argparse.ArgumentParser(description="beitdomain's Python API on pydicom's DICOMs")
parser.add_argument("--out", type=Path, default=Path("runs/notebook"))
args, _ = parser.parse_known_args()  # known only: a notebook kernel passes its own arguments
OUT = args.out

# %% [markdown]
# ## 1. A labelled folder of real DICOMs
# `labels.csv` has `path,label` rows, paths relative to the folder, as `data.labels` expects.

# %%
from pydicom.data import DATA_ROOT  # noqa: E402

data = OUT / "dicoms"
data.mkdir(parents=True, exist_ok=True)
rows = []
for f in sorted((Path(DATA_ROOT) / "test_files").glob("*.dcm")):
    if f.name.startswith(("MR_", "SC_")) and "truncated" not in f.name:
        shutil.copy(f, data / f.name)
        rows.append((f.name, f.name[:2].lower()))
with open(OUT / "labels.csv", "w", newline="") as fh:
    csv.writer(fh).writerows([("path", "label"), *rows])
n_mr = sum(label == "mr" for _, label in rows)
print(f"{len(rows)} files: {n_mr} MR, {len(rows) - n_mr} SC")

# %% [markdown]
# ## 2. A recipe: the laptop one, with a few steps per stage
# `load_recipe` takes a shipped name or a YAML file, typed options and `--set` strings, exactly
# as the command line does: precedence defaults < recipe < options < sets.

# %%
recipe = api.load_recipe(
    "cpu-dicom",
    options={
        "data.root": str(data),
        "data.labels": str(OUT / "labels.csv"),
        "data.on_error": "skip",  # unreadable files are listed in quarantine.csv
        "data.num_workers": 0,
        "tokenizer.path": str(OUT / "tokenizer"),
    },
    sets=["tokenizer.train.steps=20", "pretrain.train.steps=20", "data.test_fraction=0.3"],
)

# %% [markdown]
# ## 3. Tokenizer and pre-training: the engines behind `tokenizer train` and `pretrain`

# %%
tok = api.train_tokenizer(recipe, OUT / "tokenizer", resume=True, quiet=True)
print(f"tokenizer: {tok['steps']} steps, held-out PSNR {tok['psnr']:.1f} dB")
pre = api.pretrain(recipe, OUT / "pretrain", resume=True, quiet=True)
print(f"pre-training: {pre['steps']} steps, loss {pre['loss']:.3f}")

# %% [markdown]
# ## 4. The backbone as a timm model, and features of any image
# `load_backbone` gives a timm `Beit` (no head) and how it sees images: the recipe's intensity
# normalization and the evaluation resize + center crop (`data_config`).

# %%
bb = api.load_backbone(OUT / "pretrain")
print(type(bb.model).__name__, bb.data_config["input_size"], bb.spec.normalize)
features = bb.embed(sorted(data.glob("MR_*.dcm"))[:3])
print("features of 3 MR files:", features.shape)

# %% [markdown]
# ## 5. Are the features any good? k-NN and a linear probe, beside random weights
# The same splits as fine-tuning; `beitdomain eval knn|probe RUN` prints this table.

# %%
scores = api.evaluate_representation(bb, recipe, ("knn", "probe"), progress=False)
for method, arms in scores["methods"].items():
    line = ", ".join(f"{arm} {100 * m['balanced_accuracy']:.0f}%" for arm, m in arms.items())
    print(f"{method}: balanced accuracy {line} ({scores['n_test']} test images)")
