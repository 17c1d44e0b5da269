"""ImageDataset: output dicts, masks, labels, and reproducibility across worker counts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from beitdomain.data.cache import build_cache
from beitdomain.data.dataset import ImageDataset, ManifestImages
from beitdomain.data.index import scan
from beitdomain.data.transforms import FinetuneTransform, PretrainTransform


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds") / "data"
    rng = np.random.default_rng(0)
    for label in ("ok", "crack"):
        (root / label).mkdir(parents=True)
        for k in range(6):
            arr = rng.integers(0, 255, (40, 40), dtype=np.uint8)
            Image.fromarray(arr).save(root / label / f"{k}.png")
    return build_cache(scan(root), root.parent / "cache", size=32)


def _mask(rng: np.random.Generator) -> np.ndarray:
    return rng.random((4, 4)) < 0.4  # stands in for BlockMaskGenerator.gen


def _collect(ds: ImageDataset, workers: int) -> dict[str, torch.Tensor]:
    loader = DataLoader(ds, batch_size=4, shuffle=False, num_workers=workers)
    batches = list(loader)
    return {k: torch.cat([b[k] for b in batches]) for k in batches[0]}


def test_pretrain_items(cache):
    ds = ImageDataset(cache, PretrainTransform(32, 16), seed=3, mask_generator=_mask)
    item = ds[0]
    assert item["image"].shape == (1, 32, 32) and item["image"].dtype == torch.float32
    assert item["tok_image"].shape == (1, 16, 16)
    assert item["mask"].shape == (16,) and item["mask"].dtype == torch.bool


def test_same_tensors_for_any_worker_count(cache):
    ds = ImageDataset(cache, PretrainTransform(32, 16), seed=3, mask_generator=_mask)
    ds.set_epoch(2)
    single = _collect(ds, 0)
    multi = _collect(ds, 2)
    for key in single:
        assert torch.equal(single[key], multi[key]), key
    ds.set_epoch(3)
    assert not torch.equal(ds[0]["image"], single["image"][0])
    ds.set_epoch(2)
    assert torch.equal(ds[0]["image"], single["image"][0])


def test_persistent_workers_see_each_epoch(cache):
    """The loader's workers live for the whole run; the epoch travels with each index, so each
    epoch's items through two long-lived workers are that epoch's augmentations."""
    import pickle

    from beitdomain.data.sampler import EpochIndex
    from beitdomain.engine.train.plan import build_loader

    i = EpochIndex(5, epoch=3)
    assert i == 5 and pickle.loads(pickle.dumps(i)).epoch == 3
    ds = ImageDataset(cache, PretrainTransform(32, 16), seed=3, mask_generator=_mask)
    reference = ImageDataset(cache, PretrainTransform(32, 16), seed=3, mask_generator=_mask)
    loader = build_loader(ds, 4, seed=1, num_workers=2)
    assert loader.persistent_workers
    for epoch in range(3):
        loader.batch_sampler.set_epoch(epoch)  # what Trainer does; the workers' ds stays at 0
        got = torch.cat([b["image"] for b in loader])
        reference.set_epoch(epoch)
        order = loader.batch_sampler.epoch_indices(epoch)[: len(got)]
        want = torch.stack([reference[k]["image"] for k in order])
        assert torch.equal(got, want), epoch


def test_subset_keeps_item_augmentation(cache):
    full = ImageDataset(cache, PretrainTransform(32, 16), seed=1)
    sub = ImageDataset(cache, PretrainTransform(32, 16), seed=1, indices=[5, 9])
    assert torch.equal(sub[1]["image"], full[9]["image"])


def test_finetune_items_and_labels(cache):
    ds = ImageDataset(cache, FinetuneTransform(train=True, image_size=24), seed=0)
    assert ds.classes == ["crack", "ok"]
    item = ds[7]
    assert item["image"].shape == (1, 24, 24)
    assert item["label"].dtype == torch.int64 and int(item["label"]) == 1  # 'ok' files last
    assert int(item["index"]) == 7
    with pytest.raises(KeyError, match="not one of the classes"):
        ImageDataset(cache, FinetuneTransform(train=False, image_size=24), classes=["a"])[0]


def test_manifest_source_matches_files(cache):
    manifest = scan(Path(cache.root))
    src = ManifestImages(manifest)
    assert len(src) == len(cache)
    ds = ImageDataset(manifest, FinetuneTransform(train=False, image_size=24))
    item = ds[0]
    assert item["image"].shape == (1, 24, 24) and int(item["label"]) == 0
