"""Hub names for `--init`: `hf-hub:org/name[@revision]` and timm model names, resolved to a local
folder through huggingface_hub (downloaded when online, read from the local cache offline).

* `hf-hub:microsoft/beit-base-patch16-224-pt22k` (a transformers repo) or
  `hf-hub:timm/beit_base_patch16_224.in22k_ft_in22k_in1k` (a timm repo): the repo's weights and
  JSON files (config, image processor), which carry the input convention.
* `beit_base_patch16_224.in22k_ft_in22k_in1k` (a timm name, tag optional): timm's registry names
  the hub repo (`pretrained_cfg.hf_hub_id`); its mean/std come with it.

Offline (`HF_HUB_OFFLINE=1`) nothing is fetched; a name missing from the cache is an error that
says so. `HF_HOME` / `HF_HUB_CACHE` are read at call time.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from beitdomain.models.convert import WeightsError

HF_PREFIX = "hf-hub:"
# What a BEiT checkpoint folder needs (not every file of the repo, e.g. TF / Flax weights).
_PATTERNS = ["*.json", "model.safetensors", "pytorch_model.bin", "*.pth"]


@dataclass(frozen=True)
class ResolvedInit:
    """A local checkpoint path and, for timm names, the registry's mean / std."""

    path: str
    name: str
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    @property
    def note(self) -> str:
        return f"{self.name} resolved to {self.path}"


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _cache_dir() -> str | None:
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return str(Path(os.environ["HF_HOME"]) / "hub")
    return None


def _snapshot(repo: str, revision: str | None, name: str) -> str:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise WeightsError(
            f"--init {name} needs huggingface_hub (pip install huggingface_hub)"
        ) from None
    try:
        folder = snapshot_download(
            repo,
            revision=revision,
            allow_patterns=_PATTERNS,
            cache_dir=_cache_dir(),
            local_files_only=_offline(),
        )
    except Exception as e:  # huggingface_hub raises several types (offline, 404, auth, network)
        where = "the local cache (HF_HUB_OFFLINE is set)" if _offline() else "the Hugging Face hub"
        raise WeightsError(
            f"--init {name}: cannot get {repo} from {where}: {type(e).__name__}: {e}. "
            "Check the name, or download it once online (huggingface-cli download " + repo + ")"
        ) from None
    return folder


def _timm_cfg(name: str) -> Any | None:
    try:
        import timm
        from timm.models import get_pretrained_cfg
    except ImportError:  # pragma: no cover - timm is a core dependency
        return None
    arch = name.split(".", 1)[0]
    if not arch.startswith("beit") or not timm.is_model(arch):
        return None
    try:
        return get_pretrained_cfg(name)
    except Exception:  # unknown tag: let the caller list what exists
        return None


def locate_weights(init: str) -> ResolvedInit:
    """Where a checkpoint's weights are: a local path stays as it is; a hub or timm name
    becomes a local folder. Every other kind of `--init` (scratch, `timm:<arch>`, run folders)
    is `engine.build.resolve_init`'s, which calls this for names.

    Raises:
        WeightsError: an unknown name, a name not in the cache offline, or a failed download.
    """
    if Path(init).exists():
        return ResolvedInit(path=init, name=init)
    if init.startswith(HF_PREFIX):
        repo = init[len(HF_PREFIX) :]
        repo, _, revision = repo.partition("@")
        if repo.count("/") != 1:
            raise WeightsError(f"--init {init}: expected hf-hub:org/name[@revision]")
        return ResolvedInit(path=_snapshot(repo, revision or None, init), name=init)
    cfg = _timm_cfg(init)
    if cfg is not None:
        if not cfg.hf_hub_id:
            raise WeightsError(f"--init {init}: timm has no Hugging Face hub copy of these weights")
        repo, _, revision = cfg.hf_hub_id.partition("@")
        folder = _snapshot(repo, revision or None, init)
        return ResolvedInit(
            path=folder, name=init, mean=tuple(cfg.mean or ()), std=tuple(cfg.std or ())
        )
    hint = ""
    try:
        import timm

        arch = init.split(".", 1)[0]
        if timm.is_model(arch) or "beit" in init:
            hint = f"; timm BEiT names: {timm.list_pretrained('beit*')[:6]} ..."
    except ImportError:  # pragma: no cover
        pass
    raise WeightsError(
        f"--init {init}: no such file or folder, and not a hub name (hf-hub:org/name) or a "
        f"timm BEiT model name{hint}"
    )
