"""Tests for beitdomain.data.masking: exact counts, block limits, reproducibility."""

from __future__ import annotations

import numpy as np
import pytest

from beitdomain.data.masking import (
    BlockMaskGenerator,
    RandomMaskGenerator,
    build_mask_generator,
    default_min_block,
)


def _covered(mask: np.ndarray, blocks: list[tuple[int, int, int, int]]) -> np.ndarray:
    cov = np.zeros_like(mask)
    for top, left, h, w in blocks:
        cov[top : top + h, left : left + w] = True
    return cov


def test_beit_default_masks_exactly_75_of_196() -> None:
    gen = BlockMaskGenerator((14, 14), 75)
    rng = np.random.default_rng(0)
    for _ in range(300):
        mask = gen(rng)
        assert mask.shape == (14, 14)
        assert mask.dtype == bool
        assert int(mask.sum()) == 75


@pytest.mark.parametrize(
    ("grid", "count", "min_block"),
    [((14, 14), 75, 16), ((8, 8), 26, 5), ((4, 6), 10, 4), ((16, 9), 60, 8)],
)
def test_blocks_respect_size_and_aspect(grid: tuple[int, int], count: int, min_block: int) -> None:
    gen = BlockMaskGenerator(grid, count, min_num_patches=min_block, min_aspect=0.3)
    rng = np.random.default_rng(1)
    fallback = 0
    for _ in range(200):
        mask, blocks = gen.sample(rng)
        assert int(mask.sum()) == count
        assert blocks, "at least one block must be placed when a block fits"
        for _top, _left, h, w in blocks:
            assert min_block <= h * w <= count
            assert 0.3 - 1e-9 <= h / w <= 1 / 0.3 + 1e-9
        cov = _covered(mask, blocks)
        # Blocks only ever add to the mask; the rest is the fallback fill.
        assert not (cov & ~mask).any()
        fallback += int(mask.sum() - cov.sum())
    # The fallback is for the last few patches only; blocks carry the bulk.
    assert fallback / (200 * count) < 0.1


def test_fallback_keeps_count_when_no_block_fits() -> None:
    # min block 20 > budget 5: no block can ever be placed, fallback fills everything.
    gen = BlockMaskGenerator((6, 6), 5, min_num_patches=20, max_num_patches=30)
    mask, blocks = gen.sample(np.random.default_rng(0))
    assert blocks == []
    assert int(mask.sum()) == 5
    # Fallback grows one connected blob from its seed (4-neighbourhood).
    ys, xs = np.nonzero(mask)
    pts = set(zip(ys.tolist(), xs.tolist(), strict=True))
    seen, todo = set(), [next(iter(pts))]
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        todo += [q for q in pts if abs(q[0] - p[0]) + abs(q[1] - p[1]) == 1]
    assert seen == pts


def test_same_rng_same_masks_and_different_seeds_differ() -> None:
    gen = BlockMaskGenerator.from_ratio((14, 14), 0.4)
    a = [gen(np.random.default_rng(7)) for _ in range(3)]
    assert all(np.array_equal(a[0], m) for m in a)
    seq1 = [gen(r) for r in [np.random.default_rng(3)] * 5]
    seq2 = [gen(r) for r in [np.random.default_rng(3)] * 5]
    assert all(np.array_equal(x, y) for x, y in zip(seq1, seq2, strict=True))
    assert not np.array_equal(gen(np.random.default_rng(1)), gen(np.random.default_rng(2)))


def test_from_ratio_counts_and_min_block_rule() -> None:
    assert BlockMaskGenerator.from_ratio((14, 14), 0.4).num_masking == 78
    assert BlockMaskGenerator.from_ratio((14, 14), 75 / 196).num_masking == 75
    assert default_min_block((14, 14)) == 16
    assert default_min_block((28, 28)) == 64
    assert default_min_block((8, 8)) == 5
    assert default_min_block((4, 4)) == 4
    assert default_min_block((4, 4), num_masking=2) == 2
    gen = BlockMaskGenerator.from_ratio((4, 4), 0.4)
    assert (gen.num_masking, gen.min_num_patches) == (6, 4)
    assert int(gen(np.random.default_rng(0)).sum()) == 6


def test_random_generator_exact_and_reproducible() -> None:
    gen = RandomMaskGenerator((8, 8), 25)
    rng = np.random.default_rng(0)
    masks = [gen(rng) for _ in range(50)]
    assert all(int(m.sum()) == 25 for m in masks)
    assert np.array_equal(gen(np.random.default_rng(5)), gen(np.random.default_rng(5)))
    # Uniform: every position gets masked at some point over many draws.
    assert np.stack(masks).any(axis=0).all()


def test_edge_counts() -> None:
    assert not BlockMaskGenerator((5, 5), 0)(np.random.default_rng(0)).any()
    assert BlockMaskGenerator((5, 5), 25, min_num_patches=4)(np.random.default_rng(0)).all()
    assert RandomMaskGenerator((5, 5), 25)(np.random.default_rng(0)).all()


def test_factory_and_errors() -> None:
    assert isinstance(build_mask_generator("block", (8, 8), 0.5), BlockMaskGenerator)
    rnd = build_mask_generator("random", 8, 0.5)
    assert isinstance(rnd, RandomMaskGenerator)
    assert rnd.num_masking == 32
    with pytest.raises(ValueError, match="unknown mask kind 'grid'"):
        build_mask_generator("grid", (8, 8), 0.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"num_masking=30 .* 5x5 grid"):
        BlockMaskGenerator((5, 5), 30)
    with pytest.raises(ValueError, match="mask ratio must be in"):
        build_mask_generator("block", (8, 8), 1.5)
    with pytest.raises(ValueError, match="only applies to kind='block'"):
        build_mask_generator("random", (8, 8), 0.5, min_num_patches=4)
