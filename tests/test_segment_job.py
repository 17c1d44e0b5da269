"""`beitdomain finetune --task segment` as a job (issue 38): the CLI end to end on generated
shapes, masks refused before the run folder exists, an exact resume, stardist's nuclei."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from helpers import assert_same_tensors, load_tensors, lose_newest_checkpoint, sets_to_args
from PIL import Image
from typer.testing import CliRunner

from beitdomain.cli.app import app
from beitdomain.config import load_recipe
from beitdomain.data.masks import MaskError
from beitdomain.engine.run.checkpoint import CheckpointManager
from beitdomain.engine.run.metrics_log import read_metrics
from beitdomain.engine.segment import finetune_segment

# Tiny models on a shared 2-core machine: one torch thread (conftest), no spin-waiting.
pytestmark = pytest.mark.usefixtures("one_thread")

# A tiny BEiT at 32 px, single-process loading, a checkpoint every 3 steps.
SEGMENT_SETS = [
    "data.num_workers=0",
    "data.image_size=32",
    "data.in_chans=1",
    "data.val_fraction=0.2",
    "data.test_fraction=0.25",
    "model.preset=tiny",
    "finetune.drop_path=0.0",
    "finetune.train.batch_size=4",
    "finetune.train.min_steps=0",
    "finetune.train.log_every=1",
    "finetune.train.ckpt_every=3",
    "finetune.optim.lr=3e-3",
    "finetune.optim.warmup_steps=2",
    "segment.classes=[background,disc]",
    "segment.decoder_channels=16",
]


def write_discs(root: Path, n: int = 16, size: int = 32, seed: int = 0) -> Path:
    """`n` bright discs on noise (img/k.png) with their masks (msk/k.png) and labels.csv."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    rows = ["path,mask"]
    for k in range(n):
        cy, cx = rng.uniform(8, size - 8, 2)
        r = rng.uniform(4, 8)
        mask = ((yy - cy) ** 2 + (xx - cx) ** 2 < r * r).astype(np.uint8)
        image = np.clip(rng.normal(0.3, 0.1, (size, size)) + 0.4 * mask, 0, 1)
        for folder, array in (("img", (255 * image).astype(np.uint8)), ("msk", mask)):
            (root / folder).mkdir(parents=True, exist_ok=True)
            Image.fromarray(array).save(root / folder / f"{k:02d}.png")
        rows.append(f"img/{k:02d}.png,msk/{k:02d}.png")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root


def _recipe(data: Path, *sets: str):
    return load_recipe(
        None,
        {"data.root": str(data), "data.labels": str(data / "labels.csv")},
        [*SEGMENT_SETS, "finetune.task=segment", *sets],
    )


def test_the_cli_fine_tunes_a_segmenter_end_to_end(tmp_path):
    data = write_discs(tmp_path / "discs", n=20)
    out = tmp_path / "run"
    args = [
        "--quiet",
        "finetune",
        "--task",
        "segment",
        "--data",
        str(data),
        "--labels-csv",
        str(data / "labels.csv"),
        "--labels",
        "50%",
        "--steps",
        "30",
        "--selection",
        "carve",
        "--out",
        str(out),
        *sets_to_args(SEGMENT_SETS),
    ]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    results = json.loads((out / "results.json").read_text())
    # 20 images: 5 test, 4 val (unused: validation is carved from the subset), 11 train
    assert (results["n_train"], results["n_labels"]) == (11, 6)
    assert results["test"]["n_images"] == 5 and set(results["test"]["dice"]) == {
        "background",
        "disc",
    }
    assert results["test"]["mean_dice"] == results["test"]["dice"]["disc"]
    assert results["test"]["dice"]["disc"] > 0.6, results["test"]  # measured: 0.85
    assert "test mean dice" in res.output and "test disc" in res.output
    sheet = Image.open(out / "contact_sheet.png")
    assert sheet.size == (3 * 32 + 2 * 2, 5 * 32 + 4 * 2)  # 5 test images, 3 tiles each
    used = (out / "labels_used.csv").read_text().splitlines()
    assert used[0] == "path,mask,split" and len(used) == 1 + 6 + 5
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "completed" and manifest["task"] == "segment"

    # predict writes one PNG label map per image; on the test images they score as results.json
    masks = tmp_path / "masks"
    res = CliRunner().invoke(
        app, ["--quiet", "predict", str(out), str(data / "img"), "-o", str(masks)]
    )
    assert res.exit_code == 0, res.output
    assert "wrote 20 mask(s)" in res.output
    from beitdomain.eval.segment_metrics import SegmentationMeter

    meter = SegmentationMeter(["background", "disc"])
    for row in used[1:]:
        image, mask, split = row.split(",")
        if split == "test":
            pred = np.asarray(
                Image.open(masks / Path(image).relative_to("img").with_suffix(".png"))
            )
            assert pred.shape == (32, 32) and pred.dtype == np.uint8
            meter.update(pred.astype(np.int64), np.asarray(Image.open(data / mask), np.int64))
    assert meter.compute()["dice"]["disc"] == pytest.approx(results["test"]["dice"]["disc"])


def _bad_mask(data: Path, name: str, array: np.ndarray) -> None:
    Image.fromarray(array).save(data / "msk" / name)


@pytest.mark.parametrize(
    ("array", "match"),
    [
        (np.zeros((24, 32), np.uint8), r"mask .*msk/03.png is 1 x 24 x 32 but its image .*img/03"),
        (np.full((32, 32), 2, np.uint8), r"mask .*msk/03.png \(of image .*img/03.png\) holds "),
    ],
    ids=["size", "values"],
)
def test_a_mask_that_does_not_fit_is_refused_before_the_run_folder(tmp_path, array, match):
    data = write_discs(tmp_path / "discs", n=8)
    _bad_mask(data, "03.png", array)
    out = tmp_path / "run"
    with pytest.raises(MaskError, match=match) as e:
        finetune_segment(_recipe(data, "finetune.train.steps=2"), out, device="cpu", quiet=True)
    if "values" in str(e.value):
        assert "[2]" in str(e.value)  # the value itself
    assert not out.exists()


def test_an_unreadable_mask_names_both_files_on_the_cli(tmp_path):
    data = write_discs(tmp_path / "discs", n=8)
    (data / "msk" / "05.png").write_bytes(b"not a png")
    out = tmp_path / "run"
    args = [
        "finetune",
        "--task",
        "segment",
        "--data",
        str(data),
        "--labels-csv",
        str(data / "labels.csv"),
        "--out",
        str(out),
        *sets_to_args(SEGMENT_SETS),
    ]
    res = CliRunner().invoke(app, args)
    assert res.exit_code != 0
    text = " ".join(res.output.split())
    assert "05.png" in text and "img/05.png" in text and "cannot be read" in text, res.output
    assert not out.exists()


def test_a_resumed_segmentation_run_ends_equal_to_an_uninterrupted_one(tmp_path):
    data = write_discs(tmp_path / "discs", n=12)
    r = _recipe(
        data,
        "finetune.train.steps=6",
        "finetune.train.deterministic=true",
        "finetune.selection=outside",
        "finetune.train.eval_every=2",
    )
    run = tmp_path / "run"
    first_res = finetune_segment(r, run, device="cpu", quiet=True)
    first = [m for m in read_metrics(run / "metrics.jsonl") if "loss" in m]
    mgr = CheckpointManager(run / "checkpoints")
    assert mgr.steps() == [3, 6]
    final = mgr.load_latest()[1]["model"]
    best = load_tensors(run / "best.safetensors")
    lose_newest_checkpoint(run, "results.json")  # steps 4-6 run again, from step 3's state
    again_res = finetune_segment(r, run, device="cpu", quiet=True, resume=True)
    again = [m for m in read_metrics(run / "metrics.jsonl") if "loss" in m]
    assert [(m["step"], m["loss"]) for m in again] == [(m["step"], m["loss"]) for m in first]
    assert_same_tensors(mgr.load_latest()[1]["model"], final, "final weights")
    assert_same_tensors(load_tensors(run / "best.safetensors"), best, "best weights")
    assert again_res["test"] == first_res["test"]
    assert again_res["best_step"] == first_res["best_step"]


def test_a_run_folder_is_guarded_like_the_others(tmp_path):
    data = write_discs(tmp_path / "discs", n=8)
    r = _recipe(data, "finetune.train.steps=1")
    run = tmp_path / "run"
    finetune_segment(r, run, device="cpu", quiet=True)
    from beitdomain.user import UserError

    with pytest.raises(UserError, match="--resume|--overwrite"):
        finetune_segment(r, run, device="cpu", quiet=True)


def test_the_unet_baseline_and_a_pretrain_init(tmp_path):
    from helpers import timm_beit
    from safetensors.torch import save_file

    from beitdomain.engine.build import backbone_config

    data = write_discs(tmp_path / "discs", n=16)
    res = finetune_segment(
        _recipe(data, "finetune.train.steps=30", "finetune.init=unet"),
        tmp_path / "unet",
        device="cpu",
        quiet=True,
    )
    assert (res["arch"], res["init"], res["layer_decay"]) == ("unet", "unet", None)
    assert res["test"]["dice"]["disc"] > 0.5, res[
        "test"
    ]  # measured: 0.66 (BEiT from scratch: 0.83)
    r = _recipe(data, "finetune.train.steps=1")
    official = timm_beit(backbone_config(r).replace(use_shared_rel_pos_bias=False), seed=3)
    path = tmp_path / "beit.safetensors"
    save_file({k: v.contiguous() for k, v in official.state_dict().items()}, path)
    res = finetune_segment(
        _recipe(data, "finetune.train.steps=1", f"finetune.init={path}"),
        tmp_path / "init",
        device="cpu",
        quiet=True,
    )
    assert res["init"] == str(path) and res["layer_decay"] == 0.65
    assert (tmp_path / "init" / "init_report.json").is_file()


def test_a_timm_cnn_init_is_refused_for_segmentation(tmp_path):
    data = write_discs(tmp_path / "discs", n=8)
    from beitdomain.user import UserError

    with pytest.raises(UserError, match="unet"):
        finetune_segment(_recipe(data, "finetune.init=timm:resnet18"), tmp_path / "r", device="cpu")
    assert not (tmp_path / "r").exists()


def _stardist_images() -> Path | None:
    spec = importlib.util.find_spec("stardist")  # found without importing it (TensorFlow)
    if spec is None or spec.origin is None:
        return None
    folder = Path(spec.origin).parent / "data" / "images"
    return folder if (folder / "img2d.tif").is_file() else None


def test_stardist_nuclei_fine_tune_as_a_job(tmp_path):
    folder = _stardist_images()
    if folder is None:
        pytest.skip("stardist is not installed (pip install stardist: its bundled img2d.tif)")
    import tifffile

    from beitdomain.data.masks import read_mask
    from beitdomain.io import read_raw

    # The bundled mask is an instance mask: made binary, and the image cut into 64 px tiles.
    raw, _ = read_raw(folder / "img2d.tif")
    image = raw[0, 0]
    mask = (read_mask(folder / "mask2d.tif")[0] > 0).astype(np.uint8)
    data = tmp_path / "nuclei"
    (data / "img").mkdir(parents=True)
    (data / "msk").mkdir()
    rows = ["path,mask,split"]
    for k, (y, x) in enumerate((y, x) for y in range(0, 512, 64) for x in range(0, 512, 64)):
        tifffile.imwrite(data / "img" / f"{k:02d}.tif", image[y : y + 64, x : x + 64])
        tifffile.imwrite(data / "msk" / f"{k:02d}.tif", mask[y : y + 64, x : x + 64])
        split = "train" if k < 48 else "test"  # the bottom eighth of the image is the test
        rows.append(f"img/{k:02d}.tif,msk/{k:02d}.tif,{split}")
    (data / "labels.csv").write_text("\n".join(rows) + "\n")
    r = load_recipe(
        None,
        {"data.root": str(data), "data.labels": str(data / "labels.csv")},
        [
            *SEGMENT_SETS,
            "finetune.task=segment",
            "segment.classes=[background,nucleus]",
            "finetune.train.steps=40",
            "finetune.train.batch_size=8",
            "data.crop_scale=[0.3,1.0]",
            "data.vflip=0.5",
        ],
    )
    res = finetune_segment(r, tmp_path / "run", device="cpu", quiet=True)
    assert res["n_train"] == 48 and res["test"]["n_images"] == 16
    # measured: nucleus Dice 0.86 with the plain loop of the first slice
    print(res["test"])
    assert res["test"]["dice"]["nucleus"] > 0.7, res["test"]


def test_a_pretrain_run_folder_initializes_the_segmenter(tmp_path):
    from helpers import PRETRAIN_SETS, write_tiny_tokenizer

    from beitdomain.engine.pretrain import pretrain

    data = write_discs(tmp_path / "discs", n=8)
    pre = tmp_path / "pre"
    r = load_recipe(
        None,
        {
            "data.root": str(data / "img"),
            "tokenizer.path": str(write_tiny_tokenizer(tmp_path / "t")),
        },
        [*PRETRAIN_SETS, "pretrain.train.steps=2"],
    )
    pretrain(r, pre, device="cpu", quiet=True)
    # the pre-training's 64 px view (its tokenizer's 8x8 grid): the segmenter trains at 64 too
    res = finetune_segment(
        _recipe(data, "data.image_size=64", "finetune.train.steps=1", f"finetune.init={pre}"),
        tmp_path / "seg",
        device="cpu",
        quiet=True,
    )
    assert res["init"] == str(pre / "backbone.safetensors") and res["layer_decay"] == 0.65
    report = json.loads((tmp_path / "seg" / "init_report.json").read_text())
    # every backbone tensor loaded; only the decoder (the segmenter's head) starts fresh
    assert all(k.startswith("head.") for k in report["missing"]), report["missing"]
    assert not report["mismatched"], report["mismatched"]
    assert any(k.startswith("blocks.") for k in report["loaded"])


def test_masks_from_a_folder_mirroring_the_data_root(tmp_path):
    data = write_discs(tmp_path / "discs", n=8)
    r = load_recipe(
        None,
        {"data.root": str(data / "img"), "segment.masks": str(data / "msk")},
        [*SEGMENT_SETS, "finetune.task=segment", "finetune.train.steps=1"],
    )
    finetune_segment(r, tmp_path / "run", device="cpu", quiet=True)
    used = (tmp_path / "run" / "labels_used.csv").read_text().splitlines()[1:]
    assert len(used) == 4 + 2  # 4 train, 2 test (the 2 val images unused: selection none)
    image, mask, _ = used[0].split(",")
    assert Path(image).name == Path(mask).name and mask.startswith(str(data / "msk"))


def test_the_readme_segmentation_quickstart_runs_as_written(tmp_path, monkeypatch):
    """README's segmentation block, line for line; the data is generated discs, the run kept
    tiny through `BEITDOMAIN_SET` (as README documents), `runs/pre` a 2-step pre-training."""
    import re
    import shlex

    from helpers import PRETRAIN_SETS, REPO, write_tiny_tokenizer

    from beitdomain.engine.pretrain import pretrain

    text = (REPO / "README.md").read_text()
    start = text.index("<!-- quickstart-segment:")
    block = re.search(r"```bash\n(.*?)```", text[start:], re.S)
    assert block is not None
    lines = [ln.split("  #")[0].strip() for ln in block.group(1).splitlines()]
    commands = [ln for ln in lines if ln.startswith("beitdomain ")]
    assert [c.split()[1] for c in commands] == ["finetune", "finetune", "predict"]

    monkeypatch.chdir(tmp_path)
    write_discs(Path("nuclei"), n=20)
    Path("nuclei/new").mkdir()
    for k in range(3):
        Image.open(f"nuclei/img/{k:02d}.png").save(f"nuclei/new/{k}.png")
    r = load_recipe(
        None,
        {"data.root": "nuclei/img", "tokenizer.path": str(write_tiny_tokenizer(Path("tok")))},
        [*PRETRAIN_SETS, "pretrain.train.steps=2"],
    )
    pretrain(r, Path("runs/pre"), device="cpu", quiet=True)
    tiny = [
        "data.num_workers=0",
        "data.image_size=64",  # the pre-training's view
        "data.in_chans=1",
        "model.preset=tiny",
        "finetune.train.steps=4",
        "finetune.train.min_steps=0",
        "finetune.train.batch_size=4",
        "segment.decoder_channels=16",
    ]
    monkeypatch.setenv("BEITDOMAIN_SET", ";".join(tiny))
    for command in commands:
        res = CliRunner().invoke(app, ["--device", "cpu", *shlex.split(command)[1:]])
        assert res.exit_code == 0, f"{command}\n{res.output}"
    for run, init in (("runs/seg-10", "runs/pre/backbone.safetensors"), ("runs/unet-10", "unet")):
        results = json.loads(Path(run, "results.json").read_text())
        assert results["init"] == init and set(results["test"]["dice"]) == {
            "background",
            "nucleus",
        }
        assert Path(run, "contact_sheet.png").is_file()
    assert sorted(p.name for p in Path("masks").iterdir()) == ["0.png", "1.png", "2.png"]


def test_volumes_split_by_file_and_their_slices_train_together(tmp_path):
    nib = pytest.importorskip("nibabel")
    pytest.importorskip("monai")
    rng = np.random.default_rng(0)
    data = tmp_path / "vols"
    data.mkdir()
    xx, yy, zz = np.mgrid[:32, :32, :6]
    rows = ["path,mask,group"]
    for k in range(8):
        c = rng.uniform(10, 22, 3)
        ball = ((xx - c[0]) ** 2 + (yy - c[1]) ** 2 + 4 * (zz - 3) ** 2 < 36).astype(np.uint8)
        scan = (ball * 100 + rng.normal(0, 5, ball.shape)).astype(np.float32)
        nib.save(nib.Nifti1Image(scan, np.eye(4)), data / f"v{k}.nii.gz")
        nib.save(nib.Nifti1Image(ball, np.eye(4)), data / f"v{k}_seg.nii.gz")
        rows.append(f"v{k}.nii.gz,v{k}_seg.nii.gz,patient-{k // 2}")  # two scans a patient
    (data / "labels.csv").write_text("\n".join(rows) + "\n")
    r = _recipe(data, "finetune.train.steps=2", "finetune.labels=50%", "data.val_fraction=0")
    res = finetune_segment(r, tmp_path / "run", device="cpu", quiet=True)
    splits = res["splits"]
    # 4 patients: the test fold holds whole patients; 50% of the rest counts volumes, not slices
    assert splits["test"]["groups"] * 2 == splits["test"]["images"]
    assert splits["test"]["items"] == 6 * splits["test"]["images"]
    assert (
        res["n_labels"] == splits["subset"]["images"]
        and splits["subset"]["items"] == 6 * res["n_labels"]
    )
    assert res["test"]["n_items"] == splits["test"]["items"]

    # predict writes a NIfTI label volume on the input's grid, with its affine
    from beitdomain.engine.segment import predict_masks

    written, skipped = predict_masks(tmp_path / "run", [str(data / "v0.nii.gz")], tmp_path / "p")
    assert written == [tmp_path / "p" / "v0.nii.gz"] and not skipped
    pred = nib.load(str(written[0]))
    assert pred.shape == (32, 32, 6) and np.allclose(pred.affine, np.eye(4))
    assert set(np.unique(np.asarray(pred.dataobj))) <= {0, 1}


def test_label_amounts_count_annotated_images_and_are_nested(tmp_path):
    from beitdomain.data.masks import MaskClasses, segment_data

    data = write_discs(tmp_path / "discs", n=24)
    classes = MaskClasses(("background", "disc"))
    chosen = {}
    for amount in ("10%", "25%", "50%", "5"):
        d = segment_data(_recipe(data, f"finetune.labels={amount}"), classes)
        chosen[amount] = {image for image, _ in d.files["train"]}
        assert d.subset["n_labels"] == len(chosen[amount]) == len(d.train)
    # 24 images: 6 test, 5 val (unused), 13 train
    assert [len(chosen[a]) for a in ("10%", "25%", "50%", "5")] == [1, 3, 7, 5]
    assert chosen["10%"] <= chosen["25%"] <= chosen["5"] <= chosen["50%"]


def test_a_subset_larger_than_asked_is_said(tmp_path, caplog):
    from beitdomain.data.masks import MaskClasses, segment_data

    data = write_discs(tmp_path / "discs", n=24)
    classes = MaskClasses(("background", "disc"))
    with caplog.at_level("WARNING", logger="beitdomain.data.masks"):
        segment_data(_recipe(data, "finetune.labels=10%"), classes)  # 1.3 of 13: one image
    assert "asked 10%, got 7.7% (1 of 13 annotated images)" in caplog.text


def test_ignored_pixels_pass_the_checks_and_count_nowhere(tmp_path):
    data = write_discs(tmp_path / "discs", n=8)
    for k in range(8):  # the top rows unannotated
        mask = np.asarray(Image.open(data / "msk" / f"{k:02d}.png")).copy()
        mask[:4] = 255
        Image.fromarray(mask).save(data / "msk" / f"{k:02d}.png")
    with pytest.raises(MaskError, match=r"values \[255\]"):
        finetune_segment(_recipe(data, "finetune.train.steps=1"), tmp_path / "a", device="cpu")
    r = _recipe(data, "finetune.train.steps=1", "segment.ignore_index=255")
    res = finetune_segment(r, tmp_path / "run", device="cpu", quiet=True)
    assert res["ignore_index"] == 255
    # the test scores count the annotated pixels only: 28 of 32 rows of each test image
    assert res["test"]["n_items"] == 2 and res["test"]["n_pixels"] == 2 * 28 * 32


def test_a_cache_is_refused_rather_than_read_without_masks(tmp_path):
    from beitdomain.user import UserError

    data = write_discs(tmp_path / "discs", n=8)
    with pytest.raises(UserError, match=r"data.cache .* without their masks"):
        finetune_segment(_recipe(data, f"data.cache={tmp_path}"), tmp_path / "r", device="cpu")
    assert not (tmp_path / "r").exists()


def test_a_run_stopped_by_sigterm_resumes_to_the_uninterrupted_weights(tmp_path, monkeypatch):
    import os
    import signal

    from beitdomain.engine import segment
    from beitdomain.engine.train.loop import Interrupted

    data = write_discs(tmp_path / "discs", n=12)
    r = _recipe(
        data,
        "finetune.train.steps=6",
        "finetune.train.deterministic=true",
        "finetune.selection=outside",
        "finetune.train.eval_every=2",
    )
    finetune_segment(r, tmp_path / "whole", device="cpu", quiet=True)
    whole = CheckpointManager(tmp_path / "whole" / "checkpoints").load_latest()[1]["model"]

    step_end = segment.SegmentEvalHook.on_step_end

    def stop_at_4(self, trainer):
        step_end(self, trainer)
        if trainer.state.step == 4:
            os.kill(os.getpid(), signal.SIGTERM)  # as `kill` or a scheduler would

    monkeypatch.setattr(segment.SegmentEvalHook, "on_step_end", stop_at_4)
    run = tmp_path / "run"
    with pytest.raises(Interrupted):
        finetune_segment(r, run, device="cpu", quiet=True)
    assert not (run / "results.json").exists()
    assert json.loads((run / "manifest.json").read_text())["status"] == "interrupted"
    monkeypatch.setattr(segment.SegmentEvalHook, "on_step_end", step_end)
    finetune_segment(r, run, device="cpu", quiet=True, resume=True)
    final = CheckpointManager(run / "checkpoints").load_latest()[1]["model"]
    assert_same_tensors(final, whole, "final weights")
    assert_same_tensors(
        load_tensors(run / "best.safetensors"),
        load_tensors(tmp_path / "whole" / "best.safetensors"),
        "best weights",
    )


def test_the_python_api_fine_tunes_a_segmenter_when_the_recipe_says_segment(tmp_path):
    """`api.finetune` (engine.finetune.finetune) read finetune.task=segment as a classification
    fine-tune of the masks' paths before; it is the segmentation job now, as on the CLI."""
    from beitdomain import api

    data = write_discs(tmp_path / "discs", n=12)
    res = api.finetune(_recipe(data, "finetune.train.steps=6"), tmp_path / "run", quiet=True)
    assert set(res["test"]["dice"]) == {"background", "disc"}
    assert (tmp_path / "run" / "contact_sheet.png").is_file()


def test_pretraining_on_a_masks_csv_reads_its_images_and_leaves_the_test_split_out(tmp_path):
    """A masks CSV (path,mask) was refused by the tokenizer and pre-training ('no label
    column'), and without it every file under the folder, masks and test images included, was
    pre-trained on. Now they read the pairs' images only, without the test split's."""
    from beitdomain.data.masks import recipe_pairs, split_pairs
    from beitdomain.data.unlabeled import unlabeled_dataset

    data = write_discs(tmp_path / "discs", n=16)
    r = _recipe(data)
    pairs = recipe_pairs(r)
    test = {pairs[i].image.resolve() for i in split_pairs(r, pairs)["test"]}
    assert len(test) == 4  # data.test_fraction=0.25 of 16
    train, _, _ = unlabeled_dataset(r, kind="pretrain", progress=False, report_dir=tmp_path)
    seen = {Path(train.source.source(i)[0]).resolve() for i in train.indices}
    assert len(seen) == 12 and not seen & test
    assert all(p.parent.name == "img" for p in seen)  # no mask file is an image to pre-train on
    # the segmentation fine-tune scores on exactly the images pre-training left out
    seg = finetune_segment(r, tmp_path / "ft", quiet=True)
    scored = {(data / p).resolve() for p, _ in _split_rows(tmp_path / "ft", "test")}
    assert scored == test and seg["test"]["n_images"] == 4


def _split_rows(run: Path, split: str) -> list[tuple[str, str]]:
    import csv as _csv

    with open(run / "labels_used.csv", newline="") as f:
        return [(r["path"], r["mask"]) for r in _csv.DictReader(f) if r["split"] == split]
