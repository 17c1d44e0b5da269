"""Patch masks for masked image modeling: BEiT blockwise masking and uniform random masking.

Every generator takes an explicit `numpy.random.Generator`, so a data loader that seeds one per
sample (e.g. from `(seed, epoch, index)`) produces the same masks after a resume.

Masks are `[gh, gw]` bool arrays, True = masked, with *exactly* `num_masking` True entries.
Blocks are drawn as BEiT's generator (unilm `masking_generator.py`) draws them: each block's
target area is uniform between the minimum block and the *remaining* budget, its aspect
log-uniform, up to 10 placements per block. unilm stops short of the requested count when no
block fits; here the remaining few patches are filled next to the mask instead, so the count is
always exact (constant-size batches of masked tokens, comparable losses across runs).
`tests/test_masking.py` compares blocks per mask, connected regions and per-position frequency
with a re-implementation of unilm's generator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

# BEiT at 224 px / patch 16 (14 x 14 = 196 patches) uses blocks of at least 16 patches.
_REFERENCE_PATCHES = 196
_REFERENCE_MIN_BLOCK = 16
_SMALLEST_MIN_BLOCK = 4


def _as_grid(grid: tuple[int, int] | int) -> tuple[int, int]:
    if isinstance(grid, int):
        grid = (grid, grid)
    gh, gw = (int(g) for g in grid)
    if gh < 1 or gw < 1:
        raise ValueError(f"mask grid must be positive, got {grid!r}")
    return gh, gw


def _check_count(grid: tuple[int, int], num_masking: int) -> int:
    total = grid[0] * grid[1]
    if not 0 <= num_masking <= total:
        raise ValueError(
            f"num_masking={num_masking} is not possible on a {grid[0]}x{grid[1]} grid; "
            f"use a value in [0, {total}]"
        )
    return int(num_masking)


def default_min_block(grid: tuple[int, int] | int, num_masking: int | None = None) -> int:
    """Smallest block size (in patches) for blockwise masking on `grid`.

    Rule: BEiT's 16 patches at 14 x 14, scaled with the grid area so a block covers the same
    fraction of the image (`round(16 * gh * gw / 196)`), never below 4 so tiny grids still get
    blocks rather than single patches, and never above `num_masking` (a block larger than the
    whole budget could not be placed). Examples: 8x8 -> 5, 14x14 -> 16, 28x28 -> 64, 4x4 -> 4.

    Args:
        grid: patch grid `(gh, gw)`.
        num_masking: masked-patch budget; caps the result when given.

    Returns:
        The minimum number of patches of one block (at least 1).
    """
    gh, gw = _as_grid(grid)
    scaled = round(_REFERENCE_MIN_BLOCK * gh * gw / _REFERENCE_PATCHES)
    value = max(_SMALLEST_MIN_BLOCK, scaled)
    if num_masking is not None:
        value = min(value, max(1, num_masking))
    return value


@dataclass
class BlockMaskGenerator:
    """BEiT blockwise masking with an exact masked count.

    Blocks are added until `num_masking` patches are masked, as in unilm: a block's target area
    is uniform in `[min_num_patches, min(remaining, max_num_patches)]` (so late blocks are
    smaller), its aspect ratio h / w log-uniform in `[min_aspect, max_aspect]`, its sides the
    rounded `sqrt(area * aspect)` and `sqrt(area / aspect)`, strictly smaller than the grid. A
    placement is accepted if it adds between 1 and the remaining budget of new patches (overlap
    allowed); the first of `max_attempts` acceptable placements is taken. When none is (unilm
    stops there, short of the count), the rest is filled with random unmasked patches that
    border the mask, so the masked area stays blob-shaped instead of sprinkling isolated
    patches (an isolated masked patch is easy to infer from its neighbours).

    Args:
        grid: patch grid `(gh, gw)`; an int means square.
        num_masking: exact number of patches to mask.
        min_num_patches: smallest target area of a block, in patches.
        max_num_patches: largest target area, in patches; None = `num_masking`.
        min_aspect: smallest block aspect ratio h / w.
        max_aspect: largest aspect ratio; None = `1 / min_aspect`.
        max_attempts: placements tried per block before falling back (unilm: 10).
    """

    grid: tuple[int, int]
    num_masking: int
    min_num_patches: int = 16
    max_num_patches: int | None = None
    min_aspect: float = 0.3
    max_aspect: float | None = None
    max_attempts: int = 10
    _log_aspect: tuple[float, float] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.grid = _as_grid(self.grid)
        self.num_masking = _check_count(self.grid, self.num_masking)
        if self.min_num_patches < 1:
            raise ValueError(f"min_num_patches must be >= 1, got {self.min_num_patches}")
        if self.max_num_patches is None:
            self.max_num_patches = max(self.num_masking, self.min_num_patches)
        if self.max_num_patches < self.min_num_patches:
            raise ValueError(
                f"max_num_patches={self.max_num_patches} is below "
                f"min_num_patches={self.min_num_patches}"
            )
        if self.min_aspect <= 0:
            raise ValueError(f"min_aspect must be > 0, got {self.min_aspect}")
        if self.max_aspect is None:
            self.max_aspect = 1.0 / self.min_aspect
        if self.max_aspect < self.min_aspect:
            raise ValueError(
                f"max_aspect={self.max_aspect} is below min_aspect={self.min_aspect}; "
                "with max_aspect=None it is 1 / min_aspect, so use min_aspect <= 1"
            )
        self._log_aspect = (math.log(self.min_aspect), math.log(self.max_aspect))

    @classmethod
    def from_ratio(
        cls,
        grid: tuple[int, int] | int,
        ratio: float = 0.4,
        min_num_patches: int | None = None,
        **kwargs: float | int | None,
    ) -> BlockMaskGenerator:
        """Builds a generator that masks `round(ratio * gh * gw)` patches.

        Note: BEiT's published setting is 75 of 196 patches (38%, "about 40%"); `ratio=0.4`
        gives 78 here. Pass `ratio=75 / 196` to reproduce BEiT exactly.

        Args:
            grid: patch grid `(gh, gw)`.
            ratio: fraction of patches to mask, in [0, 1].
            min_num_patches: smallest block; None = `default_min_block(grid, num_masking)`.
            **kwargs: other `BlockMaskGenerator` fields (`max_num_patches`, `min_aspect`, ...).
        """
        grid = _as_grid(grid)
        num_masking = _num_from_ratio(grid, ratio)
        if min_num_patches is None:
            min_num_patches = default_min_block(grid, num_masking)
        return cls(grid, num_masking, min_num_patches=min_num_patches, **kwargs)  # type: ignore[arg-type]

    def __call__(self, rng: np.random.Generator) -> np.ndarray:
        """Draws one mask.

        Args:
            rng: the random generator to draw from (advanced in place).

        Returns:
            `[gh, gw]` bool array, True = masked, exactly `num_masking` True entries.
        """
        return self.sample(rng)[0]

    def sample(
        self, rng: np.random.Generator
    ) -> tuple[np.ndarray, list[tuple[int, int, int, int]]]:
        """Draws one mask and also returns the blocks it was built from (for tests and plots).

        Args:
            rng: the random generator to draw from.

        Returns:
            `(mask, blocks)`: the `[gh, gw]` bool mask and the accepted blocks as
            `(top, left, h, w)`. Patches masked by the fallback fill belong to no block.
        """
        gh, gw = self.grid
        mask = np.zeros((gh, gw), dtype=bool)
        blocks: list[tuple[int, int, int, int]] = []
        count = 0
        while count < self.num_masking:
            block = self._place_block(mask, self.num_masking - count, rng)
            if block is None:
                break
            top, left, h, w, added = block
            blocks.append((top, left, h, w))
            count += added
        if count < self.num_masking:
            _fill_bordering(mask, self.num_masking - count, rng)
        return mask, blocks

    def _place_block(
        self, mask: np.ndarray, budget: int, rng: np.random.Generator
    ) -> tuple[int, int, int, int, int] | None:
        gh, gw = self.grid
        n = self.max_attempts
        cap = min(budget, self.max_num_patches)  # type: ignore[type-var]
        lo, hi = self._log_aspect
        # All attempts' draws at once, each drawn as unilm draws one (area from the remaining
        # budget; below the minimum block the interval runs downwards, as random.uniform does):
        # one call, in the order of four (areas, aspects, tops, lefts).
        u = rng.random(4 * n)
        areas = (self.min_num_patches + (cap - self.min_num_patches) * u[:n]).tolist()
        aspects = np.exp(lo + (hi - lo) * u[n : 2 * n]).tolist()
        tops, lefts = u[2 * n : 3 * n].tolist(), u[3 * n :].tolist()
        # The first acceptable attempt, as unilm's loop takes. Python scalars: a mask is a
        # handful of blocks of ten attempts, where numpy's per-call cost dominated (BENCHMARKS);
        # the arithmetic is the same IEEE double arithmetic (round() rounds half to even, as
        # np.rint; sqrt is correctly rounded in both), so the masks are the same.
        for area, aspect, ut, ul in zip(areas, aspects, tops, lefts, strict=True):
            h = round(math.sqrt(area * aspect))
            w = round(math.sqrt(area / aspect))
            if not (h < gh and w < gw):
                continue
            t, lf = int(ut * (gh - h + 1)), int(ul * (gw - w + 1))
            added = h * w - int(np.count_nonzero(mask[t : t + h, lf : lf + w]))
            if 0 < added <= cap:
                mask[t : t + h, lf : lf + w] = True
                return t, lf, h, w, added
        return None


@dataclass
class RandomMaskGenerator:
    """Uniform random masking of exactly `num_masking` patches (MAE/SimMIM style baseline).

    Args:
        grid: patch grid `(gh, gw)`; an int means square.
        num_masking: exact number of patches to mask.
    """

    grid: tuple[int, int]
    num_masking: int

    def __post_init__(self) -> None:
        self.grid = _as_grid(self.grid)
        self.num_masking = _check_count(self.grid, self.num_masking)

    @classmethod
    def from_ratio(cls, grid: tuple[int, int] | int, ratio: float = 0.4) -> RandomMaskGenerator:
        """Builds a generator that masks `round(ratio * gh * gw)` patches."""
        grid = _as_grid(grid)
        return cls(grid, _num_from_ratio(grid, ratio))

    def __call__(self, rng: np.random.Generator) -> np.ndarray:
        """Draws one mask: `[gh, gw]` bool, True = masked, exactly `num_masking` True."""
        gh, gw = self.grid
        flat = np.zeros(gh * gw, dtype=bool)
        flat[rng.choice(gh * gw, size=self.num_masking, replace=False)] = True
        return flat.reshape(gh, gw)


def _num_from_ratio(grid: tuple[int, int], ratio: float) -> int:
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"mask ratio must be in [0, 1], got {ratio}")
    return round(ratio * grid[0] * grid[1])


def _fill_bordering(mask: np.ndarray, n: int, rng: np.random.Generator) -> None:
    """Masks `n` more patches in place, preferring unmasked patches next to masked ones."""
    while n > 0:
        # 4-neighbourhood of the current mask, restricted to unmasked patches.
        near = np.zeros_like(mask)
        near[1:, :] |= mask[:-1, :]
        near[:-1, :] |= mask[1:, :]
        near[:, 1:] |= mask[:, :-1]
        near[:, :-1] |= mask[:, 1:]
        candidates = np.flatnonzero(near & ~mask)
        if candidates.size == 0:
            # Empty mask: seed one random patch, then grow from it.
            take = rng.choice(np.flatnonzero(~mask), size=1)
        else:
            take = rng.choice(candidates, size=min(n, candidates.size), replace=False)
        mask.flat[take] = True
        n -= take.size


MaskGenerator = BlockMaskGenerator | RandomMaskGenerator


def build_mask_generator(
    kind: Literal["block", "random"],
    grid: tuple[int, int] | int,
    ratio: float,
    min_num_patches: int | None = None,
) -> MaskGenerator:
    """Builds the mask generator a recipe asks for.

    Args:
        kind: "block" (BEiT blockwise) or "random" (uniform).
        grid: patch grid `(gh, gw)`.
        ratio: fraction of patches to mask; the count is `round(ratio * gh * gw)`.
        min_num_patches: smallest block for "block"; None = `default_min_block`. Must be None
            for "random".

    Returns:
        A callable `generator(rng) -> [gh, gw] bool mask`.
    """
    if kind == "block":
        return BlockMaskGenerator.from_ratio(grid, ratio, min_num_patches=min_num_patches)
    if kind == "random":
        if min_num_patches is not None:
            raise ValueError("min_num_patches only applies to kind='block', not 'random'")
        return RandomMaskGenerator.from_ratio(grid, ratio)
    raise ValueError(f"unknown mask kind {kind!r}; valid kinds are 'block' and 'random'")
