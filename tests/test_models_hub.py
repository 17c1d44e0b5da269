"""`--init` hub names offline: hf-hub:org/name and timm names from a local cache the test builds."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from helpers import timm_beit_kwargs, tiny_hf_beit_config
from safetensors.torch import save_file

from beitdomain.models.backbone import get_preset
from beitdomain.models.convert import WeightsError
from beitdomain.models.hub import locate_weights as resolve_init
from beitdomain.models.pretrained import build_pretraining_model

CFG = get_preset("tiny", img_size=32)
TIMM_NAME = "beit_base_patch16_224.in22k_ft_in22k_in1k"  # hub repo timm/<this name>


def _cache_repo(home: Path, repo: str, files: dict[str, bytes | Path]) -> Path:
    """A huggingface_hub cache entry as downloads leave it: refs/main -> snapshots/<commit>."""
    base = home / "hub" / f"models--{repo.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = base / "snapshots" / commit
    snap.mkdir(parents=True)
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(commit)
    for name, content in files.items():
        data = content.read_bytes() if isinstance(content, Path) else content
        (snap / name).write_bytes(data)
    return snap


def _tiny_timm(tmp_path: Path) -> tuple[torch.nn.Module, Path]:
    kw = timm_beit_kwargs(CFG.replace(use_shared_rel_pos_bias=False))
    model = timm.create_model("beit_base_patch16_224", num_classes=0, **kw).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return model, path


@pytest.fixture
def offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "hf-home"


def test_timm_name_resolves_from_the_offline_cache(tmp_path, offline):
    model, weights = _tiny_timm(tmp_path)
    config = b'{"architecture": "beit_base_patch16_224", "num_classes": 0, "pretrained_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}}'  # noqa: E501
    _cache_repo(offline, f"timm/{TIMM_NAME}", {"model.safetensors": weights, "config.json": config})
    resolved = resolve_init(TIMM_NAME)
    assert Path(resolved.path).is_dir() and resolved.mean == (0.5, 0.5, 0.5)
    mim, report = build_pretraining_model(CFG, vocab_size=16, init=TIMM_NAME)
    assert report is not None and report.missing_backbone == []
    assert any(TIMM_NAME in n and "resolved to" in n for n in report.notes)
    assert not mim.backbone.rel_pos_bias  # per-block tables that differ: a per-block model
    x01 = torch.rand(2, 3, 32, 32)
    last = dict(indices=1, output_fmt="NLC", intermediates_only=True)
    with torch.no_grad():
        ref = model.forward_intermediates((x01 - 0.5) / 0.5, **last)[0]
        ours = mim.backbone.forward_intermediates(mim.input_norm(x01), **last)[0]
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_hf_hub_name_resolves_from_the_offline_cache(tmp_path, offline):
    config = tiny_hf_beit_config(
        use_shared_relative_position_bias=True, use_mask_token=True, vocab_size=16
    )
    transformers = pytest.importorskip("transformers")
    hf = transformers.BeitForMaskedImageModeling(config).eval()
    hf.save_pretrained(tmp_path / "export")
    proc = transformers.BeitImageProcessor(
        size={"height": 32, "width": 32}, image_mean=[0.4] * 3, image_std=[0.2] * 3
    )
    proc.save_pretrained(tmp_path / "export")
    files = {p.name: p for p in (tmp_path / "export").iterdir()}
    _cache_repo(offline, "someorg/beit-tiny", files)
    mim, report = build_pretraining_model(
        CFG, vocab_size=16, init="hf-hub:someorg/beit-tiny", reuse_lm_head=True
    )
    assert report.format == "hf" and report.missing_backbone == []
    assert report.input["mean"] == pytest.approx([0.4] * 3)
    assert report.input["source"] == "preprocessor_config.json"
    x01 = torch.rand(1, 3, 32, 32)
    mask = torch.zeros(1, 16, dtype=torch.bool)
    mask[0, :5] = True
    with torch.no_grad():
        out = hf(pixel_values=(x01 - 0.4) / 0.2, bool_masked_pos=mask).logits[mask]
        torch.testing.assert_close(mim(x01, mask), out, atol=1e-5, rtol=1e-5)


def test_names_missing_offline_or_unknown_are_clear_errors(offline):
    with pytest.raises(WeightsError, match=r"cannot get someorg/absent from the local cache"):
        resolve_init("hf-hub:someorg/absent")
    with pytest.raises(WeightsError, match="local cache"):
        resolve_init(TIMM_NAME)
    with pytest.raises(WeightsError, match="not a hub name"):
        resolve_init("no_such_model_or_file.pth")
    with pytest.raises(WeightsError, match="expected hf-hub:org/name"):
        resolve_init("hf-hub:justaname")


def test_finetune_init_takes_hub_names(tmp_path, offline):
    from beitdomain.engine.finetune import resolve_init as finetune_init

    _, weights = _tiny_timm(tmp_path)
    snap = _cache_repo(offline, "someorg/beit-ft", {"model.safetensors": weights})
    assert Path(finetune_init("hf-hub:someorg/beit-ft")) == snap
    with pytest.raises(WeightsError, match="local cache"):
        finetune_init("hf-hub:someorg/not-cached")
