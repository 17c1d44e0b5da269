"""Reading checkpoint files: safetensors, `torch.load` (weights only unless trusted), HF and
timm folders."""

from __future__ import annotations

import argparse
import json
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from beitdomain.models.convert.report import WeightsError


def _torch_load(path: Path, trust_pickle: bool) -> Any:
    try:
        # unilm checkpoints may carry their argparse.Namespace; it holds only plain values.
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if not trust_pickle:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise WeightsError(
                f"{path} cannot be read as plain tensors (weights_only=True): {reason}. "
                "Loading it needs full pickle, which can run arbitrary code; if you trust the "
                "file, pass --trust-pickle (trust_pickle=True), or convert it to safetensors."
            ) from None
        return torch.load(path, map_location="cpu", weights_only=False)


def read_checkpoint(
    path_or_state: str | Path | Mapping[str, Any], *, trust_pickle: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None, str]:
    """Reads a checkpoint into a flat `{name: tensor}` dict.

    Args:
        path_or_state: a `.safetensors` / `.pth` / `.pt` / `.bin` file, a Hugging Face model
            folder (`model.safetensors` or `pytorch_model.bin`, plus `config.json`), or an
            in-memory state dict.
        trust_pickle: allow full pickle for files that are not plain tensors.

    Returns:
        `(state, hf_config, source)`: tensors, the HF `config.json` contents if any, and a
        description of the source for reports.

    Raises:
        WeightsError: missing file, unreadable pickle, no tensors found.
    """
    hf_config = None
    if isinstance(path_or_state, Mapping):
        raw: Any = path_or_state
        source = "<state dict>"
    else:
        path = Path(path_or_state)
        source = str(path)
        if path.is_dir():
            cfg_path = path / "config.json"
            if cfg_path.is_file():
                hf_config = json.loads(cfg_path.read_text())
            for name in ("model.safetensors", "pytorch_model.bin"):
                if (path / name).is_file():
                    path = path / name
                    break
            else:
                found = sorted(p.name for p in path.iterdir())[:10]
                raise WeightsError(
                    f"{path} is a folder without model.safetensors or pytorch_model.bin "
                    f"(found: {found}); pass the weights file itself"
                )
        elif not path.is_file():
            raise WeightsError(f"checkpoint {path} does not exist")
        if path.suffix == ".safetensors":
            try:
                raw = load_file(str(path))
            except (SafetensorError, OSError) as e:
                raise WeightsError(
                    f"{path} is not a readable safetensors file ({e}); nothing was loaded. A "
                    f"PyTorch pickle renamed .safetensors is refused: give it its real .pth "
                    f"name (loading a pickle needs --trust-pickle, for trusted files only)"
                ) from None
        else:
            raw = _torch_load(path, trust_pickle)
    state = _unwrap(raw)
    if not state:
        raise WeightsError(f"no tensors found in {source}")
    return state, hf_config, source


def _unwrap(raw: Any) -> dict[str, torch.Tensor]:
    # Training checkpoints nest the weights: {'model': ..., 'optimizer': ...} (unilm, ours),
    # {'module': ...} (DeepSpeed / BEiT v2), {'state_dict': ...} (Lightning).
    if isinstance(raw, Mapping):
        for key in ("model", "module", "state_dict"):
            inner = raw.get(key)
            if isinstance(inner, Mapping) and any(torch.is_tensor(v) for v in inner.values()):
                return _unwrap(inner)
        return {str(k): v for k, v in raw.items() if torch.is_tensor(v)}
    raise WeightsError(f"checkpoint holds a {type(raw).__name__}, not a state dict")
