"""The errors, the load report and the names every part of the weight import shares."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from beitdomain.user import UserError

RPB = "relative_position_bias_table"
SHARED_RPB = f"rel_pos_bias.{RPB}"
# Target keys that are expected to be absent from a backbone checkpoint (fresh heads / norms).
_FRESH = re.compile(r"^(head\.|lm_head\.|fc_norm\.|norm\.|mask_token$)")
_BLOCK_RPB = re.compile(rf"^blocks\.(\d+)\.attn\.{RPB}$")


class WeightsError(UserError):
    """A checkpoint that cannot be read, or does not fit the model."""


@dataclass
class LoadReport:
    """What `load_backbone_weights` did, key by key (target keys in canonical, timm-style names).

    Attributes:
        source: the file, folder or "<state dict>".
        format: detected layout: "unilm", "timm", "hf" or "beitdomain".
        loaded: target keys filled from the checkpoint (as is or reshaped).
        missing: target keys the checkpoint did not provide (left as initialized).
        unexpected: checkpoint keys (their own names) that were not used.
        reshaped: "key: (old shape) -> (new shape), how" for adapted tensors.
        mismatched: "key: checkpoint (shape) vs model (shape)" for tensors that could not be
            adapted (not loaded).
        ignored: derived checkpoint entries that are recomputed, e.g. relative_position_index.
        notes: other things worth knowing (new head, shared bias copied, config differences).
        reinitialized: target keys deliberately left freshly initialized although the checkpoint
            has them (a MIM head whose codes mean nothing to the new tokenizer, a head of
            another size).
        input: the input convention set on the model (`InputConvention.to_dict()`) and
            `input["source"]`, where it came from.
    """

    source: str
    format: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    reshaped: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    reinitialized: list[str] = field(default_factory=list)
    input: dict[str, Any] = field(default_factory=dict)
    model_depth: int | None = field(default=None, repr=False)

    @property
    def missing_backbone(self) -> list[str]:
        """Missing keys other than heads, final norms and the mask token."""
        return [k for k in self.missing if not _FRESH.match(k)]

    def problems(self) -> list[str]:
        """Reasons this load does not give a pre-trained backbone (empty when it does)."""
        out = []
        if self.missing_backbone:
            out.append(
                f"backbone keys missing from the checkpoint: {_short(self.missing_backbone)}"
            )
        bad = [m for m in self.mismatched if not _FRESH.match(m.split(":")[0])]
        if bad:
            out.append(f"backbone keys with incompatible shapes: {_short(bad)}")
        extra_blocks = [
            k
            for k in self.unexpected
            if (m := re.search(r"(?:blocks|layers?)\.(\d+)\.", k))
            and (self.model_depth is None or int(m.group(1)) >= self.model_depth)
        ]
        if extra_blocks:
            out.append(f"checkpoint blocks the model does not have: {_short(extra_blocks)}")
        return out

    def __str__(self) -> str:
        lines = [
            f"Loaded {len(self.loaded)} tensors from {self.source} ({self.format} format)",
        ]
        if self.input:
            lines.append(
                f"  input: mean {self.input['mean']}, std {self.input['std']} on [0, 1] images "
                f"({self.input.get('source', '')})"
            )
        sections = [
            ("reshaped", self.reshaped),
            ("missing (kept initialization)", self.missing),
            ("unexpected (not used)", self.unexpected),
            ("incompatible shapes (not loaded)", self.mismatched),
            ("ignored (recomputed)", self.ignored),
            ("re-initialized", self.reinitialized),
            ("notes", self.notes),
        ]
        for title, items in sections:
            if items:
                lines.append(f"  {title}: {len(items)}")
                lines.extend(f"    - {item}" for item in items)
        return "\n".join(lines)


def _short(items: list[str], n: int = 6) -> str:
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more
