"""A MONAI transform chain for `data.augment: augment_chain:build` in the tests (tests/ is on
sys.path under pytest), the way a user names their own module."""

from __future__ import annotations


def build():
    """Random flip, small affine and Gaussian noise; channel-first, values in [0, 1]."""
    from monai.transforms import Compose, RandAffine, RandFlip, RandGaussianNoise

    return Compose(
        [
            RandFlip(prob=0.5, spatial_axis=1),
            RandAffine(prob=1.0, rotate_range=0.2, scale_range=0.1, padding_mode="border"),
            RandGaussianNoise(prob=0.5, std=0.03),
        ]
    )
