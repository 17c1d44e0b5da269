"""BEiT models on timm's `Beit`: backbone presets, the MIM model, the classifier, conversion."""

from beitdomain.models.backbone import (
    BACKBONE_PRESETS,
    BackboneConfig,
    backbone_config_of,
    create_backbone,
    get_preset,
)
from beitdomain.models.classifier import (
    BeitClassifier,
    freeze_backbone,
    layer_decay_param_groups,
    param_groups_weight_decay,
)
from beitdomain.models.convention import InputConvention, InputNorm, convention_of
from beitdomain.models.convert import LoadReport, WeightsError, load_backbone_weights
from beitdomain.models.export import (
    TimmExport,
    export_backbone,
    export_hf,
    export_timm,
    export_timm_backbone,
)
from beitdomain.models.hub import locate_weights
from beitdomain.models.init import unilm_init_
from beitdomain.models.mim import BeitMIM
from beitdomain.models.pretrained import build_pretraining_model

__all__ = [
    "BACKBONE_PRESETS",
    "BackboneConfig",
    "BeitClassifier",
    "BeitMIM",
    "InputConvention",
    "InputNorm",
    "LoadReport",
    "TimmExport",
    "WeightsError",
    "backbone_config_of",
    "build_pretraining_model",
    "convention_of",
    "create_backbone",
    "export_backbone",
    "export_hf",
    "export_timm",
    "export_timm_backbone",
    "freeze_backbone",
    "get_preset",
    "layer_decay_param_groups",
    "load_backbone_weights",
    "locate_weights",
    "param_groups_weight_decay",
    "unilm_init_",
]
