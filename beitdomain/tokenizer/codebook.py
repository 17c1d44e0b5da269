"""Codebook health: measure how many visual tokens are in use, and revive dead ones.

Why this matters for BEiT: the tokenizer's codes are the classification targets of masked image
modeling. A codebook that has collapsed onto a handful of codes turns MIM into a trivial
few-class problem and the backbone learns little. Domain images (a CT series, a slide scan) are
far less diverse than ImageNet, so collapse is the common failure when training a domain
tokenizer, and it is silent: the reconstruction loss can still look fine.

Remedy (:func:`reinit_dead_codes`): a dead code is re-seeded by *splitting* a live one, in the
spirit of k-means / LBG codebook splitting. For each dead code ``k`` we take a live encoder
feature ``h`` (from the current data), find the code ``c`` that currently wins there, and set

* logits-conv row ``k`` to row ``c`` plus a term along ``h - mean(features of c)``, with the
  bias chosen so that ``k`` beats ``c`` exactly where a feature is nearer ``h`` than the centre
  of ``c``'s features (details in :func:`reinit_dead_codes`); and
* codebook (decoder embedding) row ``k`` to a copy of row ``c``,

so the revived code immediately wins on a real region of feature space (it will be sampled and
receive gradients) while reconstructions are unchanged at the moment of the split (both halves
decode the same way); training then pulls the two codes apart. Re-initialising only the
embedding, as is common for VQ-VAEs, does not work for a dVAE: which code is chosen is decided by
the encoder's logits conv, so a dead code's row there must change too.
"""

from __future__ import annotations

import logging
import warnings
from typing import NamedTuple

import torch

from beitdomain.tokenizer.dvae import DiscreteVAE

__all__ = [
    "CodeUsage",
    "CodebookCollapseWarning",
    "check_codebook_usage",
    "reinit_dead_codes",
    "reset_optimizer_rows",
]

logger = logging.getLogger(__name__)

# A seed nearer its parent's anchor than this (times the features' spread) cannot split it.
_SEED_APART = 1e-12


class CodebookCollapseWarning(UserWarning):
    """Emitted when only a small fraction of the codebook is in use."""


class CodeUsage:
    """Accumulates how often each of ``vocab_size`` codes is chosen.

    The counts live on ``device`` (that of the model whose tokens are counted), so counting a
    batch needs no host transfer and a multi-GPU run can all-reduce them over NCCL, which has
    no CPU tensors. :meth:`update` moves them to the tokens' device if they differ, and
    :meth:`to` moves them explicitly.

    Args:
        vocab_size: Number of codes K.
        device: Where the counts live (default: the CPU).

    Example:
        >>> usage = CodeUsage(64)
        >>> usage.update(torch.tensor([[[0, 1], [1, 1]]]))
        >>> usage.fraction_used
        0.03125
    """

    def __init__(self, vocab_size: int, device: torch.device | str | None = None) -> None:
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {vocab_size}.")
        self.vocab_size = vocab_size
        self.counts = torch.zeros(vocab_size, dtype=torch.long, device=device)

    def to(self, device: torch.device | str) -> CodeUsage:
        """Moves the counts to ``device`` (a no-op when they are there); returns ``self``."""
        self.counts = self.counts.to(device)
        return self

    def reset(self) -> None:
        """Forget all counts (e.g. at the start of each logging window)."""
        self.counts.zero_()

    def update(self, tokens_or_logits: torch.Tensor) -> None:
        """Add a batch of token maps or logits.

        Args:
            tokens_or_logits: Integer tokens of any shape (e.g. ``[B, gh, gw]``) with values in
                ``[0, K)``, or float logits ``[B, K, gh, gw]`` (their argmax over dim 1 is
                counted).

        The counts follow the tokens' device. On an accelerator the update makes no host sync
        (a scatter-add rather than ``bincount``, whose CUDA kernel reads the maximum back), so
        the ids' range is checked on the CPU only; out-of-range ids on a GPU fail in the
        kernel's own index check instead.

        Raises:
            ValueError: On logits whose dim 1 is not K, or (on the CPU) token ids outside
                ``[0, K)``.
        """
        x = tokens_or_logits.detach()
        if x.is_floating_point():
            if x.ndim < 2 or x.shape[1] != self.vocab_size:
                raise ValueError(
                    f"logits must be [B, {self.vocab_size}, ...], got shape {tuple(x.shape)}."
                )
            x = x.argmax(dim=1)
        if x.device != self.counts.device:
            self.to(x.device)
        x = x.flatten().to(torch.long)
        if x.numel() == 0:
            return
        if x.device.type == "cpu":
            lo, hi = int(x.min()), int(x.max())
            if lo < 0 or hi >= self.vocab_size:
                raise ValueError(f"token ids must be in [0, {self.vocab_size}); got [{lo}, {hi}].")
            self.counts += torch.bincount(x, minlength=self.vocab_size)
        else:
            self.counts.scatter_add_(0, x, torch.ones_like(x))

    @property
    def total(self) -> int:
        """Number of tokens counted."""
        return int(self.counts.sum())

    @property
    def fraction_used(self) -> float:
        """Fraction of the K codes seen at least once (0.0 before any update)."""
        return float((self.counts > 0).sum()) / self.vocab_size

    @property
    def perplexity(self) -> float:
        """``exp(entropy)`` of the empirical code distribution: the effective number of codes.

        Ranges from 1 (one code) to K (all codes equally often); 0.0 before any update.
        """
        total = self.total
        if total == 0:
            return 0.0
        p = self.counts[self.counts > 0].double() / total
        return float(torch.exp(-(p * p.log()).sum()))

    def dead_codes(self, min_count: int = 1) -> torch.Tensor:
        """Indices (int64) of codes seen fewer than ``min_count`` times."""
        return torch.nonzero(self.counts < min_count).flatten()

    def summary(self) -> dict[str, float]:
        """Scalars for logging: ``fraction_used``, ``perplexity``, ``n_dead``, ``tokens``."""
        return {
            "fraction_used": self.fraction_used,
            "perplexity": self.perplexity,
            "n_dead": float(len(self.dead_codes())),
            "tokens": float(self.total),
        }


def check_codebook_usage(usage: CodeUsage, threshold: float = 0.10) -> str | None:
    """Warn loudly (``warnings`` + logging) if fewer than ``threshold`` of the codes are used.

    Args:
        usage: Counts over a recent window (a few thousand images is enough to judge).
        threshold: Minimum healthy fraction of codes in use.

    Returns:
        The warning message, or ``None`` when usage is healthy or nothing was counted yet.
    """
    if usage.total == 0 or usage.fraction_used >= threshold:
        return None
    n_used = int((usage.counts > 0).sum())
    msg = (
        f"CODEBOOK COLLAPSE: only {n_used} of {usage.vocab_size} codes "
        f"({100 * usage.fraction_used:.1f}%, below {100 * threshold:.0f}%) were used over "
        f"{usage.total} tokens; perplexity {usage.perplexity:.1f}. MIM targets built from this "
        "tokenizer carry little information. Remedies: re-seed dead codes "
        "(beitdomain.tokenizer.codebook.reinit_dead_codes), anneal the Gumbel temperature more "
        "slowly, raise the KL weight (it pulls code usage towards uniform), or use a smaller "
        "vocab_size."
    )
    logger.warning(msg)
    warnings.warn(msg, CodebookCollapseWarning, stacklevel=2)
    return msg


@torch.no_grad()
def reinit_dead_codes(
    model: DiscreteVAE,
    dead_idx: torch.Tensor | list[int],
    *,
    samples: torch.Tensor | None = None,
    features: torch.Tensor | None = None,
    margin: float = 4.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Re-seed dead codes by splitting live ones (see the module docstring for why).

    Give either ``samples`` (images, ``[B, C, H, W]`` in [0, 1]; their encoder features are
    computed here) or precomputed ``features`` (``[N, F]`` rows of
    :meth:`DiscreteVAE.encoder_features`). Each revived code consumes one distinct feature
    vector as its seed, so pass at least as many feature vectors as dead codes (``B * gh * gw``
    for images); codes left over when the seeds run out stay dead until a later call.

    Every code gets an anchor in feature space: the mean of the features it wins for a live
    code, the seed for a revived one. A code ``k`` split from parent ``q`` gets logits
    ``l_k(x) = l_q(x) + alpha * (|x - a_q|^2 - |x - h|^2)``, which is linear in ``x`` (so it is
    a row of the 1x1 conv) and wins over ``q`` exactly where ``x`` is nearer the seed ``h`` than
    the parent's anchor ``a_q``. Because these differences telescope, all codes descending from
    one parent split its region like nearest-anchor (Voronoi) cells, and later splits do not
    steal the regions of earlier ones. ``alpha`` is set once per call so that a typical feature
    (at the mean squared distance to its code's anchor) wins by ``margin`` nats.

    After this call, optimizer moments for the changed rows are stale; zero them with
    :func:`reset_optimizer_rows`.

    Args:
        model: The tokenizer; modified in place (encoder logits conv rows and codebook rows).
        dead_idx: Codes to revive, e.g. ``CodeUsage.dead_codes()``.
        samples: Current training images.
        features: Precomputed encoder features ``[N, F]``.
        margin: Typical logit margin (nats) of a revived code over its parent near its seed.
        generator: RNG for picking seed features.

    Returns:
        Indices (int64) of the codes actually revived.

    Raises:
        ValueError: If neither or both of ``samples`` and ``features`` are given, or shapes are
            wrong.
    """
    if (samples is None) == (features is None):
        raise ValueError("reinit_dead_codes needs exactly one of `samples` or `features`.")
    conv = model.encoder.logits_conv
    n_codes, n_feat = conv.weight.shape[:2]
    if features is None:
        h = model.encoder_features(samples)  # [B, F, gh, gw]
        features = h.permute(0, 2, 3, 1).reshape(-1, n_feat)
    if features.ndim != 2 or features.shape[1] != n_feat:
        raise ValueError(
            f"features must be [N, {n_feat}] (the logits conv's input width), "
            f"got {tuple(features.shape)}."
        )
    feats = features.float().to(conv.weight.device)  # [N, F]
    weight = conv.weight[:, :, 0, 0].float().clone()  # [K, F]
    bias = conv.bias.float().clone()  # [K]
    codebook = model.codebook.weight

    best, assign = (feats @ weight.T + bias).max(dim=1)  # [N], [N]: current winner per feature
    # anchors: [K, F], the mean feature each live code wins (zero for codes winning nothing).
    won = torch.bincount(assign, minlength=n_codes)  # [K]: features each code wins
    counts = won.clamp_min(1).to(feats.dtype)
    anchors = torch.zeros_like(weight).index_add_(0, assign, feats) / counts[:, None]
    spread_t = (feats - anchors[assign]).pow(2).sum(dim=1).mean()
    # One host read for the call: the spread and which codes win features now. A code passed
    # as dead that wins features after all is skipped; a code revived here only takes features
    # from others, so that is the same as asking each code in turn.
    spread, *won_host = torch.cat([spread_t.double().view(1), won.double()]).tolist()
    if spread <= 0.0:
        return torch.zeros(0, dtype=torch.long)  # all features identical: nothing to split
    alpha = margin / spread

    dead = set(torch.as_tensor(dead_idx, dtype=torch.long).flatten().tolist())
    todo = [k for k in sorted(dead) if won_host[k] == 0]
    order = torch.randperm(feats.shape[0], generator=generator).tolist()
    state = (weight, bias, anchors, best, assign)
    splits = _Splits(feats, codebook, todo, alpha, spread)
    on_device = _split_on_device([t.clone() for t in state], splits, list(order))
    if on_device is None:  # a seed sat on its parent's anchor: split code by code, reading each
        revived = _split_with_checks(state, splits, order)
    else:
        (weight, bias, *_), revived = on_device

    conv.weight[:, :, 0, 0] = weight.to(conv.weight.dtype)
    conv.bias.copy_(bias.to(conv.bias.dtype))
    if revived:
        logger.info("re-seeded %d dead codes by splitting live ones", len(revived))
    return torch.tensor(revived, dtype=torch.long)


@torch.no_grad()
def reset_optimizer_rows(
    optimizer: torch.optim.Optimizer, model: DiscreteVAE, code_idx: torch.Tensor
) -> None:
    """Zero optimizer state (e.g. Adam moments) for the rows of re-seeded codes.

    Stale second moments from the dead period would otherwise shrink or blow up the first
    updates of the revived rows.

    Args:
        optimizer: Optimizer over ``model``'s parameters.
        model: The tokenizer whose codes were re-seeded.
        code_idx: Indices returned by :func:`reinit_dead_codes`.
    """
    if len(code_idx) == 0:
        return
    params = [
        model.encoder.logits_conv.weight,
        model.encoder.logits_conv.bias,
        model.codebook.weight,
    ]
    for p in params:
        for value in optimizer.state.get(p, {}).values():
            # Per-element state has the parameter's shape; skip scalars such as `step`.
            if torch.is_tensor(value) and value.shape == p.shape:
                value[code_idx.to(value.device)] = 0


class _Splits(NamedTuple):
    """What both ways of splitting live codes are given; `order` (the seeds) and the winners'
    `state` (weight, bias, anchors, best, assign) are what a split changes."""

    feats: torch.Tensor  # [N, F]: the features the logits conv sees
    codebook: torch.Tensor  # [K, D]: a revived code's embedding becomes its parent's
    todo: list[int]  # the dead codes to revive, in order
    alpha: float  # margin / spread: the new logit's slope
    spread: float  # mean squared distance of a feature to its code's anchor


def _split_on_device(
    state: list[torch.Tensor], splits: _Splits, order: list[int]
) -> tuple[list[torch.Tensor], list[int]] | None:
    """Splits `todo`'s codes as `_split_with_checks` does, with no host read per code.

    Each code takes the next seed of `order`, and the code that seed's feature belongs to (its
    parent) is looked up on the device, so a GPU never waits for the host: the checked split
    read four values back per code, and a check may revive thousands. What only the host could
    decide, whether a seed sits on its parent's anchor (then it cannot split it, and the
    checked split tries the next seed), is read once at the end; if one did, None is returned
    with `codebook` untouched (`state` is a copy) for `_split_with_checks` to redo. Otherwise
    the results equal the checked split's, bit for bit.

    Returns:
        `state` (weight, bias, anchors, best, assign) after the splits, and the codes revived.
    """
    weight, bias, anchors, best, assign = state
    feats, codebook, todo, alpha, spread = splits
    revived = todo[: min(len(todo), len(order))]
    if not revived:
        return state, []
    root = torch.arange(weight.shape[0], device=weight.device)  # whose embedding each copies
    apart = []  # per code: |seed - parent's anchor|^2
    for k in revived:
        j = order.pop()
        q = assign[j : j + 1]  # [1]: the seed's current winner, on the device
        a_q = anchors.index_select(0, q)[0]  # [F]
        d = feats[j] - a_q  # [F]
        apart.append(d @ d)
        weight[k] = weight.index_select(0, q)[0] + 2.0 * alpha * d
        # Like the checked split's `alpha * float(...)`: the product in float64, then float32.
        bias[k : k + 1] = bias.index_select(0, q) - alpha * (d @ (feats[j] + a_q)).double()
        anchors[k] = feats[j]
        root[k : k + 1] = root.index_select(0, q)
        logit_k = feats @ weight[k] + bias[k]  # [N]
        wins = logit_k > best
        best = torch.where(wins, logit_k, best)
        assign = torch.where(wins, torch.full_like(assign, k), assign)
    if not bool((torch.stack(apart).double() > _SEED_APART * spread).all()):  # one host read
        return None
    # Same embedding as the parent: reconstructions do not change at the split. A parent
    # revived earlier in this call holds its own parent's, so every code copies its root's.
    rows = torch.tensor(revived, dtype=torch.long).to(codebook.device)
    codebook.index_copy_(0, rows, codebook.index_select(0, root[rows]))
    return [weight, bias, anchors, best, assign], revived


def _split_with_checks(
    state: tuple[torch.Tensor, ...], splits: _Splits, order: list[int]
) -> list[int]:
    """Splits `todo`'s codes in place, reading each seed's parent and distance on the host:
    a seed on its parent's anchor is passed over for the next one. Four host reads per code;
    `_split_on_device` gives the same results without them where no seed is passed over."""
    weight, bias, anchors, best, assign = state
    feats, codebook, todo, alpha, spread = splits
    revived: list[int] = []
    for k in todo:
        seed = None
        while order:
            j = order.pop()
            q = int(assign[j])
            d = feats[j] - anchors[q]  # [F]
            if float(d @ d) > _SEED_APART * spread:
                seed = (j, q, d)
                break
        if seed is None:
            break  # out of usable seeds; the rest stay dead until the next call
        j, q, d = seed
        # alpha * (|x - a|^2 - |x - h|^2) = 2 alpha (h - a).x - alpha (h - a).(h + a)
        weight[k] = weight[q] + 2.0 * alpha * d
        bias[k] = bias[q] - alpha * float(d @ (feats[j] + anchors[q]))
        anchors[k] = feats[j]
        # Same embedding as the parent: reconstructions do not change at the split.
        codebook[k] = codebook[q]
        # Only column k of the logits changed, so update the winners incrementally.
        logit_k = feats @ weight[k] + bias[k]  # [N]
        wins = logit_k > best
        best = torch.where(wins, logit_k, best)
        assign = torch.where(wins, torch.full_like(assign, k), assign)
        revived.append(k)
    return revived
