"""A Hugging Face `BeitForMaskedImageModeling` folder loads exactly or is refused: with
`use_mean_pooling: false` it normalizes its tokens twice (`beit.layernorm`, then `layernorm`),
which one final norm cannot reproduce (its logits were off by 0.27, silently)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import randomize, tiny_hf_beit_config

from beitdomain.models.backbone import get_preset
from beitdomain.models.convert import WeightsError, load_backbone_weights
from beitdomain.models.mim import BeitMIM

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("mean_pooling", [True, False])
def test_hf_mim_folder_loads_exactly_or_is_refused(tmp_path: Path, mean_pooling: bool) -> None:
    transformers = pytest.importorskip("transformers")
    config = tiny_hf_beit_config(
        layer_scale_init_value=0.1,
        use_shared_relative_position_bias=True,
        use_relative_position_bias=False,
        use_mean_pooling=mean_pooling,
        use_mask_token=True,
        hidden_act="gelu",
        vocab_size=24,
    )
    hf = transformers.BeitForMaskedImageModeling(config).eval()
    randomize(hf, 3)
    hf.save_pretrained(tmp_path / "hf")
    ours = BeitMIM.from_config(get_preset("tiny", img_size=32), vocab_size=24).eval()
    if not mean_pooling:
        with pytest.raises(WeightsError, match="use_mean_pooling: false normalizes its tokens"):
            load_backbone_weights(ours, tmp_path / "hf")
        return
    load_backbone_weights(ours, tmp_path / "hf")
    x01 = torch.rand(2, 3, 32, 32)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, :5] = True
    with torch.no_grad():
        ref = hf(pixel_values=(x01 - 0.5) / 0.5, bool_masked_pos=mask).logits
        ref = ref[mask] if ref.dim() == 3 else ref
        torch.testing.assert_close(ours(x01, mask), ref, atol=1e-5, rtol=1e-5)
