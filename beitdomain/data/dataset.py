"""``ImageDataset``: a source of images + a transform -> dicts of tensors, reproducibly.

A *source* is anything with ``__len__``, ``__getitem__(i) -> [C, H, W]`` and ``label(i)``:
``CachedImages`` (decoded once; the fast path for training) or ``ManifestImages`` (decodes
files on every access; fine for small sets and evaluation).

Randomness: item ``i`` in epoch ``e`` uses ``np.random.default_rng([seed, e, i])`` (``i`` is the
index in the source, so subsets keep their items' augmentations). Results are therefore the
same with 0, 2 or 16 loader workers and after a resume. The epoch comes with each index from
``ResumableBatchSampler`` (an ``EpochIndex``), so persistent loader workers see it; a plain int
index uses the epoch ``set_epoch`` selected.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from beitdomain.data.index import Manifest
from beitdomain.io import IntensitySpec, kept_frames, load_image

# Decoded multi-frame files kept per process (bytes of float32), so the frames of one file are
# decoded once per use, not once per frame. A 176-frame 256 x 256 MR is 46 MB.
DECODED_BUDGET = 512 * 2**20


class ManifestImages:
    """Reads images straight from the files of a manifest (no cache).

    Multi-frame files and volumes contribute one item per kept frame (``spec.frames``, and
    ``spec.slice_axis`` for volumes). A multi-frame file is decoded once and its normalized
    frames kept in a per-process LRU of ``budget`` bytes, so reading all its frames costs one
    decode (a 176-frame Enhanced MR was decoded 176 times per epoch before).
    """

    def __init__(
        self, manifest: Manifest, spec: IntensitySpec | None = None, budget: int = DECODED_BUDGET
    ) -> None:
        self.manifest = manifest
        self.spec = spec or IntensitySpec()
        self.budget = int(budget)
        self.items: list[tuple[int, int]] = []  # (entry index, position among the kept frames)
        for k, e in enumerate(manifest.entries):
            n = len(kept_frames(e.shape, e.reader, self.spec))
            self.items.extend((k, f) for f in range(n))
        self._decoded: OrderedDict[int, np.ndarray] = OrderedDict()
        self.decodes = 0  # files decoded so far in this process (tests, benchmarks)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_decoded"] = OrderedDict()  # each loader worker fills its own
        return state

    def __len__(self) -> int:
        return len(self.items)

    def _load(self, k: int) -> np.ndarray:
        if k in self._decoded:
            self._decoded.move_to_end(k)
            return self._decoded[k]
        image, _ = load_image(self.manifest.abspath(self.manifest.entries[k]), self.spec)
        self.decodes += 1
        if image.ndim == 4 and image.shape[0] > 1 and image.nbytes <= self.budget:
            self._decoded[k] = image
            while sum(a.nbytes for a in self._decoded.values()) > self.budget:
                self._decoded.popitem(last=False)
        return image

    def __getitem__(self, i: int) -> np.ndarray:
        k, frame = self.items[i]
        image = self._load(k)
        # A copy: a user's augmentation may write into its input, and the LRU must stay intact.
        return image[frame].copy() if image.ndim == 4 else image

    def label(self, i: int) -> str | None:
        return self.manifest.entries[self.items[i][0]].label

    def source(self, i: int) -> tuple[str, int]:
        k, frame = self.items[i]
        return self.manifest.entries[k].path, frame

    def group(self, i: int) -> str | None:
        return self.manifest.entries[self.items[i][0]].group

    @property
    def labels(self) -> list[str | None]:
        return [self.manifest.entries[k].label for k, _ in self.items]

    @property
    def classes(self) -> list[str]:
        return self.manifest.classes


class ImageDataset(Dataset):
    """Images through a transform, as dicts of tensors.

    Pre-training (the transform returns two views): ``{'image': [C, H, W] float32,
    'tok_image': [C, h, w] float32}`` plus ``'mask': [gh * gw] bool`` (True = masked) when a
    ``mask_generator`` is given. Fine-tuning (one view): ``{'image', 'label': int64 (-1 when
    unlabelled), 'index': int64}``.

    Args:
        source: ``CachedImages``, ``ManifestImages`` or a ``Manifest`` (wrapped with ``spec``).
        transform: ``PretrainTransform`` / ``FinetuneTransform`` or any
            ``(image, rng) -> view | (view, tok_view)``.
        seed: Base seed of the per-item random generators.
        mask_generator: ``gen(rng) -> bool [gh, gw]``, e.g. ``BlockMaskGenerator.gen``.
        indices: Use only these source indices (a split or label fraction).
        classes: Class names defining label indices; default: the source's sorted labels.
        spec: Intensity spec when ``source`` is a Manifest.
    """

    def __init__(
        self,
        source: Any,
        transform: Callable[[np.ndarray, np.random.Generator], Any],
        seed: int = 0,
        mask_generator: Callable[[np.random.Generator], np.ndarray] | None = None,
        indices: Sequence[int] | None = None,
        classes: Sequence[str] | None = None,
        spec: IntensitySpec | None = None,
    ) -> None:
        self.source = ManifestImages(source, spec) if isinstance(source, Manifest) else source
        self.transform = transform
        self.seed = int(seed)
        self.mask_generator = mask_generator
        self.indices = np.arange(len(self.source)) if indices is None else np.asarray(indices)
        self.classes = list(classes) if classes is not None else list(self.source.classes)
        self._class_index = {c: k for k, c in enumerate(self.classes)}
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Selects the epoch whose augmentations ``__getitem__`` produces."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.indices)

    def epoch_of(self, i: int) -> int:
        """The epoch of position ``i``: the one it carries (``sampler.EpochIndex``), else the
        one ``set_epoch`` selected."""
        return int(getattr(i, "epoch", self.epoch))

    def rng(self, i: int) -> np.random.Generator:
        """The generator for dataset position ``i`` in its epoch."""
        return np.random.default_rng([self.seed, self.epoch_of(i), int(self.indices[i])])

    def label_index(self, label: str | None) -> int:
        if label is None:
            return -1
        try:
            return self._class_index[label]
        except KeyError:
            raise KeyError(f"label {label!r} is not one of the classes {self.classes}") from None

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        src = int(self.indices[i])
        image = self.source[src]
        rng = self.rng(i)
        out = self.transform(image, rng)
        if isinstance(out, tuple):
            view, tok = out
            item = {"image": torch.from_numpy(view), "tok_image": torch.from_numpy(tok)}
            if self.mask_generator is not None:
                # Own stream, so changing the mask settings leaves the crops unchanged.
                mask_rng = np.random.default_rng([self.seed, self.epoch_of(i), src, 1])
                mask = np.asarray(self.mask_generator(mask_rng), dtype=bool)
                item["mask"] = torch.from_numpy(mask.reshape(-1))  # [gh * gw], True = masked
            return item
        return {
            "image": torch.from_numpy(out),
            "label": torch.tensor(self.label_index(self.source.label(src)), dtype=torch.int64),
            "index": torch.tensor(src, dtype=torch.int64),
        }
