"""IntensitySpec parsing and the normalization / channel policy on plain arrays."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from beitdomain.io import WINDOW_PRESETS, IntensitySpec, ReaderError, normalize


def test_from_config_accepts_objects_and_mappings():
    cfg = SimpleNamespace(
        normalize="window", window={"center": 40, "width": 400}, percentiles=[1, 99], in_chans=3
    )
    spec = IntensitySpec.from_config(cfg)
    assert spec.window == (40.0, 400.0) and spec.percentiles == (1.0, 99.0) and spec.in_chans == 3
    assert spec.window_range == (-160.0, 240.0)
    spec = IntensitySpec.from_config({"window": "ct-lung", "frames": "middle"})
    assert spec.window == "ct-lung" and spec.frames == "middle" and spec.nonfinite == "error"
    assert IntensitySpec.from_config({"window": "40,400"}).window == (40.0, 400.0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"normalize": "minmax"}, "valid: auto, window, percentile, dtype"),
        ({"window": "ct-lungs"}, "neither a preset"),
        ({"window": (40, 0)}, "width must be > 0"),
        ({"window": {"center": 1}}, "center, width"),
        ({"percentiles": (99, 1)}, "low < high"),
        ({"nonfinite": "drop"}, "'error', 'zero'"),
        ({"frames": "last"}, "valid: all, middle, first"),
    ],
)
def test_bad_values_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        IntensitySpec(**kwargs)


def test_presets_are_sane():
    assert {"ct-lung", "ct-bone", "ct-brain", "ct-soft-tissue"} <= set(WINDOW_PRESETS)
    assert all(w > 0 for _, w in WINDOW_PRESETS.values())


def test_percentile_clipping():
    raw = np.arange(1000, dtype=np.int16).reshape(1, 1, 20, 50)
    out, info = normalize(raw, {}, IntensitySpec(percentiles=(10, 90)))
    assert info["mode"] == "percentile"
    np.testing.assert_allclose([info["low"], info["high"]], np.percentile(raw, [10, 90]))
    assert out.dtype == np.float32 and out.min() == 0.0 and out.max() == 1.0
    assert (out == 0).sum() == 100  # values 0..99 lie below the 10th percentile (99.9)


def test_window_without_any_window_is_an_error():
    raw = np.zeros((1, 1, 4, 4), np.int16)
    with pytest.raises(ReaderError, match="no window given"):
        normalize(raw, {"format": "dicom"}, IntensitySpec(normalize="window"), "x.dcm")


def test_channel_policy_replicates_and_rejects():
    raw = np.random.default_rng(0).integers(0, 255, (1, 1, 4, 4)).astype(np.uint8)
    out, _ = normalize(raw, {"dtype": "uint8"}, IntensitySpec(normalize="dtype", in_chans=3))
    assert out.shape == (1, 3, 4, 4)
    np.testing.assert_array_equal(out[0, 0], out[0, 2])
    two = np.zeros((1, 2, 4, 4), np.uint8)
    with pytest.raises(ReaderError, match="2 channels but in_chans=3"):
        normalize(two, {}, IntensitySpec(in_chans=3), "two.tif")


def test_to_dict_round_trips():
    spec = IntensitySpec(window=(40, 400), channels=(0, 1, 2), in_chans=3)
    assert IntensitySpec.from_config(spec.to_dict()) == spec
