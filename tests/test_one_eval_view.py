"""The evaluation view's size rule lives once, in `beitdomain.view`, low enough for data/."""

from __future__ import annotations

import subprocess
import sys

import numpy as np

import beitdomain.data.transforms as T
from beitdomain.view import EvalView


def test_the_eval_transform_crops_where_eval_view_says(monkeypatch):
    image = np.random.default_rng(0).random((1, 37, 50), dtype=np.float32)
    out = T.FinetuneTransform(train=False, image_size=32)(image)
    assert out.shape == (1, 32, 32)
    assert EvalView(32).resized_shape(37, 50) == (37, 50)  # round(32 / 0.875) = 37: kept
    assert np.allclose(out[0], image[0, 2:34, 9:41], atol=1e-6)  # EvalView.crop_origin
    # FinetuneTransform reads the rule from EvalView: another rule moves its crop
    monkeypatch.setattr(EvalView, "crop_origin", lambda self, h, w: (0, 0))
    assert np.allclose(
        T.FinetuneTransform(train=False, image_size=32)(image)[0], image[0, :32, :32]
    )


def test_the_view_and_the_transforms_load_without_timm():
    code = "import sys, beitdomain.view, beitdomain.data.transforms; print('timm' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
