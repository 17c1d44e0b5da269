"""benchmarks/gpu_suite.py measures the model the GPU recipes train, and each H100 variant gets
its own peak (issue 37 item 7). No GPU needed: the table and the sizes are plain data."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import common as C
import gpu_suite as GS

from beitdomain.config import load_recipe


@pytest.mark.parametrize(
    ("name", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", 989.0),  # SXM
        ("NVIDIA H100 NVL", 835.5),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H200", 989.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA GeForce RTX 3090", None),
    ],
)
def test_each_gpu_name_gets_its_own_dense_bf16_peak(name, peak):
    assert C.known_peak_tflops(name) == peak


def test_the_suite_by_default_measures_the_elpv_gpu_recipes_model():
    r = load_recipe("elpv-gpu")
    sizes = GS.suite_sizes(quick=False, tokenizer=None, batch=None)
    got = {k: sizes[k] for k in ("preset", "img_size", "in_chans", "tokenizer", "vocab_size")}
    assert got == {
        "preset": r.model.preset,
        "img_size": r.data.image_size,
        "in_chans": r.data.in_chans,
        "tokenizer": r.tokenizer.preset,
        "vocab_size": r.tokenizer.vocab_size,
    }
    # the recipe's tokenizer grid is its patch grid: 224 / 16 = 112 / 8
    assert got == {
        "preset": "vit-base",
        "img_size": 224,
        "in_chans": 1,
        "tokenizer": "base",
        "vocab_size": 8192,
    }
    assert sizes["batch"] == 128
    args = GS.parse_args([])
    assert (args.recipe, args.tokenizer) == ("elpv-gpu", None)
    # BEiT's own tokenizer stays one flag away
    assert GS.suite_sizes(quick=False, tokenizer="dalle", batch=None)["tokenizer"] == "dalle"
