"""Discrete-VAE visual tokenizer (model, schedules, codebook health, weight I/O).

Training lives in :mod:`beitdomain.engine`; this package only defines the model and its tools.
"""

from beitdomain.tokenizer.codebook import (
    CodebookCollapseWarning,
    CodeUsage,
    check_codebook_usage,
    reinit_dead_codes,
    reset_optimizer_rows,
)
from beitdomain.tokenizer.dalle import UntrustedPickleError, import_dalle
from beitdomain.tokenizer.dvae import (
    TOKENIZER_PRESETS,
    DiscreteVAE,
    DVAEConfig,
    DVAEOutput,
    create_tokenizer,
    gumbel_softmax,
    psnr,
    tokenizer_config,
)
from beitdomain.tokenizer.flops import count_params, decoder_gflops, encoder_gflops
from beitdomain.tokenizer.io import (
    load_tokenizer,
    load_tokenizer_config,
    save_tokenizer,
)
from beitdomain.tokenizer.schedule import (
    anneal_steps,
    gumbel_temperature,
    kl_weight,
    kl_weight_per_element,
)

__all__ = [
    "TOKENIZER_PRESETS",
    "CodeUsage",
    "CodebookCollapseWarning",
    "DVAEConfig",
    "DVAEOutput",
    "DiscreteVAE",
    "UntrustedPickleError",
    "anneal_steps",
    "check_codebook_usage",
    "count_params",
    "create_tokenizer",
    "decoder_gflops",
    "encoder_gflops",
    "gumbel_softmax",
    "gumbel_temperature",
    "import_dalle",
    "kl_weight",
    "kl_weight_per_element",
    "load_tokenizer",
    "load_tokenizer_config",
    "psnr",
    "reinit_dead_codes",
    "reset_optimizer_rows",
    "save_tokenizer",
    "tokenizer_config",
]
