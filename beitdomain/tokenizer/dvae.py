"""DALL-E-style discrete VAE: images -> a grid of visual tokens -> images.

The architecture follows the dVAE of Ramesh et al. 2021 ("Zero-Shot Text-to-Image Generation"),
the tokenizer BEiT was pre-trained with, so that the public OpenAI weights map onto the
``"dalle"`` preset one tensor to one tensor (see :mod:`beitdomain.tokenizer.dalle`):

```
x in [0,1] ──map_pixels──► stem conv ──► groups of residual blocks (max-pool between groups)
    ──► ReLU + 1x1 conv ──► logits [B, K, gh, gw]
logits ──gumbel-softmax over K──► soft one-hot [B, K, gh, gw] ──× codebook [K, D]──► [B, D, gh, gw]
    ──► groups of residual blocks (nearest upsample between groups) ──► ReLU + 1x1 conv
    ──► per-pixel statistics ──► reconstruction in [0,1]
```

Each group doubles (encoder) or halves (decoder) the width; there are ``log2(downsample) + 1``
groups, so a downsample factor of 8 gives DALL-E's 4 groups and a 112 px input gives the 14x14
grid of a 224 px, patch-16 ViT.

Conventions: images are float tensors in ``[0, 1]`` shaped ``[B, C, H, W]``. The encoder logits
head and the codebook lookup run in float32 even under autocast (the logits decide which token
wins, and DALL-E also kept them out of half precision); losses are always computed in float32.
"""

from __future__ import annotations

import contextlib
import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "TOKENIZER_PRESETS",
    "DVAEConfig",
    "DVAEOutput",
    "DiscreteVAE",
    "create_tokenizer",
    "gumbel_softmax",
    "map_pixels",
    "psnr",
    "tokenizer_config",
    "unmap_pixels",
]

ReconLoss = Literal["logit_laplace", "l1", "mse"]
_RECON_LOSSES = ("logit_laplace", "l1", "mse")


@dataclass(frozen=True)
class DVAEConfig:
    """Architecture of a :class:`DiscreteVAE`.

    Attributes:
        in_chans: Image channels, 1 (grayscale, e.g. CT/MR/microscopy) or 3 (RGB).
        vocab_size: Number of visual tokens K (codebook entries).
        hidden: Width of the first encoder group (DALL-E's ``n_hid``); group ``g`` has
            ``hidden * 2**g`` channels.
        n_blocks: Residual blocks per group (DALL-E's ``n_blk_per_group``).
        downsample: Spatial reduction from image to token grid, 4 or 8 (the number of 2x
            pooling stages is ``log2(downsample)``).
        input_size: Side length in pixels the tokenizer is trained on; the token grid is
            ``input_size // downsample``.
        recon_loss: ``"logit_laplace"`` (DALL-E's likelihood), ``"l1"`` or ``"mse"``.
        codebook_dim: Width D of a code embedding (DALL-E's decoder ``n_init``).
        stem_kernel: Kernel size of the encoder's first conv (7 in DALL-E).
        pixel_eps: Pixels are mapped from ``[0, 1]`` to ``[eps, 1 - eps]`` before the encoder and
            for the logit-Laplace likelihood, which is undefined at exactly 0 and 1.
    """

    in_chans: int = 3
    vocab_size: int = 8192
    hidden: int = 256
    n_blocks: int = 2
    downsample: int = 8
    input_size: int = 112
    recon_loss: ReconLoss = "logit_laplace"
    codebook_dim: int = 128
    stem_kernel: int = 7
    pixel_eps: float = 0.1

    def __post_init__(self) -> None:
        checks = [
            ("in_chans", self.in_chans in (1, 3), "1 or 3"),
            ("vocab_size", self.vocab_size >= 2, "an integer >= 2"),
            ("hidden", self.hidden >= 4 and self.hidden % 4 == 0, "a positive multiple of 4"),
            ("n_blocks", self.n_blocks >= 1, "an integer >= 1"),
            ("downsample", self.downsample in (4, 8), "4 or 8"),
            (
                "input_size",
                self.input_size >= self.downsample and self.input_size % self.downsample == 0,
                f"a positive multiple of downsample={self.downsample}",
            ),
            ("recon_loss", self.recon_loss in _RECON_LOSSES, " | ".join(_RECON_LOSSES)),
            ("codebook_dim", self.codebook_dim >= 1, "an integer >= 1"),
            ("stem_kernel", self.stem_kernel >= 1 and self.stem_kernel % 2 == 1, "odd, >= 1"),
            ("pixel_eps", 0.0 < self.pixel_eps < 0.5, "a float in (0, 0.5)"),
        ]
        for name, ok, valid in checks:
            if not ok:
                raise ValueError(
                    f"DVAEConfig.{name}={getattr(self, name)!r} is invalid; expected {valid}."
                )

    @property
    def n_groups(self) -> int:
        """Number of residual groups; one fewer pooling stages than groups."""
        return int(math.log2(self.downsample)) + 1

    @property
    def grid_size(self) -> int:
        """Side of the token grid for ``input_size`` images."""
        return self.input_size // self.downsample

    @property
    def out_chans(self) -> int:
        """Decoder output channels: (mu, log-scale) per channel for logit-Laplace, else one."""
        return 2 * self.in_chans if self.recon_loss == "logit_laplace" else self.in_chans

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form of the config."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> DVAEConfig:
        """Build a config from a dict, rejecting unknown keys.

        Args:
            data: Field name -> value.
            source: Where ``data`` came from, used in error messages (e.g. a file path).

        Raises:
            ValueError: On unknown keys or invalid values.
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"{source}: unknown tokenizer config key(s) {unknown}; valid keys: {sorted(known)}."
            )
        return cls(**data)


# Presets. Measured with `count_params` / `encoder_gflops` / `decoder_gflops` (GFLOP = 2 x MACs,
# one 112 px image): tiny 0.05 M params (at 32 px: 0.006 GFLOP encoder); small 0.96 M,
# 0.49 / 0.58 GFLOP encoder / decoder; base 29.5 M, 14.9 / 15.1; dalle 97.6 M (53.8 M encoder),
# 52.1 / 59.0 -- the DALL-E encoder's published ~52 GFLOP at 112 px.
# Each preset names what differs from DALL-E's, the config's defaults.
TOKENIZER_PRESETS: dict[str, DVAEConfig] = {
    # Unit tests: 32 px -> 8x8 grid, 64 codes, 0.05 M parameters.
    "tiny": DVAEConfig(
        vocab_size=64,
        hidden=16,
        n_blocks=1,
        downsample=4,
        input_size=32,
        codebook_dim=16,
        stem_kernel=3,
    ),
    # CPU demo on domain images: 112 px -> 14x14 grid (patch-16 ViT at 224 px), 1024 codes.
    "small": DVAEConfig(vocab_size=1024, hidden=32, n_blocks=1, codebook_dim=64, stem_kernel=5),
    # A domain tokenizer worth training on one GPU: DALL-E's at half the width (BEiT's
    # vocabulary size, so MIM heads match).
    "base": DVAEConfig(hidden=128),
    # Exactly the OpenAI DALL-E dVAE, the config's defaults (n_hid 256, 2 blocks x 4 groups,
    # K 8192, n_init 128, 7 px stem), so `import_dalle` can map its weights one to one.
    "dalle": DVAEConfig(),
}


def tokenizer_config(name: str, **overrides: Any) -> DVAEConfig:
    """Return a preset config, optionally with fields replaced (e.g. ``in_chans=1``).

    Raises:
        KeyError: If ``name`` is not a preset; the message lists the presets.
    """
    if name not in TOKENIZER_PRESETS:
        raise KeyError(
            f"unknown tokenizer preset {name!r}; available: {sorted(TOKENIZER_PRESETS)}."
        )
    cfg = TOKENIZER_PRESETS[name]
    return replace(cfg, **overrides) if overrides else cfg


def create_tokenizer(config: str | DVAEConfig, **overrides: Any) -> DiscreteVAE:
    """Build a freshly initialised :class:`DiscreteVAE` from a preset name or a config."""
    if isinstance(config, str):
        cfg = tokenizer_config(config, **overrides)
    else:
        cfg = replace(config, **overrides) if overrides else config
    return DiscreteVAE(cfg)


def map_pixels(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Map pixels from ``[0, 1]`` to ``[eps, 1 - eps]`` (DALL-E's input convention)."""
    return (1.0 - 2.0 * eps) * x + eps


def unmap_pixels(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Inverse of :func:`map_pixels`, clamped to ``[0, 1]``."""
    return ((x - eps) / (1.0 - 2.0 * eps)).clamp(0.0, 1.0)


def psnr(recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB for images in ``[0, 1]``, averaged over the batch.

    Args:
        recon: ``[B, C, H, W]`` in ``[0, 1]``.
        target: Same shape as ``recon``.
    """
    mse = (recon.float() - target.float()).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return (-10.0 * torch.log10(mse)).mean()


def gumbel_softmax(logits: torch.Tensor, tau: float, hard: bool = False) -> torch.Tensor:
    """Gumbel-softmax relaxation over dim 1, as `F.gumbel_softmax(logits, tau, hard, dim=1)`.

    The noise is drawn as ``-log(-log(U))`` from uniform draws: on CPU `torch.rand` is about
    2.5x faster than the exponential draws `F.gumbel_softmax` uses, and at K = 8192 codes the
    noise tensor is the largest one in the tokenizer's step.

    Args:
        logits: ``[B, K, ...]`` unnormalised log-probabilities.
        tau: Temperature (> 0).
        hard: Straight-through: one-hot samples forward, soft gradients backward.
    """
    u = torch.rand_like(logits, dtype=torch.float32).clamp_(1e-10, 1.0 - 1e-7)
    y = ((logits.float() - torch.log(-torch.log(u))) / tau).softmax(dim=1)
    if not hard:
        return y
    index = y.max(dim=1, keepdim=True).indices  # the first maximum, as argmax; faster on a CPU
    one_hot = torch.zeros_like(y).scatter_(1, index, 1.0)
    return one_hot - y.detach() + y


def _float32_region(device: torch.device) -> contextlib.AbstractContextManager:
    """Disable autocast on ``device`` (no-op where autocast does not exist, e.g. ``meta``)."""
    is_available = getattr(torch.amp, "is_autocast_available", None)  # torch >= 2.4
    if is_available(device.type) if is_available else device.type in ("cpu", "cuda", "xpu"):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def _conv(n_in: int, n_out: int, kernel: int) -> nn.Conv2d:
    """Same-padding conv with DALL-E's init (N(0, 1/fan_in) weights, zero bias)."""
    conv = nn.Conv2d(n_in, n_out, kernel, padding=(kernel - 1) // 2)
    nn.init.normal_(conv.weight, std=1.0 / math.sqrt(n_in * kernel * kernel))
    nn.init.zeros_(conv.bias)
    return conv


class ResidualBlock(nn.Module):
    """``x -> skip(x) + post_gain * res(x)`` with a bottleneck of ``n_out // 4`` channels.

    ``post_gain = 1 / n_layers**2`` keeps the residual stream's scale roughly constant at init
    however deep the stack is (DALL-E's choice, which lets it train without normalisation).
    The encoder uses kernels (3, 3, 3, 1), the decoder (1, 3, 3, 3).
    """

    def __init__(
        self, n_in: int, n_out: int, n_layers: int, kernels: tuple[int, int, int, int]
    ) -> None:
        super().__init__()
        n_mid = n_out // 4
        self.post_gain = 1.0 / n_layers**2
        self.skip = _conv(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        widths = [n_in, n_mid, n_mid, n_mid, n_out]
        layers: list[tuple[str, nn.Module]] = []
        for i, k in enumerate(kernels):
            layers += [
                (f"relu_{i + 1}", nn.ReLU()),
                (f"conv_{i + 1}", _conv(widths[i], widths[i + 1], k)),
            ]
        self.res = nn.Sequential(OrderedDict(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.post_gain * self.res(x)


def _group_widths(cfg: DVAEConfig) -> list[int]:
    # Encoder group g has hidden * 2**g channels: 1x, 2x, 4x, 8x for DALL-E.
    return [cfg.hidden * 2**g for g in range(cfg.n_groups)]


def _residual_groups(
    cfg: DVAEConfig,
    n_in: int,
    widths: list[int],
    kernels: tuple[int, int, int, int],
    resample: Callable[[], nn.Module],
) -> nn.Sequential:
    """The encoder's or decoder's body: a group of `cfg.n_blocks` residual blocks per width,
    `resample()` (2x pooling or upsampling) between consecutive groups."""
    n_layers = cfg.n_groups * cfg.n_blocks
    groups = []
    for g, width in enumerate(widths):
        blocks: list[nn.Module] = []
        for _ in range(cfg.n_blocks):
            blocks.append(ResidualBlock(n_in, width, n_layers, kernels))
            n_in = width
        if g < len(widths) - 1:
            blocks.append(resample())
        groups.append(nn.Sequential(*blocks))
    return nn.Sequential(*groups)


class Encoder(nn.Module):
    """Image ``[B, C, H, W]`` (already mapped to ``[eps, 1-eps]``) -> features and logits."""

    def __init__(self, cfg: DVAEConfig) -> None:
        super().__init__()
        widths = _group_widths(cfg)
        self.stem = _conv(cfg.in_chans, widths[0], cfg.stem_kernel)
        self.groups = _residual_groups(
            cfg, widths[0], widths, (3, 3, 3, 1), lambda: nn.MaxPool2d(kernel_size=2)
        )
        # Logits head: 1x1 conv on ReLU(features); the ReLU lives in `features` so that the
        # dead-code remedy sees exactly what this conv sees.
        self.head = _conv(widths[-1], cfg.vocab_size, 1)

    @property
    def logits_conv(self) -> nn.Conv2d:
        """The final 1x1 conv whose row k scores code k."""
        return self.head

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Features seen by the logits conv (after its ReLU): ``[B, F, gh, gw]``."""
        return torch.relu(self.groups(self.stem(x)))

    def logits_from_features(self, h: torch.Tensor) -> torch.Tensor:
        """Float32 logits ``[B, K, gh, gw]`` from :meth:`features` output."""
        # Run outside autocast: in bf16 near-tied logits would flip argmax between runs/devices.
        with _float32_region(h.device):
            return self.head(h.float())


class Decoder(nn.Module):
    """Code embeddings ``[B, D, gh, gw]`` -> per-pixel statistics ``[B, out_chans, H, W]``."""

    def __init__(self, cfg: DVAEConfig) -> None:
        super().__init__()
        widths = _group_widths(cfg)[::-1]
        self.groups = _residual_groups(
            cfg,
            cfg.codebook_dim,
            widths,
            (1, 3, 3, 3),
            lambda: nn.Upsample(scale_factor=2, mode="nearest"),
        )
        self.head = nn.Sequential(
            OrderedDict(relu=nn.ReLU(), conv=_conv(widths[-1], cfg.out_chans, 1))
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.head(self.groups(z))


def _prior_kls(log_q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean per-cell KL to uniform, KL of the batch-average distribution to uniform).

    Args:
        log_q: Float32 log-probabilities ``[B, K, gh, gw]`` over the K codes.
    """
    log_k = math.log(log_q.shape[1])
    q = log_q.exp()
    per_cell = (q * log_q).sum(dim=1) + log_k  # [B, gh, gw]
    q_bar = q.mean(dim=(0, *range(2, q.ndim)))  # [K]
    usage = (q_bar * q_bar.clamp_min(1e-12).log()).sum() + log_k
    return per_cell.mean(), usage


def edge_loss(recon: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Mean L1 between the finite-difference gradients (along H and W) of ``recon`` and ``x``
    (``[B, C, H, W]``, float32): large where an edge or a thin line is blurred or missing."""
    recon, x = recon.float(), x.float()
    dh = (recon.diff(dim=-2) - x.diff(dim=-2)).abs().mean()
    dw = (recon.diff(dim=-1) - x.diff(dim=-1)).abs().mean()
    return 0.5 * (dh + dw)


@dataclass
class DVAEOutput:
    """What :meth:`DiscreteVAE.forward` returns.

    Attributes:
        recon: Reconstruction in ``[0, 1]``, ``[B, C, H, W]``, float32.
        logits: Encoder logits ``[B, K, gh, gw]``, float32.
        recon_loss: Scalar reconstruction loss (float32): negative log-likelihood per sub-pixel
            in nats for ``logit_laplace``, mean absolute / squared error for ``l1`` / ``mse``.
        kl: Scalar KL(softmax(logits) || uniform over K), nats per grid cell (float32).
        usage_kl: Scalar KL(q_bar || uniform over K) of the *batch-average* code distribution
            ``q_bar = mean over images and cells of softmax(logits)`` (float32), in nats. It is 0
            when the batch spreads over all codes evenly, ``log K`` when every cell picks the
            same code, whatever each cell's own confidence.
    """

    recon: torch.Tensor
    logits: torch.Tensor
    recon_loss: torch.Tensor
    kl: torch.Tensor
    usage_kl: torch.Tensor

    def loss(self, kl_weight: float, usage_weight: float = 0.0) -> torch.Tensor:
        """Objective ``recon_loss + kl_weight * kl + usage_weight * usage_kl``.

        The first two terms are DALL-E's negative ELBO (up to scale). The per-cell KL pulls
        every cell's distribution towards uniform, which spreads codes only by making each
        choice *less certain*: weighted strongly enough to keep codes alive, it drowns the
        information the decoder needs (at 16.5 dB a demo tokenizer reconstructed no better
        than a flat image). ``usage_kl`` asks instead for the codes to be used evenly *across*
        the batch, and leaves each cell free to be confident; it is the "codebook entropy"
        term of MAGVIT-v2's lookup-free quantizer and of VQ codebook-usage regularisers.
        """
        return self.recon_loss + kl_weight * self.kl + usage_weight * self.usage_kl


class DiscreteVAE(nn.Module):
    """Discrete VAE tokenizer; see the module docstring for the data flow.

    Args:
        config: Architecture; see :class:`DVAEConfig` and :data:`TOKENIZER_PRESETS`.
    """

    def __init__(self, config: DVAEConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        # The codebook plays the role of DALL-E's decoder input 1x1 conv (vocab -> n_init). The
        # conv's bias is folded into the rows: a (soft) one-hot sums to 1, so z @ (W + b) equals
        # z @ W + b exactly. Init matches that conv's N(0, 1/K).
        self.codebook = nn.Embedding(config.vocab_size, config.codebook_dim)
        nn.init.normal_(self.codebook.weight, std=1.0 / math.sqrt(config.vocab_size))
        self.decoder = Decoder(config)

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def grid_size(self) -> int:
        return self.config.grid_size

    def _check_input(self, x: torch.Tensor) -> None:
        cfg = self.config
        if x.ndim != 4 or x.shape[1] != cfg.in_chans:
            raise ValueError(
                f"expected images [B, {cfg.in_chans}, H, W] (in_chans={cfg.in_chans}), "
                f"got shape {tuple(x.shape)}."
            )
        if x.shape[-2] % cfg.downsample or x.shape[-1] % cfg.downsample:
            raise ValueError(
                f"image size {tuple(x.shape[-2:])} is not divisible by the tokenizer's "
                f"downsample factor {cfg.downsample}."
            )
        if not x.is_floating_point():
            raise TypeError(f"expected float images in [0, 1], got dtype {x.dtype}.")

    def encoder_features(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder features feeding the logits conv: ``[B, F, gh, gw]`` for images in [0, 1]."""
        self._check_input(x)
        return self.encoder.features(map_pixels(x, self.config.pixel_eps))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Float32 token logits ``[B, K, gh, gw]`` for images ``[B, C, H, W]`` in [0, 1]."""
        return self.encoder.logits_from_features(self.encoder_features(x))

    def embed(self, z: torch.Tensor) -> torch.Tensor:
        """Mix code embeddings by a (soft) one-hot ``z: [B, K, gh, gw]`` -> ``[B, D, gh, gw]``."""
        with _float32_region(z.device):
            # [B, gh, gw, K] @ [K, D] -> [B, gh, gw, D]; the permute back gives a channels_last
            # tensor for free.
            e = z.float().permute(0, 2, 3, 1) @ self.codebook.weight.float()
        return e.permute(0, 3, 1, 2)

    def decode_stats(self, e: torch.Tensor) -> torch.Tensor:
        """Decoder output ``[B, out_chans, H, W]`` (float32) for embeddings ``[B, D, gh, gw]``."""
        return self.decoder(e).float()

    def stats_to_image(self, stats: torch.Tensor) -> torch.Tensor:
        """Decoder statistics -> reconstruction in ``[0, 1]``."""
        c = self.config.in_chans
        if self.config.recon_loss == "logit_laplace":
            # The location parameter lives in logit space of the mapped pixel range.
            return unmap_pixels(torch.sigmoid(stats[:, :c]), self.config.pixel_eps)
        return torch.sigmoid(stats[:, :c])

    def reconstruction_loss(self, stats: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Float32 reconstruction loss of decoder ``stats`` against images ``x`` in [0, 1]."""
        cfg = self.config
        stats, x = stats.float(), x.float()
        c = cfg.in_chans
        if cfg.recon_loss == "logit_laplace":
            # Logit-Laplace density on y = map_pixels(x) in (0, 1):
            #   p(y | mu, b) = exp(-|logit(y) - mu| / b) / (2 b y (1 - y))
            # -> NLL = |logit(y) - mu| / b + log(2b) + log(y) + log(1 - y). The last two terms do
            # not depend on the model but keep the value a true NLL (it can be negative).
            y = map_pixels(x, cfg.pixel_eps)
            mu = stats[:, :c]
            # Clamp the log-scale so one saturated pixel cannot produce inf/NaN early on.
            log_b = stats[:, c : 2 * c].clamp(-7.0, 7.0)
            nll = (
                (torch.logit(y) - mu).abs() * torch.exp(-log_b)
                + log_b
                + math.log(2.0)
                + torch.log(y)
                + torch.log1p(-y)
            )
            return nll.mean()
        recon = torch.sigmoid(stats[:, :c])
        if cfg.recon_loss == "l1":
            return F.l1_loss(recon, x)
        return F.mse_loss(recon, x)

    @staticmethod
    def kl_to_uniform(logits: torch.Tensor) -> torch.Tensor:
        """KL(softmax(logits) || U(K)) = log K - H(q), averaged over grid cells (float32)."""
        return _prior_kls(F.log_softmax(logits.float(), dim=1))[0]

    @staticmethod
    def usage_kl_to_uniform(logits: torch.Tensor) -> torch.Tensor:
        """KL(q_bar || U(K)) = log K - H(q_bar) for the batch-average code distribution q_bar."""
        return _prior_kls(F.log_softmax(logits.float(), dim=1))[1]

    def forward(self, x: torch.Tensor, temperature: float = 1.0, hard: bool = False) -> DVAEOutput:
        """Encode, relax with Gumbel-softmax, decode, and compute the losses.

        Args:
            x: Images ``[B, C, H, W]`` in ``[0, 1]``.
            temperature: Gumbel-softmax temperature (anneal it with
                :func:`beitdomain.tokenizer.schedule.gumbel_temperature`).
            hard: Straight-through one-hot samples in the forward pass.

        Returns:
            :class:`DVAEOutput`; call ``out.loss(kl_weight)`` for the objective.
        """
        logits = self.logits(x)  # [B, K, gh, gw] float32
        z = gumbel_softmax(logits, temperature, hard=hard)
        stats = self.decode_stats(self.embed(z))
        kl, usage_kl = _prior_kls(F.log_softmax(logits, dim=1))
        return DVAEOutput(
            recon=self.stats_to_image(stats),
            logits=logits,
            recon_loss=self.reconstruction_loss(stats, x),
            kl=kl,
            usage_kl=usage_kl,
        )

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Visual tokens ``[B, gh, gw]`` int64 in ``[0, K)``: argmax of the logits, no sampling.

        Works under ``torch.inference_mode()`` and autocast.
        """
        # The first maximum, as argmax; on a CPU `max(dim).indices` is 2-3x faster than
        # `argmax` (64 x 256 codes x 8 x 8: 0.40 against 0.96 ms channels_last), fastest where
        # the codes are the innermost dim in memory (a channels_last tokenizer).
        return self.logits(x).max(dim=1).indices

    @torch.no_grad()
    def decode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Images ``[B, C, H, W]`` in ``[0, 1]`` from tokens ``[B, gh, gw]`` (int)."""
        if tokens.ndim != 3 or tokens.is_floating_point():
            raise ValueError(
                f"expected integer tokens [B, gh, gw], got {tuple(tokens.shape)} {tokens.dtype}."
            )
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= self.vocab_size:
            raise ValueError(
                f"token ids must be in [0, {self.vocab_size}); got range [{lo}, {hi}]."
            )
        with _float32_region(tokens.device):
            e = self.codebook(tokens).float()  # [B, gh, gw, D]
        return self.stats_to_image(self.decode_stats(e.permute(0, 3, 1, 2)))
