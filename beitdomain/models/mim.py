"""BEiT masked image modeling on a timm `Beit`: mask tokens in, predictions for masked patches out.

Flow per batch:
    images [B, C, H, W] in [0, 1] --input_norm (the weights' own mean/std)--> patch_embed
    --> [B, L, D] --masked -> mask_token--> + cls, pos
    --timm blocks (shared or per-block rel. pos. bias)--> norm --gather masked--> [N, D]
    --lm_head--> [N, V] (visual-token logits) or [N, P] (normalized pixels, the paper's ablation)

Only masked positions reach the head (`N = mask.sum()`), so with a 40% mask and an 8192-word
vocabulary the head costs 40% of a full-sequence head, and no logits are computed that the loss
would throw away. For the same reason the last block runs its queries, output projection, MLP
and the final norm on the masked tokens only (keys and values still come from every token); see
`BeitMIM.forward`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models.beit import Beit
from torch import nn
from torch.utils.checkpoint import checkpoint

from beitdomain.models.attention import attention_at
from beitdomain.models.backbone import BackboneConfig, create_backbone
from beitdomain.models.convention import InputNorm
from beitdomain.models.residual import residual_add

MimTarget = Literal["tokens", "pixels"]


def _compiling() -> bool:
    """Whether torch.compile is tracing this code (torch >= 2.3; earlier: never known)."""
    is_compiling = getattr(torch.compiler, "is_compiling", None)
    return bool(is_compiling is not None and is_compiling())


class BeitMIM(nn.Module):
    """BEiT pre-training model: a timm `Beit` with a mask token and a head on masked patches.

    The backbone must put its final LayerNorm on every token (`create_backbone(cfg,
    final_norm="tokens")`, key `norm.*`), as unilm's pre-training model does. State-dict keys are
    `backbone.<timm Beit keys>`, `mask_token`, `lm_head.*` (the head keeps unilm's name for
    both targets) and `input_norm.mean` / `input_norm.std` (the input convention, see
    `models.convention`; images arrive in [0, 1]).

    Args:
        backbone: the timm `Beit`.
        target: "tokens" = classify each masked patch into `vocab_size` visual tokens
            (cross-entropy); "pixels" = regress each masked patch's pixels (MSE).
        vocab_size: tokenizer vocabulary size (target="tokens").
        norm_pix_loss: for target="pixels", normalize each target patch by its own mean and
            variance (MAE); otherwise regress raw (already input-normalized) pixels.
    """

    def __init__(
        self,
        backbone: Beit,
        *,
        target: MimTarget = "tokens",
        vocab_size: int = 8192,
        norm_pix_loss: bool = True,
    ) -> None:
        super().__init__()
        if target not in ("tokens", "pixels"):
            raise ValueError(f"target must be 'tokens' or 'pixels', got {target!r}")
        if isinstance(backbone.norm, nn.Identity):
            raise ValueError(
                "BeitMIM needs a backbone with a LayerNorm on every token; build it with "
                "create_backbone(cfg, final_norm='tokens') (this one pools before its norm)"
            )
        self.backbone = backbone
        self.target = target
        self.norm_pix_loss = norm_pix_loss
        self.patch_size: int = backbone.patch_embed.patch_size[0]
        self.in_chans: int = backbone.patch_embed.proj.in_channels
        dim = backbone.embed_dim
        out_dim = vocab_size if target == "tokens" else self.patch_size**2 * self.in_chans
        self.vocab_size = vocab_size if target == "tokens" else None
        self.input_norm = InputNorm(self.in_chans)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.lm_head = nn.Linear(dim, out_dim)
        trunc_normal_(self.mask_token, std=0.02)
        trunc_normal_(self.lm_head.weight, std=0.02)
        nn.init.zeros_(self.lm_head.bias)

    @classmethod
    def from_config(cls, cfg: BackboneConfig, **options: Any) -> BeitMIM:
        """Builds the backbone from `cfg` (token-level final norm) and wraps it; `options` are
        the constructor's (`target`, `vocab_size`, `norm_pix_loss`)."""
        return cls(create_backbone(cfg, final_norm="tokens"), **options)

    @property
    def num_patches(self) -> int:
        """Patch tokens per image (L)."""
        return self.backbone.patch_embed.num_patches

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in backward (timm's flag, honoured by `encode`)."""
        self.backbone.set_grad_checkpointing(enable)

    def _flat_mask(self, mask: torch.Tensor, batch: int) -> torch.Tensor:
        # mask: [B, L] or [B, gh, gw], True = masked  ->  [B, L] bool
        mask = mask.reshape(mask.shape[0], -1)
        if mask.shape != (batch, self.num_patches):
            raise ValueError(
                f"mask has shape {tuple(mask.shape)}, expected ({batch}, {self.num_patches}) "
                f"(batch, patches) or ({batch}, *grid) for {self.backbone.patch_embed.grid_size}"
            )
        return mask.bool()

    def _embed(self, images: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Patch embedding with masked patches swapped for the mask token, + cls (+ pos)."""
        bb = self.backbone
        x = bb.patch_embed(self.input_norm(images))  # [B, L, D]
        if mask is not None:
            x = torch.where(mask.unsqueeze(-1), self.mask_token.to(x.dtype), x)
        # As timm's Beit.forward_features, with the mask tokens swapped in before cls/pos.
        x = torch.cat((bb.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x), dim=1)
        if bb.pos_embed is not None:
            x = x + bb.pos_embed
        return bb.pos_drop(x)  # [B, 1 + L, D]

    def _run_blocks(
        self, x: torch.Tensor, blocks: Sequence[nn.Module], rel_pos_bias: torch.Tensor | None
    ) -> torch.Tensor:
        for blk in blocks:
            if self.backbone.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(blk, x, rel_pos_bias, use_reentrant=False)
            else:
                x = blk(x, shared_rel_pos_bias=rel_pos_bias)
        return x

    def _rel_pos_bias(self) -> torch.Tensor | None:
        # [heads, 1 + L, 1 + L]. timm's Attention adds it as SDPA's float `attn_mask`; an
        # additive float mask rules out the FlashAttention kernel, so on CUDA SDPA runs the
        # memory-efficient (or cuDNN) kernel, which supports a bias and its gradient.
        bb = self.backbone
        if bb.rel_pos_bias is None:
            return None
        bias = bb.rel_pos_bias()
        kind = bias.device.type
        if torch.is_autocast_enabled(kind):
            # In the scores' dtype: a float32 bias would promote the add, the softmax and their
            # backward to float32 (~2x slower attention on a CPU; SDPA casts it on CUDA anyway).
            bias = bias.to(torch.get_autocast_dtype(kind))
        return bias

    def encode(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Runs the backbone with masked patches replaced by the mask token.

        Args:
            images: `[B, C, H, W]`.
            mask: `[B, L]` (or `[B, gh, gw]`) bool, True = masked; None = nothing masked.

        Returns:
            Normalized tokens `[B, 1 + L, D]`, cls first.
        """
        if mask is not None:
            mask = self._flat_mask(mask, images.shape[0])
        x = self._embed(images, mask)
        x = self._run_blocks(x, self.backbone.blocks, self._rel_pos_bias())
        return self.backbone.norm(x)

    def forward(
        self, images: torch.Tensor, mask: torch.Tensor, num_masked: int | None = None
    ) -> torch.Tensor:
        """Predictions for the masked patches, in row-major (batch, patch) order.

        The head only needs the last block's outputs at masked positions. Attention must still
        see every token as keys and values, but its queries, its output projection, the MLP
        and the final norm are per-token, so they run on the masked tokens only (40% of them
        with BEiT's mask; `models.attention.attention_at`). The result equals
        `lm_head(encode(images, mask)[:, 1:][mask])`; drop path draws one value per image either
        way. It needs the same masked count in every image (what both mask generators give);
        otherwise the full last block runs.

        Args:
            images: `[B, C, H, W]`.
            mask: `[B, L]` (or `[B, gh, gw]`) bool, True = masked.
            num_masked: the masked count of every image, when the caller knows it (the mask
                generator's exact count): the step then never waits on the device to learn it.
                None: counted from `mask` (one host sync on a GPU).

        Returns:
            `[N, V]` token logits or `[N, P]` pixel predictions, `N = mask.sum()`,
            `P = patch_size**2 * in_chans` (pixels ordered (py, px, c)).
        """
        return self._predict(images, self._flat_mask(mask, images.shape[0]), num_masked)[0]

    @staticmethod
    def masked_positions(mask: torch.Tensor, num_masked: int) -> torch.Tensor:
        """`[B, L]` bool with `num_masked` True per row -> their patch indices `[B, M]`, ascending.

        A stable sort of fixed output size: unlike `mask.nonzero()`, whose size depends on the
        data, it needs no host sync on a GPU.
        """
        return torch.argsort((~mask).to(torch.uint8), dim=1, stable=True)[:, :num_masked]

    def _predict(
        self, images: torch.Tensor, mask: torch.Tensor, num_masked: int | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(predictions `[N, V or P]`, masked patch indices `[B, M]` or None on the full path)."""
        bb = self.backbone
        if num_masked is None:
            counts = mask.sum(1)
            if bool((counts != counts[0]).any()):
                num_masked = -1  # unequal counts: the full last block
            else:
                num_masked = int(counts[0])
        elif (
            mask.device.type == "cpu"
            and not _compiling()
            and bool((mask.sum(1) != num_masked).any())
        ):
            # Checked where it costs no device round trip (and no graph break under
            # torch.compile); a wrong count would pair predictions with the wrong targets.
            raise ValueError(f"num_masked={num_masked} but the masks hold {mask.sum(1).tolist()}")
        x = self._embed(images, mask)
        rel_pos_bias = self._rel_pos_bias()
        x = self._run_blocks(x, bb.blocks[:-1], rel_pos_bias)
        if num_masked < 0:
            x = self._run_blocks(x, bb.blocks[-1:], rel_pos_bias)
            return self.lm_head(bb.norm(x)[:, 1:][mask]), None  # [N, D] -> [N, V or P]
        last = bb.blocks[-1]
        pos = self.masked_positions(mask, num_masked)  # [B, M]
        idx = pos + 1  # token positions, after cls
        xq = x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # [B, M, D]
        h = attention_at(last.attn, last.norm1(x), idx, rel_pos_bias)
        x = residual_add(xq, h, last.gamma_1, last.drop_path1)
        x = residual_add(x, last.mlp(last.norm2(x)), last.gamma_2, last.drop_path2)
        return self.lm_head(bb.norm(x).flatten(0, 1)), pos  # [N, D] -> [N, V or P]

    def patchify(self, images: torch.Tensor) -> torch.Tensor:
        """`[B, C, H, W]` -> `[B, L, p*p*C]` in the patch order of `patch_embed`."""
        b, c, h, w = images.shape
        p = self.patch_size
        x = images.reshape(b, c, h // p, p, w // p, p)
        return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p * c)

    def pixel_targets(self, images: torch.Tensor) -> torch.Tensor:
        """Per-patch regression targets `[B, L, P]` (float32), normalized per patch if set."""
        target = self.patchify(images.float())
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6).sqrt()
        return target

    def loss(
        self,
        images: torch.Tensor,
        mask: torch.Tensor,
        targets: torch.Tensor | None = None,
        num_masked: int | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """MIM loss on masked patches only.

        Args:
            images: `[B, C, H, W]`.
            mask: `[B, L]` (or `[B, gh, gw]`) bool, True = masked.
            targets: target="tokens": visual-token ids, either for every patch `[B, L]` (or
                `[B, gh, gw]`) or already for the masked ones `[N]`. target="pixels": unused
                (None), targets are computed from `images`.
            num_masked: as `forward`; with it, no step of the loss waits on the device.

        Returns:
            `(loss, metrics)`; metrics are detached 0-dim tensors (no host sync):
            "loss", "acc" (masked-token accuracy, tokens only), "mse" (pixels only),
            "num_masked".
        """
        mask = self._flat_mask(mask, images.shape[0])
        preds, pos = self._predict(images, mask, num_masked)  # [N, V or P], [B, M] or None

        def at_masked(per_patch: torch.Tensor) -> torch.Tensor:
            # [B, L, ...] -> [N, ...] in the predictions' order
            if pos is None:
                return per_patch[mask]
            index = pos.view(*pos.shape, *([1] * (per_patch.dim() - 2)))
            return per_patch.gather(1, index.expand(-1, -1, *per_patch.shape[2:])).flatten(0, 1)

        # A fill on the device, not `torch.tensor(n, device=...)`: that copies from the host,
        # which on a GPU waits for the forward queued before it.
        count = torch.full((), preds.shape[0], dtype=torch.long, device=preds.device)
        if self.target == "pixels":
            target = at_masked(self.pixel_targets(images))  # [N, P]
            loss = F.mse_loss(preds.float(), target)
            return loss, {"loss": loss.detach(), "mse": loss.detach(), "num_masked": count}

        if targets is None:
            raise ValueError("target='tokens' needs visual-token targets, got None")
        if targets.shape[0] == mask.shape[0] and targets.numel() == mask.numel():
            targets = at_masked(targets.reshape(mask.shape))  # [B, L] -> [N]
        elif targets.shape != (preds.shape[0],):
            raise ValueError(
                f"targets has shape {tuple(targets.shape)}; expected {tuple(mask.shape)} "
                f"(every patch) or ({preds.shape[0]},) (masked patches only)"
            )
        targets = targets.long()
        logits = preds.float()  # exact from bf16, so the argmax is the same; fp32's is faster
        loss = F.cross_entropy(logits, targets)
        # `max(-1).indices` is argmax's first maximum, 2.5x faster on a CPU
        acc = (logits.detach().max(dim=-1).indices == targets).float().mean()
        return loss, {"loss": loss.detach(), "acc": acc, "num_masked": count}
