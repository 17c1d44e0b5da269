"""The demo's export (an ordinary labelled folder with the papers' 75/25 split) and its errors."""

import builtins
import csv
import re
from collections import Counter

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from beitdomain.cli.app import app
from beitdomain.engine import demo


def read_rows(path):
    return list(csv.DictReader(path.read_text().splitlines()))


def fake_elpv(tmp_path, n=40):
    root = tmp_path / "pkg"
    (root / "images").mkdir(parents=True)
    probs = [0.0, 1 / 3, 2 / 3, 1.0]
    lines = []
    for i in range(n):
        name = f"cell{i:04d}.png"
        Image.fromarray(np.full((30, 30), i * 5, np.uint8)).save(root / "images" / name)
        lines.append(f"images/{name}  {probs[i % 4]}  {'mono' if i % 2 else 'poly'}")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return root


def test_export_labels_threshold_and_stratified_split(tmp_path, monkeypatch):
    pkg = fake_elpv(tmp_path)
    monkeypatch.setattr(demo, "elpv_folder", lambda: pkg)
    images = demo.export_elpv(tmp_path / "out")
    rows = read_rows(tmp_path / "out" / "labels.csv")
    assert len(rows) == 40
    # defective = probability >= 0.5 (2/3 and 1), functional = 0 and 1/3
    assert Counter(r["label"] for r in rows) == {"defective": 20, "functional": 20}
    assert Counter(r["split"] for r in rows) == {"train": 30, "test": 10}
    for label in ("defective", "functional"):  # stratified: 25% of each class in test
        assert sum(r["split"] == "test" and r["label"] == label for r in rows) == 5
    assert all((images / r["path"]).is_file() for r in rows)
    again = read_rows(tmp_path / "out" / "labels.csv")
    demo.export_elpv(tmp_path / "out")  # idempotent: same split on a re-run
    assert read_rows(tmp_path / "out" / "labels.csv") == again


def test_demo_without_the_package_names_the_install_command(monkeypatch):
    real_import = builtins.__import__

    def no_elpv(name, *args, **kwargs):
        if name == "elpv_dataset":
            raise ImportError("No module named 'elpv_dataset'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_elpv)
    result = CliRunner().invoke(app, ["demo", "--out", "unused"])
    assert result.exit_code == 2
    assert 'pip install -e ".[demo]"' in result.output


@pytest.mark.skipif(
    pytest.importorskip("importlib").util.find_spec("elpv_dataset") is None,
    reason="elpv-dataset is not installed (pip install -e '.[demo]')",
)
def test_real_package_is_found():
    folder = demo.elpv_folder()
    assert (folder / "labels.csv").is_file()
    assert len(list((folder / "images").glob("*.png"))) == 2624


def test_fp32_cpu_notice_only_where_the_cpu_recipe_runs_in_fp32(monkeypatch):
    from beitdomain.config import apply_sets, load_recipe
    from beitdomain.engine.train import distributed

    r = load_recipe("elpv-cpu")
    monkeypatch.setattr(distributed, "cpu_has_native_bf16", lambda: False)
    notice = demo.fp32_cpu_notice(r, "cpu")
    assert notice and "1.75 times as long" in notice
    # The suggested --set values are valid and run half the cells of the recipe's grid.
    sets = re.findall(r"--set '([^']+)'", notice)
    assert sets == demo.FP32_FEWER_SEEDS
    assert demo.cells_per_init(r) == 10  # 6 seeds at 1%, 3 at 10%, 1 at 100%
    assert demo.cells_per_init(apply_sets(r, sets)) == 5
    assert "5 fine-tuning cells per initialization instead of 10" in notice
    monkeypatch.setattr(distributed, "cpu_has_native_bf16", lambda: True)
    assert demo.fp32_cpu_notice(r, "cpu") is None  # auto -> bf16 here
    r.pretrain.train.precision = r.tokenizer.train.precision = r.finetune.train.precision = "fp32"
    assert demo.fp32_cpu_notice(r, "cpu") is not None  # asked for fp32
    r.name = "my-recipe"
    assert demo.fp32_cpu_notice(r, "cpu") is None  # times measured for elpv-cpu only


def test_export_never_replaces_labels_it_did_not_write(tmp_path, monkeypatch):
    pkg = fake_elpv(tmp_path)
    monkeypatch.setattr(demo, "elpv_folder", lambda: pkg)
    out = tmp_path / "out"
    out.mkdir()
    (out / "labels.csv").write_text("path,label\nscan1.dcm,tumour\n")
    with pytest.raises(demo.UserError, match=rf"{out / 'labels.csv'} is not the ELPV labels"):
        demo.export_elpv(out)
    assert (out / "labels.csv").read_text() == "path,label\nscan1.dcm,tumour\n"
    assert sorted(p.name for p in out.iterdir()) == ["labels.csv"]  # no image copied either
    # its own export, even one with another split, it rewrites
    (out / "labels.csv").unlink()
    demo.export_elpv(out)
    mine = (out / "labels.csv").read_text()
    (out / "labels.csv").write_text(mine.replace(",train", ",test"))
    demo.export_elpv(out)
    assert (out / "labels.csv").read_text() == mine


def test_the_demo_curve_runs_the_recipes_arms_beside_its_own_backbone(tmp_path):
    from dataclasses import replace

    from beitdomain.config import load_recipe

    recipe = load_recipe("elpv-cpu")
    inits = demo.demo_inits(recipe, tmp_path / "pretrain")
    assert next(iter(inits)) == "domain" and inits["domain"] == str(tmp_path / "pretrain")
    assert inits["scratch"] is None
    # an arm the recipe adds (the CNN a practitioner would train) reaches the curve;
    # a recipe's own "domain" entry gives way to the backbone the demo pre-trained
    extra = replace(recipe.curve, inits={"domain": "elsewhere", "cnn": "timm:resnet10t"})
    inits = demo.demo_inits(replace(recipe, curve=extra), tmp_path / "pretrain")
    assert inits == {"domain": str(tmp_path / "pretrain"), "cnn": "timm:resnet10t"}
