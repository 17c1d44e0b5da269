"""The k-NN of `pretrain --knn-every` and `beitdomain eval knn` score the same features: the
monitor reads the pre-training backbone as its export does (patch tokens mean-pooled before
the token norm, then the export's fresh LayerNorm), so both give the same scores."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import FINETUNE_SETS, randomize, recipe, write_separable_set

pytestmark = pytest.mark.usefixtures("one_thread")


def test_knn_monitor_and_eval_knn_score_the_same_features(tmp_path):
    from beitdomain.config import dump_recipe
    from beitdomain.data.labeled import labeled_data
    from beitdomain.engine.build import backbone_config
    from beitdomain.engine.represent import FrozenBackbone, load_backbone
    from beitdomain.engine.represent_eval import KnnMonitor, evaluate_representation
    from beitdomain.io import IntensitySpec
    from beitdomain.models.export import export_timm_backbone
    from beitdomain.models.mim import BeitMIM

    data = write_separable_set(tmp_path / "data", per_class=6)
    r = recipe(FINETUNE_SETS, **{"data.root": str(data)})
    torch.manual_seed(0)
    mim = BeitMIM.from_config(backbone_config(r), vocab_size=16).eval()
    randomize(mim, 5)  # a token norm far from (1, 0): pooling before or after it differs
    mim.input_norm.set(0.5, 0.5)
    run = tmp_path / "pre"
    run.mkdir()
    dump_recipe(r, run / "recipe.yaml")
    export_timm_backbone(mim, run / "backbone.safetensors")

    ld = labeled_data(r, progress=False)
    test = ld.test if ld.test is not None else ld.val
    mon = KnnMonitor(lambda m: m, ld.train, test, ld.classes, r.data.image_size, k=3)
    during = mon.measure(mim, torch.device("cpu"))
    # the monitor's features: the pre-training backbone as `measure` wraps it
    fb = FrozenBackbone(
        mim.backbone, IntensitySpec(), r.data.image_size, "training", mean=(0.5,), std=(0.5,)
    )
    exported = load_backbone(run)
    x_during, _ = fb.embed_dataset(ld.train)
    x_after, _ = exported.embed_dataset(ld.train)
    np.testing.assert_allclose(x_during, x_after, atol=1e-5, rtol=1e-5)

    after = evaluate_representation(exported, r, ("knn",), baseline=False, k=3, progress=False)
    assert after["methods"]["knn"]["backbone"]["balanced_accuracy"] == pytest.approx(
        during["balanced_accuracy"]
    )
