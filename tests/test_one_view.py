"""One evaluation view: `embed`, timm's transform of the timm export and the HF export's image
processor see a non-square image alike (shorter side resized, centred square cut, not squashed),
so the three give the same features."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from helpers import randomize
from PIL import Image
from timm.data import create_transform, resolve_data_config

from beitdomain.engine.represent import load_backbone
from beitdomain.models.backbone import get_preset
from beitdomain.models.export import export_hf, export_timm
from beitdomain.models.mim import BeitMIM
from beitdomain.view import EvalView

pytestmark = pytest.mark.usefixtures("one_thread")


def test_embed_timm_and_hf_exports_give_the_same_features_on_a_non_square_image(
    tmp_path: Path,
) -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    mim = BeitMIM.from_config(get_preset("tiny", img_size=32), vocab_size=24).eval()
    randomize(mim, 3)
    mim.input_norm.set(0.5, 0.25)
    # 37 x 50: the shorter side is already the view's (round(32 / 0.875) = 37), so no resampler
    # is involved and the three must agree to float precision; a squash (HF) or another crop
    # (timm at crop_pct 1.0) moves the features by far more.
    side = EvalView(32).resize_side
    arr = (np.random.RandomState(0).rand(side, 50, 3) * 255).astype(np.uint8)

    folder = export_timm(mim, tmp_path / "timm")
    bb = load_backbone(folder / "model.safetensors")
    ours = bb.embed(arr.astype(np.float32) / 255)

    model = timm.create_model(
        f"local-dir:{folder}", pretrained=True, pretrained_cfg_overlay=dict(file=str(folder))
    ).eval()
    tf = create_transform(**resolve_data_config(model=model))
    with torch.no_grad():
        via_timm = model(tf(Image.fromarray(arr)).unsqueeze(0)).numpy()

    hf_folder = export_hf(mim, tmp_path / "hf")
    hf = transformers.BeitModel.from_pretrained(hf_folder).eval()
    proc = transformers.AutoImageProcessor.from_pretrained(hf_folder)
    pv = proc(images=arr, return_tensors="pt", input_data_format="channels_last")["pixel_values"]
    with torch.no_grad():
        via_hf = hf(pixel_values=pv).pooler_output.numpy()

    assert ours.shape == via_timm.shape == via_hf.shape == (1, 64)
    np.testing.assert_allclose(via_timm, ours, atol=1e-4, rtol=0)
    np.testing.assert_allclose(via_hf, ours, atol=1e-4, rtol=0)


@pytest.mark.parametrize("size", [32, 64, 96, 224])
def test_timm_floors_the_written_crop_pct_onto_the_views_shorter_side(size: int) -> None:
    import math

    view = EvalView(size)
    assert math.floor(size / view.timm_cfg()["crop_pct"]) == view.resize_side
    assert view.hf_processor_kwargs()["size"] == {"shortest_edge": view.resize_side}
