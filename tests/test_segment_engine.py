"""The segmentation engine's pieces (issue 38): the loss, the models, the init loader, stardist's
instance mask. The job itself: tests/test_segment_job.py."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from beitdomain.data.masks import MaskClasses, MaskError, MaskPair, load_pair, read_mask
from beitdomain.engine.segment import build_segmenter, segment_loss
from beitdomain.io import IntensitySpec
from beitdomain.models.backbone import get_preset

# Tiny models on a shared 2-core machine: one torch thread (conftest), no spin-waiting.
pytestmark = pytest.mark.usefixtures("one_thread")

DISCS = MaskClasses(("background", "disc"))
TINY32 = get_preset("tiny", img_size=32, in_chans=1)


def test_ignored_pixels_count_in_no_loss_term():
    logits = torch.randn(2, 3, 8, 8)
    target = torch.randint(0, 3, (2, 8, 8))
    target[:, :4] = 255
    other = target.clone()
    other[:, :4] = 7  # what lies under the ignore index does not matter...
    other = other.where(other != 7, torch.tensor(255))
    assert torch.equal(segment_loss(logits, target, 255), segment_loss(logits, other, 255))
    changed = target.clone()
    changed[:, 6] = (changed[:, 6] + 1) % 3  # ...but annotated pixels do
    assert not torch.equal(segment_loss(logits, target, 255), segment_loss(logits, changed, 255))


def test_an_init_file_loads_into_the_beit_segmenter_through_the_one_init_loader(tmp_path):
    from helpers import timm_beit
    from safetensors.torch import save_file

    from beitdomain.config import load_recipe
    from beitdomain.engine.build import load_init, resolve_init

    official = timm_beit(TINY32.replace(use_shared_rel_pos_bias=False), seed=3)
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in official.state_dict().items()}, path)
    model = build_segmenter("beit", TINY32, DISCS)
    recipe = load_recipe(None, {}, ["data.in_chans=1"])
    report = load_init(model, resolve_init(str(path)), recipe)
    assert report is not None
    want = official.state_dict()["blocks.1.mlp.fc2.weight"]
    assert torch.equal(model.backbone.blocks[1].mlp.fc2.weight, want)


def test_the_unet_is_monai_s():
    from monai.networks.nets import UNet

    model = build_segmenter("unet", TINY32, DISCS)
    assert isinstance(model, UNet)
    assert model(torch.zeros(2, 1, 32, 32)).shape == (2, 2, 32, 32)


def _stardist_images() -> Path | None:
    spec = importlib.util.find_spec("stardist")  # found without importing it (TensorFlow)
    if spec is None or spec.origin is None:
        return None
    folder = Path(spec.origin).parent / "data" / "images"
    return folder if (folder / "img2d.tif").is_file() else None


def test_stardist_s_instance_mask_is_refused_naming_both_files():
    folder = _stardist_images()
    if folder is None:
        pytest.skip("stardist is not installed (pip install stardist: its bundled img2d.tif)")
    pair = MaskPair(folder / "img2d.tif", folder / "mask2d.tif")
    nuclei = MaskClasses(("background", "nucleus"))
    # the bundled mask is an instance mask (one value per nucleus): refused as it stands
    with pytest.raises(MaskError, match=r"mask2d.tif \(of image .*img2d.tif\) holds values"):
        load_pair(pair, IntensitySpec(), nuclei)
    image, _ = load_pair(pair, IntensitySpec(), MaskClasses(tuple(map(str, range(256)))))
    assert image.shape == (1, 1, 512, 512)
    assert read_mask(pair.mask).max() > 1  # (the job test makes it binary and trains on it)
