"""Tokenizer weights on disk: safetensors + JSON.

A saved tokenizer is a directory holding

* ``tokenizer.safetensors``: the ``DiscreteVAE`` state dict (no pickle, safe to load from
  anyone), and
* ``tokenizer.json``: format name and version, the architecture config, and the pixel
  convention, so a loader can rebuild the model and check it before touching the weights.

OpenAI's pickled DALL-E dVAE is converted into this format once, by
:mod:`beitdomain.tokenizer.dalle`.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from beitdomain.fileio import atomic_write_safetensors, atomic_write_text, make_dirs
from beitdomain.tokenizer.dvae import DiscreteVAE, DVAEConfig
from beitdomain.user import UserError

__all__ = [
    "CONFIG_FILE",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "WEIGHTS_FILE",
    "TokenizerFileError",
    "TokenizerFileMissing",
    "load_tokenizer",
    "load_tokenizer_config",
    "load_tokenizer_extra",
    "save_tokenizer",
]

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "tokenizer.safetensors"
CONFIG_FILE = "tokenizer.json"
FORMAT_NAME = "beitdomain-dvae-tokenizer"
FORMAT_VERSION = 1


def save_tokenizer(
    model: DiscreteVAE, out_dir: str | os.PathLike[str], extra: dict[str, Any] | None = None
) -> Path:
    """Write ``tokenizer.safetensors`` and ``tokenizer.json`` into ``out_dir``.

    Args:
        model: The tokenizer to save (any device/dtype; weights are written from CPU).
        out_dir: Directory, created if missing; existing tokenizer files are replaced.
        extra: JSON-serialisable provenance to record (e.g. training steps, data, source).

    Returns:
        ``out_dir`` as a :class:`~pathlib.Path`.
    """
    out = Path(out_dir)
    make_dirs(out, "save the tokenizer")
    cfg = model.config
    meta = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "architecture": "DiscreteVAE",
        "config": cfg.to_dict(),
        "vocab_size": cfg.vocab_size,
        "input_size": cfg.input_size,
        "in_chans": cfg.in_chans,
        "grid_size": cfg.grid_size,
        "normalization": {
            "input": "float images in [0, 1], shape [B, C, H, W]",
            "map_pixels_eps": cfg.pixel_eps,
        },
        "extra": extra or {},
    }
    # Each file written whole or not at all (a crash or a full disk leaves the previous one, and
    # a clear WriteError naming the file).
    atomic_write_safetensors(out / WEIGHTS_FILE, model.state_dict(), {"format": FORMAT_NAME})
    atomic_write_text(out / CONFIG_FILE, json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return out


class TokenizerFileError(UserError):
    """A tokenizer file (or DALL-E pickle) that cannot be used; the message names it."""


class TokenizerFileMissing(FileNotFoundError, TokenizerFileError):
    """A tokenizer file that does not exist."""


def _resolve(path: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Map a directory or either file to the ``(json, safetensors)`` pair."""
    p = Path(path)
    if p.is_dir():
        base = p
    elif p.name in (WEIGHTS_FILE, CONFIG_FILE) or p.suffix in (".json", ".safetensors"):
        base = p.parent
    elif not p.exists():
        raise TokenizerFileMissing(f"tokenizer path {p} does not exist.")
    else:
        raise TokenizerFileError(
            f"{p} is not a tokenizer: pass the directory holding {CONFIG_FILE} and "
            f"{WEIGHTS_FILE}, or one of those files."
        )
    json_path, weights_path = base / CONFIG_FILE, base / WEIGHTS_FILE
    for f in (json_path, weights_path):
        if not f.is_file():
            raise TokenizerFileMissing(
                f"{f} not found: a saved tokenizer needs both {CONFIG_FILE} and {WEIGHTS_FILE} "
                f"in {base} (written by beitdomain.tokenizer.io.save_tokenizer)."
            )
    return json_path, weights_path


def load_tokenizer_config(path: str | os.PathLike[str]) -> DVAEConfig:
    """Read and validate a saved tokenizer's config without loading its weights.

    Args:
        path: The tokenizer directory, or its ``tokenizer.json`` / ``tokenizer.safetensors``.

    Raises:
        FileNotFoundError: If a file is missing.
        ValueError: If ``tokenizer.json`` is malformed, of another format or a newer version.
    """
    json_path, _ = _resolve(path)
    try:
        meta = json.loads(json_path.read_text())
    except json.JSONDecodeError as e:
        raise TokenizerFileError(f"{json_path} is not valid JSON: {e}") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise TokenizerFileError(
            f"{json_path}: field 'format' is {found!r}, expected {FORMAT_NAME!r}."
        )
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
        raise TokenizerFileError(
            f"{json_path}: format_version {version!r} is not supported by this beitdomain "
            f"(reads 1..{FORMAT_VERSION}); upgrade beitdomain to load it."
        )
    if not isinstance(meta.get("config"), dict):
        raise TokenizerFileError(f"{json_path}: field 'config' is missing or not an object.")
    cfg = DVAEConfig.from_dict(meta["config"], source=str(json_path))
    for key in ("vocab_size", "input_size", "in_chans"):
        if key in meta and meta[key] != getattr(cfg, key):
            raise TokenizerFileError(
                f"{json_path}: field {key!r}={meta[key]!r} disagrees with "
                f"config.{key}={getattr(cfg, key)!r}; the file was edited inconsistently."
            )
    return cfg


def load_tokenizer_extra(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The provenance a saved tokenizer records (``save_tokenizer(..., extra=...)``)."""
    load_tokenizer_config(path)  # validates the file first
    json_path, _ = _resolve(path)
    extra = json.loads(json_path.read_text()).get("extra")
    return extra if isinstance(extra, dict) else {}


def load_tokenizer(
    path: str | os.PathLike[str], map_location: str | torch.device = "cpu"
) -> DiscreteVAE:
    """Load a tokenizer written by :func:`save_tokenizer`, in eval mode.

    Args:
        path: The tokenizer directory, or its ``tokenizer.json`` / ``tokenizer.safetensors``.
        map_location: Device to load the weights onto.

    Raises:
        FileNotFoundError: If a file is missing.
        ValueError: If a file is malformed or the weights do not match the config; the message
            names the file.
    """
    json_path, weights_path = _resolve(path)
    cfg = load_tokenizer_config(json_path)
    try:
        state = load_file(str(weights_path), device=str(map_location))
    except (SafetensorError, OSError) as e:
        raise TokenizerFileError(f"{weights_path} is not a readable safetensors file: {e}") from e
    model = DiscreteVAE(cfg)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise TokenizerFileError(
            f"{weights_path} does not match the architecture in {json_path.name}: "
            f"missing {len(missing)} tensor(s) {missing[:5]}, unexpected {len(unexpected)} "
            f"{unexpected[:5]}."
        )
    for key, tensor in state.items():
        if tensor.shape != expected[key].shape:
            raise TokenizerFileError(
                f"{weights_path}: tensor {key!r} has shape {tuple(tensor.shape)}, the config in "
                f"{json_path.name} needs {tuple(expected[key].shape)}."
            )
    model.load_state_dict(state)
    return model.to(map_location).eval()


def warn_size_change(trained: int, used: int, where: str) -> bool:
    """Warns when a tokenizer trained on `trained`-px views is used on `used`-px ones.

    The grid check passes whenever the sizes divide alike, so a tokenizer trained at 16 px
    ran at 32 px without a word; its codes describe structures at another scale there.
    Returns whether it warned.
    """
    if trained == used:
        return False
    logging.getLogger(__name__).warning(
        "tokenizer %s was trained on %d px views but is used on %d px views "
        "(data.tokenizer_size): its codes were learned at another scale, so its tokens "
        "mean something else here. Set data.tokenizer_size=%d, or train a tokenizer at %d px.",
        where,
        trained,
        used,
        trained,
        used,
    )
    return True
