"""One input-convention reader (`models.convention.read_convention`) for loading weights and for
`load_backbone`, and `FrozenBackbone` normalizing with the models' own `InputNorm`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from beitdomain.engine.represent import FrozenBackbone, load_backbone, random_like
from beitdomain.io import IntensitySpec
from beitdomain.models.backbone import create_backbone, get_preset
from beitdomain.models.classifier import BeitClassifier
from beitdomain.models.convention import (
    INPUT_META,
    ConventionError,
    InputConvention,
    InputNorm,
    read_convention,
)
from beitdomain.models.convert import WeightsError, load_backbone_weights
from beitdomain.models.export import export_timm_backbone
from beitdomain.models.mim import BeitMIM
from beitdomain.models.probe import pooled_features
from beitdomain.user import UserError

CFG = get_preset("tiny", img_size=32, patch_size=8, in_chans=1, embed_dim=16, depth=1)


def _export(tmp_path: Path, mean: float, std: float) -> Path:
    torch.manual_seed(0)
    mim = BeitMIM.from_config(CFG, vocab_size=16)
    mim.input_norm.set(mean, std)
    path = tmp_path / "backbone.safetensors"
    export_timm_backbone(mim, path)
    return path


def _rewrite_metadata(path: Path, **changes: str | None) -> None:
    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no iter)
    for k, v in changes.items():
        meta.pop(k, None) if v is None else meta.__setitem__(k, v)
    save_file(tensors, str(path), metadata=meta)


def test_loading_and_embedding_read_the_same_convention(tmp_path):
    path = _export(tmp_path, 0.25, 2.0)
    conv, where = read_convention(path, in_chans=1, input_size=32)
    assert (conv.mean, conv.std) == ((0.25,), (2.0,)) and "beitdomain metadata" in where
    bb = load_backbone(path)
    model = BeitClassifier.from_config(CFG, 2)
    load_backbone_weights(model, path)
    assert (bb.mean, bb.std) == model.input_norm.values() == (conv.mean, conv.std)

    # An export written before the convention was recorded: [0, 1] as is, for both.
    _rewrite_metadata(path, **{INPUT_META: None})
    bb = load_backbone(path)
    model = BeitClassifier.from_config(CFG, 2)
    load_backbone_weights(model, path)
    assert (bb.mean, bb.std) == model.input_norm.values() == ((0.0,), (1.0,))


def test_an_unreadable_record_is_one_user_error_for_both(tmp_path):
    path = _export(tmp_path, 0.5, 0.5)
    _rewrite_metadata(path, **{INPUT_META: "{not json"})
    with pytest.raises(ConventionError, match=f"{INPUT_META} is not valid JSON"):
        load_backbone(path)
    with pytest.raises(WeightsError, match=f"{INPUT_META} is not valid JSON"):
        load_backbone_weights(BeitClassifier.from_config(CFG, 2), path)
    assert issubclass(ConventionError, UserError)


def test_the_readers_order_of_sources(tmp_path):
    state = {"input_norm.mean": torch.tensor([0.1]), "input_norm.std": torch.tensor([0.2])}
    conv, where = read_convention(state, state=state, fmt="timm", in_chans=1)
    assert conv.mean == pytest.approx((0.1,)) and where == "checkpoint"
    conv, where = read_convention(state, state=state, in_chans=1, mean=0.3)  # caller wins
    assert conv.mean == (0.3,) and conv.std == pytest.approx((0.2,)) and "caller" in where
    assert read_convention({}, fmt="beitdomain", in_chans=3)[0] == InputConvention.identity(3, 224)
    assert read_convention({}, fmt="unilm", in_chans=3)[0] == InputConvention.official(3, 224)

    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": [0.4], "image_std": [0.3], "do_normalize": True})
    )
    (hf / "config.json").write_text(json.dumps({"pretrained_cfg": {"mean": [0.9], "std": [0.9]}}))
    conv, where = read_convention(hf, fmt="hf", in_chans=1)
    assert (conv.mean, conv.std, where) == ((0.4,), (0.3,), "preprocessor_config.json")
    (hf / "preprocessor_config.json").unlink()
    conv, where = read_convention(hf, fmt="hf", in_chans=1)
    assert conv.mean == (0.9,) and "pretrained_cfg" in where
    with pytest.raises(ConventionError, match="mean has 2 values"):
        read_convention(hf, fmt="hf", in_chans=1, mean=(0.1, 0.2))


def test_frozen_backbone_normalizes_with_input_norm(tmp_path):
    bb = load_backbone(_export(tmp_path, 0.5, 0.25))
    assert isinstance(bb.input_norm, InputNorm)
    assert bb.input_norm.values() == ((0.5,), (0.25,))
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(bb.features(x), pooled_features(bb.model, (x - 0.5) / 0.25))
        # a random backbone of the same shape keeps the convention, on its own InputNorm
        rnd = random_like(bb, seed=1)
        assert rnd.input_norm is not bb.input_norm
        assert rnd.input_norm.values() == bb.input_norm.values()
        torch.testing.assert_close(rnd.features(x), pooled_features(rnd.model, (x - 0.5) / 0.25))
    # no convention given: [0, 1] images go in as they are
    plain = FrozenBackbone(
        create_backbone(CFG, final_norm="tokens").eval(), IntensitySpec(), 32, "test"
    )
    with torch.no_grad():
        torch.testing.assert_close(plain.features(x), pooled_features(plain.model, x))
