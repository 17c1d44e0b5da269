"""Official BEiT layouts in and out, checked against timm and transformers with their own
preprocessing: random weights in each layout give beitdomain the same features on the same image
(fp32, 1e-5), and beitdomain's exports load in both libraries with the right input convention."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from helpers import TIMM_TOKENS, randomize, timm_beit, tiny_hf_beit_config
from PIL import Image
from safetensors.torch import save_file
from timm.data import create_transform, resolve_data_config
from torchvision import transforms as T

from beitdomain.models.backbone import get_preset
from beitdomain.models.classifier import BeitClassifier
from beitdomain.models.convert import WeightsError, load_backbone_weights
from beitdomain.models.export import export_hf, export_timm
from beitdomain.models.mim import BeitMIM

CFG = get_preset("tiny", img_size=32)  # 4x4 grid of 8 px patches, width 64, 2 blocks
TOL = dict(atol=1e-5, rtol=1e-5)
PER_BLOCK = CFG.replace(use_shared_rel_pos_bias=False)

pytestmark = pytest.mark.usefixtures("one_thread")


def _image(c: int = 3, side: int = 40) -> np.ndarray:
    arr = (np.random.RandomState(0).rand(side, side, c) * 255).astype(np.uint8)
    return arr


def _pil(arr: np.ndarray) -> Image.Image:
    return Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)


def _timm_inputs(model: torch.nn.Module, arr: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """timm's own transform (its data config), and the same transform minus Normalize."""
    config = resolve_data_config(model=model)
    config["input_size"] = (arr.shape[-1], 32, 32)  # a tiny model of a 224 px architecture
    tf = create_transform(**config)
    assert isinstance(tf.transforms[-1], T.Normalize)
    img = _pil(arr)
    return tf(img).unsqueeze(0), T.Compose(tf.transforms[:-1])(img).unsqueeze(0)


def _classifier(cfg=CFG, shared: bool = False) -> BeitClassifier:  # type: ignore[no-untyped-def]
    return BeitClassifier.from_config(cfg.replace(use_shared_rel_pos_bias=shared), 5).eval()


# ------------------------------------------------------------------------- official layouts in


def test_timm_safetensors_equals_timm_with_its_preprocessing(tmp_path: Path) -> None:
    ref = timm_beit(PER_BLOCK, 1)
    assert ref.pretrained_cfg["mean"] == (0.5, 0.5, 0.5)  # timm's own convention for BEiT
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, tmp_path / "m.safetensors")
    ours = _classifier()
    report = load_backbone_weights(ours, tmp_path / "m.safetensors")
    assert report.input["mean"] == [0.5] * 3 and "official" in report.input["source"]
    x, x01 = _timm_inputs(ref, _image())
    with torch.no_grad():
        torch.testing.assert_close(ours.forward_features(x01), ref(x), **TOL)


def test_unilm_pth_equals_timm_shared_bias_model(tmp_path: Path) -> None:
    # unilm's pre-training checkpoint: timm keys with one shared table, lm_head, mask_token.
    ref = timm_beit(CFG, 2, **TIMM_TOKENS)
    state = dict(ref.state_dict())
    state |= {
        "mask_token": torch.randn(1, 1, 64),
        "lm_head.weight": torch.randn(24, 64),
        "lm_head.bias": torch.randn(24),
    }
    state["rel_pos_bias.relative_position_index"] = torch.zeros(17, 17, dtype=torch.long)
    torch.save({"model": state}, tmp_path / "beit_pt.pth")
    ours = BeitMIM.from_config(CFG, vocab_size=24).eval()
    report = load_backbone_weights(ours, tmp_path / "beit_pt.pth")
    assert report.format == "unilm" and report.missing == [] and report.unexpected == []
    x, x01 = _timm_inputs(ref, _image())
    with torch.no_grad():
        torch.testing.assert_close(ours.encode(x01), ref.forward_features(x), **TOL)


def _hf_folder(folder: Path, shared: bool, processor: bool = True):  # type: ignore[no-untyped-def]
    config = tiny_hf_beit_config(
        layer_scale_init_value=0.1,
        use_shared_relative_position_bias=shared,
        use_relative_position_bias=not shared,
        use_mean_pooling=True,
        hidden_act="gelu",
    )
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(3)
    model = transformers.BeitModel(config).eval()
    randomize(model, 3)
    model.save_pretrained(folder)
    proc = transformers.BeitImageProcessor(size={"height": 32, "width": 32}, do_center_crop=False)
    if processor:  # microsoft/beit-* ship one with image_mean = image_std = 0.5
        proc.save_pretrained(folder)
    return model, proc


@pytest.mark.parametrize("shared", [True, False])
def test_hf_folder_equals_transformers_with_its_processor(tmp_path: Path, shared: bool) -> None:
    hf, proc = _hf_folder(tmp_path / "hf", shared)
    ours = _classifier(shared=shared)
    report = load_backbone_weights(ours, tmp_path / "hf")
    assert report.input["source"] == "preprocessor_config.json"
    arr = _image()
    pv = proc(images=arr, return_tensors="pt")["pixel_values"]
    x01 = proc(images=arr, return_tensors="pt", do_normalize=False)["pixel_values"]
    with torch.no_grad():
        torch.testing.assert_close(
            ours.forward_features(x01), hf(pixel_values=pv).pooler_output, **TOL
        )


def test_caller_states_the_convention_of_a_file_that_does_not(tmp_path: Path) -> None:
    ref = timm_beit(PER_BLOCK, 4)
    imagenet = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # e.g. BEiT v2
    ours = _classifier()
    report = load_backbone_weights(
        ours, ref.state_dict(), source_mean=imagenet[0], source_std=imagenet[1]
    )
    assert report.input["mean"] == pytest.approx(list(imagenet[0]))
    x01 = torch.rand(2, 3, 32, 32)
    norm = (x01 - torch.tensor(imagenet[0]).view(3, 1, 1)) / torch.tensor(imagenet[1]).view(3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(ours.forward_features(x01), ref(norm), **TOL)
    # ... and the exact 1-channel version of it sees gray images as the RGB model does.
    gray = _classifier(CFG.replace(in_chans=1))
    report = load_backbone_weights(
        gray, ref.state_dict(), source_mean=imagenet[0], source_std=imagenet[1]
    )
    assert "1/std-weighted" in report.reshaped[0]
    g01 = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            gray.forward_features(g01), ours.forward_features(g01.expand(-1, 3, -1, -1)), **TOL
        )
    with pytest.raises(WeightsError, match="mean has 2 values"):
        load_backbone_weights(ours, ref.state_dict(), source_mean=(0.1, 0.2))


# ---------------------------------------------------------------- per-block relative positions


def test_per_block_tables_continue_pretraining_or_merge_exactly(tmp_path: Path) -> None:
    ref = timm_beit(PER_BLOCK, 5, **TIMM_TOKENS)
    x01 = torch.rand(2, 3, 32, 32)
    # A MIM model with one table per block continues from it as is.
    mim = BeitMIM.from_config(PER_BLOCK, vocab_size=24).eval()
    report = load_backbone_weights(mim, ref.state_dict())
    assert report.missing_backbone == []
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, :6] = True
    assert mim(x01, mask).shape == (12, 24)
    with torch.no_grad():
        torch.testing.assert_close(mim.encode(x01), ref.forward_features((x01 - 0.5) / 0.5), **TOL)
    # Equal tables merge exactly into a shared one; different ones are refused with the fix.
    with pytest.raises(WeightsError, match="model.rel_pos_bias=per_block"):
        load_backbone_weights(BeitMIM.from_config(CFG, vocab_size=24), ref.state_dict())
    state = dict(ref.state_dict())
    table = state["blocks.0.attn.relative_position_bias_table"]
    state["blocks.1.attn.relative_position_bias_table"] = table.clone()
    shared = BeitMIM.from_config(CFG, vocab_size=24).eval()
    report = load_backbone_weights(shared, state)
    assert any("merged exactly" in n for n in report.notes)
    ref.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(
            shared.encode(x01), ref.forward_features((x01 - 0.5) / 0.5), **TOL
        )


# ----------------------------------------------------------------------------------- exports


def _official_mim(in_chans: int, tmp_path: Path) -> BeitMIM:
    """A MIM model started from a random unilm-layout checkpoint (official convention)."""
    src = BeitMIM.from_config(CFG, vocab_size=24)
    randomize(src, 6)
    state = {
        k.removeprefix("backbone."): v
        for k, v in src.state_dict().items()
        if not k.startswith("input_norm.")
    }
    mim = BeitMIM.from_config(CFG.replace(in_chans=in_chans), vocab_size=24).eval()
    load_backbone_weights(mim, state)
    return mim


@pytest.mark.parametrize("in_chans", [3, 1])
def test_timm_export_loads_with_create_model_alone(tmp_path: Path, in_chans: int) -> None:
    mim = _official_mim(in_chans, tmp_path)
    folder = export_timm(mim, tmp_path / "timm")
    model = timm.create_model(
        f"local-dir:{folder}", pretrained=True, pretrained_cfg_overlay=dict(file=str(folder))
    ).eval()
    cfg = model.pretrained_cfg
    assert cfg["input_size"] == (in_chans, 32, 32) and cfg["num_classes"] == 0
    assert list(cfg["mean"]) == [0.5] * in_chans and list(cfg["std"]) == [0.5] * in_chans
    assert model.num_classes == 0 and model.patch_embed.proj.in_channels == in_chans
    tf = create_transform(**resolve_data_config(model=model))
    img = _pil(_image(in_chans))
    x, x01 = tf(img).unsqueeze(0), T.Compose(tf.transforms[:-1])(img).unsqueeze(0)
    ours = _classifier(CFG.replace(in_chans=in_chans))
    report = load_backbone_weights(ours, folder)
    assert report.input["mean"] == [0.5] * in_chans
    with torch.no_grad():
        torch.testing.assert_close(ours.forward_features(x01), model(x), **TOL)
        # the MIM model's own last block output: the export is the same network
        last = dict(indices=1, output_fmt="NLC", intermediates_only=True)
        torch.testing.assert_close(
            model.forward_intermediates(x, **last)[0],
            mim.backbone.forward_intermediates(mim.input_norm(x01), **last)[0],
            **TOL,
        )


@pytest.mark.parametrize("in_chans", [3, 1])
def test_hf_export_loads_with_from_pretrained(tmp_path: Path, in_chans: int) -> None:
    transformers = pytest.importorskip("transformers")
    mim = _official_mim(in_chans, tmp_path)
    folder = export_hf(mim, tmp_path / "hf")
    hf = transformers.BeitModel.from_pretrained(folder).eval()
    proc = transformers.AutoImageProcessor.from_pretrained(folder)
    assert list(proc.image_mean) == [0.5] * in_chans and hf.config.num_channels == in_chans
    arr = _image(in_chans)
    kw = dict(return_tensors="pt", input_data_format="channels_last")
    pv = proc(images=arr, **kw)["pixel_values"]
    x01 = proc(images=arr, do_normalize=False, **kw)["pixel_values"]
    assert pv.shape == (1, in_chans, 32, 32)
    ours = _classifier(CFG.replace(in_chans=in_chans))
    load_backbone_weights(ours, folder)
    with torch.no_grad():
        torch.testing.assert_close(
            ours.forward_features(x01), hf(pixel_values=pv).pooler_output, **TOL
        )


@pytest.mark.parametrize("fmt", ["timm", "hf"])
def test_an_export_never_replaces_a_config_json_it_did_not_write(tmp_path: Path, fmt: str) -> None:
    # 'pretrain export --out app' replaced a web app's config.json.
    from beitdomain.user import UserError

    if fmt == "hf":
        pytest.importorskip("transformers")
    export = export_timm if fmt == "timm" else export_hf
    mim = _official_mim(1, tmp_path)
    app = tmp_path / "app"
    app.mkdir()
    (app / "config.json").write_text('{"name": "web app"}')
    with pytest.raises(UserError, match="config.json already there"):
        export(mim, app)
    assert (app / "config.json").read_text() == '{"name": "web app"}'
    assert sorted(p.name for p in app.iterdir()) == ["config.json"]
    folder = export(mim, tmp_path / "ours")
    export(mim, folder)  # its own export: replaced without a word
    assert json.loads((folder / "config.json").read_text())[
        "num_features" if fmt == "timm" else "hidden_size"
    ]
