"""Per-sample block masks (``nnunet_alice.pretrain.data.masking``): exact ratio, block structure, independence."""
import numpy as np
import pytest

from nnunet_alice.pretrain.data.masking import batch_block_masks, block_grid, random_block_mask

# (patch, block, ratio): the block divides every patch axis, so the ratio is hit exactly in voxels
EXACT_CASES = [
    ((32, 32, 32), 8, 0.75),
    ((32, 32, 32), 16, 0.75),      # 8 blocks -> 6 masked
    ((32, 32, 32), 4, 0.5),
    ((16, 32, 48), 8, 0.25),       # anisotropic
    ((24, 32, 40), 8, 0.6),        # 3*4*5 = 60 blocks -> 36 masked
    ((8, 64, 64), 8, 0.75),        # one block thick along the first axis
    ((20, 20, 20), 4, 0.4),
]


def _blocks(mask, block):
    """View a (X, Y, Z) mask as (gx, b, gy, b, gz, b)."""
    g = [s // block for s in mask.shape]
    return mask.reshape(g[0], block, g[1], block, g[2], block)


@pytest.mark.parametrize("patch,block,ratio", EXACT_CASES)
def test_every_sample_hits_the_ratio_exactly(patch, block, ratio):
    rng = np.random.default_rng(0)
    masks = batch_block_masks(5, patch, block, ratio, rng)
    assert masks.shape == (5, 1, *patch)
    assert masks.dtype == np.float32
    assert set(np.unique(masks)) <= {0.0, 1.0}
    n_blocks = int(np.prod([p // block for p in patch]))
    assert round(ratio * n_blocks) == ratio * n_blocks  # cases chosen so the ratio is a whole number of blocks
    for m in masks:
        assert m.mean() == pytest.approx(ratio, abs=1e-9)


@pytest.mark.parametrize("patch,block,ratio", EXACT_CASES)
def test_mask_is_constant_within_each_block(patch, block, ratio):
    m = random_block_mask(patch, block, ratio, np.random.default_rng(1))
    b = _blocks(m, block)
    per_block_min = b.min(axis=(1, 3, 5))
    per_block_max = b.max(axis=(1, 3, 5))
    np.testing.assert_array_equal(per_block_min, per_block_max)
    assert per_block_max.sum() == round(ratio * per_block_max.size)


def test_masks_differ_between_samples_of_a_batch():
    masks = batch_block_masks(8, (32, 32, 32), 8, 0.75, np.random.default_rng(2))
    flat = masks.reshape(8, -1)
    distinct = {m.tobytes() for m in flat}
    assert len(distinct) == 8  # 64 choose 48 patterns: a repeat would mean a shared mask (bug B3 in docs/method.md)


def test_ratio_zero_masks_nothing():
    masks = batch_block_masks(3, (16, 24, 32), 8, 0.0, np.random.default_rng(3))
    assert masks.shape == (3, 1, 16, 24, 32)
    assert not masks.any()


def test_same_seed_same_masks_other_seed_other_masks():
    a = batch_block_masks(4, (24, 32, 40), 8, 0.75, np.random.default_rng(123))
    b = batch_block_masks(4, (24, 32, 40), 8, 0.75, np.random.default_rng(123))
    c = batch_block_masks(4, (24, 32, 40), 8, 0.75, np.random.default_rng(124))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_block_larger_than_patch_is_clipped_per_axis():
    grid, blocks = block_grid((8, 32, 32), 16)
    assert blocks == (8, 16, 16)
    assert grid == (1, 2, 2)
    m = random_block_mask((8, 32, 32), 16, 0.5, np.random.default_rng(4))
    assert m.shape == (8, 32, 32)
    assert m.mean() == pytest.approx(0.5)


def test_non_dividing_block_gives_correct_shape_and_whole_blocks():
    # 20 is not a multiple of 8: border blocks are cut, shape must still be the patch
    grid, blocks = block_grid((20, 20, 20), 8)
    assert grid == (3, 3, 3) and blocks == (8, 8, 8)
    m = random_block_mask((20, 20, 20), 8, 0.5, np.random.default_rng(5))
    assert m.shape == (20, 20, 20)
    assert 0.0 < m.mean() < 1.0
    # constant inside the full interior block [0:8)^3
    assert m[:8, :8, :8].min() == m[:8, :8, :8].max()
