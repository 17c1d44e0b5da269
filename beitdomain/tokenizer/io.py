"""Tokenizer weights on disk: safetensors + JSON, and a one-time import of OpenAI's DALL-E dVAE.

A saved tokenizer is a directory holding

* ``tokenizer.safetensors``: the ``DiscreteVAE`` state dict (no pickle, safe to load from
  anyone), and
* ``tokenizer.json``: format name and version, the architecture config, and the pixel
  convention, so a loader can rebuild the model and check it before touching the weights.

OpenAI publishes the DALL-E dVAE as pickled whole modules (``encoder.pkl``, ``decoder.pkl``).
Unpickling can run arbitrary code, so :func:`import_dalle` refuses unless the caller says they
trust the files, and even then unpickles with an allow-list: modules are replaced by inert
stand-ins that only hold attributes, tensors are rebuilt by torch, and any other global (e.g.
``os.system``) aborts the load. Convert once, then ship the safetensors::

    model = import_dalle("encoder.pkl", "decoder.pkl", trust_pickle=True)
    save_tokenizer(model, "tokenizers/dalle")
"""

from __future__ import annotations

import _compat_pickle
import json
import logging
import os
import pickle
import re
import types
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from beitdomain.fileio import atomic_write_safetensors, atomic_write_text, make_dirs
from beitdomain.tokenizer.dvae import TOKENIZER_PRESETS, DiscreteVAE, DVAEConfig
from beitdomain.user import UserError

__all__ = [
    "CONFIG_FILE",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "WEIGHTS_FILE",
    "TokenizerFileError",
    "TokenizerFileMissing",
    "UntrustedPickleError",
    "import_dalle",
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


# ---------------------------------------------------------------------------------------------
# DALL-E import


class UntrustedPickleError(PermissionError, UserError):
    """Raised when asked to unpickle a file without ``trust_pickle=True``."""


class _StandIn:
    """Inert replacement for a pickled module: keeps its attributes, has no behaviour."""

    pickled_name = "?"

    def __setstate__(self, state: Any) -> None:
        # Plain objects pickle their __dict__; classes with __slots__ send (dict, slots).
        if isinstance(state, tuple) and len(state) == 2:
            state = {**(state[0] or {}), **(state[1] or {})}
        self.__dict__.update(state or {})


_STANDIN_TYPES: dict[str, type] = {}
# Modules whose classes become stand-ins. dall_e.* is OpenAI's package (may not be installed).
_STANDIN_MODULES = re.compile(r"^(dall_e(\..*)?|torch\.nn\.modules\..*)$")
# The only callables a pickled module tree needs: tensor/parameter rebuilding and containers.
_ALLOWED_GLOBALS = {
    ("torch._utils", "_rebuild_tensor"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"),
    ("torch._tensor", "_rebuild_from_type_v2"),
    ("torch.nn.parameter", "Parameter"),
    ("torch", "Tensor"),
    ("torch", "Size"),
    ("torch", "device"),
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "object"),
    ("copyreg", "_reconstructor"),
}


def _standin(module: str, name: str) -> type:
    key = f"{module}.{name}"
    if key not in _STANDIN_TYPES:
        _STANDIN_TYPES[key] = type(name, (_StandIn,), {"pickled_name": key})
    return _STANDIN_TYPES[key]


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only allow-listed globals (see ``_ALLOWED_GLOBALS``)."""

    def find_class(self, module: str, name: str) -> Any:
        # Protocol-2 pickles spell Python 2 names (__builtin__.set, copy_reg); pickle's own
        # find_class renames them, and so must we before checking the allow-list.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if _STANDIN_MODULES.match(module):
            return _standin(module, name)
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(
            f"refusing to load global {module}.{name}: it is not needed to read DALL-E dVAE "
            "weights, and loading it could run code."
        )


def _restricted_load(file: Any, **kwargs: Any) -> Any:
    return _RestrictedUnpickler(file, **kwargs).load()


# torch.load accepts a pickle "module": it subclasses our Unpickler (keeping find_class) and
# calls `load` for the legacy (non-zip) format header.
_RESTRICTED_PICKLE = types.ModuleType("beitdomain_restricted_pickle")
_RESTRICTED_PICKLE.Unpickler = _RestrictedUnpickler  # type: ignore[attr-defined]
_RESTRICTED_PICKLE.load = _restricted_load  # type: ignore[attr-defined]


def _collect_tensors(obj: Any, prefix: str, out: dict[str, torch.Tensor]) -> None:
    """Flatten a stand-in module tree into ``{"a.b.w": tensor}`` (parameters and buffers)."""
    d = vars(obj)
    for slot in ("_parameters", "_buffers"):
        for name, t in (d.get(slot) or {}).items():
            if t is not None:
                out[prefix + name] = t.detach()
    for name, child in (d.get("_modules") or {}).items():
        if child is not None:
            _collect_tensors(child, f"{prefix}{name}.", out)


def _read_dalle_pickle(path: Path, expected_class: str) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise TokenizerFileMissing(f"DALL-E {expected_class.lower()} pickle {path} not found.")
    try:
        with warnings.catch_warnings():
            # The legacy (pre-zip) format compares stored module source with the classes it
            # resolved; our stand-ins have none, which is expected.
            warnings.filterwarnings("ignore", message="Couldn't retrieve source code")
            obj = torch.load(
                path, map_location="cpu", pickle_module=_RESTRICTED_PICKLE, weights_only=False
            )
    except pickle.UnpicklingError as e:
        raise TokenizerFileError(f"{path}: {e}") from e
    if isinstance(obj, dict) and obj and all(torch.is_tensor(v) for v in obj.values()):
        return dict(obj)  # already a state dict
    if not isinstance(obj, _StandIn):
        raise TokenizerFileError(
            f"{path}: expected a pickled dall_e {expected_class}, found {type(obj)}."
        )
    if obj.pickled_name.rsplit(".", 1)[-1] != expected_class:
        raise TokenizerFileError(
            f"{path} holds a {obj.pickled_name}, expected a dall_e {expected_class}; "
            "are the encoder and decoder files swapped?"
        )
    tensors: dict[str, torch.Tensor] = {}
    _collect_tensors(obj, "", tensors)
    return tensors


_BLOCK_KEY = re.compile(
    r"^blocks\.group_(\d+)\.block_(\d+)\.(?:(id_path)|res_path\.(conv_\d))\.([wb])$"
)
_PARAM = {"w": "weight", "b": "bias"}


def _map_dalle_keys(src: dict[str, torch.Tensor], part: str, path: Path) -> dict[str, torch.Tensor]:
    """Rename ``blocks.*`` tensors of one DALL-E module to this package's ``part.*`` names."""
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, t in src.items():
        m = _BLOCK_KEY.match(key)
        if m:
            g, i, id_path, conv, p = m.groups()
            sub = "skip" if id_path else f"res.{conv}"
            out[f"{part}.groups.{int(g) - 1}.{int(i) - 1}.{sub}.{_PARAM[p]}"] = t
        elif key in ("blocks.output.conv.w", "blocks.output.conv.b"):
            # The encoder's head is the bare logits conv; the decoder's is (ReLU, conv).
            head = "head" if part == "encoder" else "head.conv"
            out[f"{part}.{head}.{_PARAM[key[-1]]}"] = t
        elif key in ("blocks.input.w", "blocks.input.b"):
            pass  # handled by the caller: encoder stem or decoder codebook
        else:
            unknown.append(key)
    if unknown:
        raise TokenizerFileError(
            f"{path}: unexpected tensors for a DALL-E {part}: {sorted(unknown)[:5]}."
        )
    return out


def _require(src: dict[str, torch.Tensor], key: str, path: Path) -> torch.Tensor:
    if key not in src:
        raise TokenizerFileError(
            f"{path}: tensor {key!r} is missing; is this a DALL-E dVAE pickle?"
        )
    return src[key]


def import_dalle(
    encoder_pkl: str | os.PathLike[str],
    decoder_pkl: str | os.PathLike[str],
    trust_pickle: bool = False,
    input_size: int = 112,
) -> DiscreteVAE:
    """Convert OpenAI's DALL-E dVAE pickles into a :class:`DiscreteVAE` (``"dalle"`` preset).

    The mapping is exact: the returned model's logits equal DALL-E's ``encoder(map_pixels(x))``
    and ``decode_tokens`` equals ``unmap_pixels(sigmoid(decoder(one_hot(z))[:, :3]))``. The
    decoder's input 1x1 conv becomes the codebook (its bias folded into every row). The
    architecture is read from the tensor shapes, so smaller models of the same layout work too.

    Args:
        encoder_pkl: ``encoder.pkl`` from the DALL-E release.
        decoder_pkl: ``decoder.pkl`` from the DALL-E release.
        trust_pickle: Must be ``True``: unpickling can execute code (CLI flag
            ``--trust-pickle``). Loading is additionally restricted to an allow-list.
        input_size: Image size the tokenizer will be used at (112 -> 14x14 tokens).

    Returns:
        The model in eval mode; save it with :func:`save_tokenizer` and use that afterwards.

    Raises:
        UntrustedPickleError: If ``trust_pickle`` is not ``True``.
        FileNotFoundError: If a file is missing.
        ValueError: If a file holds something other than the expected DALL-E module.
    """
    enc_path, dec_path = Path(encoder_pkl), Path(decoder_pkl)
    if trust_pickle is not True:
        raise UntrustedPickleError(
            f"refusing to unpickle {enc_path} and {dec_path}: pickle files can execute arbitrary "
            "code when loaded. If they come from a source you trust (the OpenAI DALL-E release), "
            "pass --trust-pickle (trust_pickle=True in Python); convert once with save_tokenizer "
            "and use the resulting safetensors from then on."
        )
    enc = _read_dalle_pickle(enc_path, "Encoder")
    dec = _read_dalle_pickle(dec_path, "Decoder")

    stem_w = _require(enc, "blocks.input.w", enc_path)  # [hidden, in_chans, k, k]
    logits_w = _require(enc, "blocks.output.conv.w", enc_path)  # [K, 8*hidden, 1, 1]
    dec_in_w = _require(dec, "blocks.input.w", dec_path)  # [n_init, K, 1, 1]
    dec_in_b = _require(dec, "blocks.input.b", dec_path)  # [n_init]
    dec_out_w = _require(dec, "blocks.output.conv.w", dec_path)  # [2*C, hidden, 1, 1]
    groups = {int(m.group(1)) for k in enc if (m := _BLOCK_KEY.match(k))}
    blocks = {int(m.group(2)) for k in enc if (m := _BLOCK_KEY.match(k)) and m.group(1) == "1"}
    n_groups = max(groups, default=0)
    if n_groups not in (3, 4) or groups != set(range(1, n_groups + 1)):
        raise TokenizerFileError(
            f"{enc_path}: found encoder groups {sorted(groups)}; expected 1..4 (or 1..3)."
        )
    vocab = logits_w.shape[0]
    if dec_in_w.shape[1] != vocab:
        raise TokenizerFileError(
            f"{dec_path}: decoder vocabulary {dec_in_w.shape[1]} != encoder vocabulary {vocab} "
            f"in {enc_path}; the two files are from different models."
        )
    in_chans = stem_w.shape[1]
    if dec_out_w.shape[0] != 2 * in_chans:
        raise TokenizerFileError(
            f"{dec_path}: decoder outputs {dec_out_w.shape[0]} channels, expected {2 * in_chans} "
            "(logit-Laplace mu and log-scale per image channel)."
        )
    cfg = DVAEConfig(
        in_chans=in_chans,
        vocab_size=vocab,
        hidden=stem_w.shape[0],
        n_blocks=len(blocks),
        downsample=2 ** (n_groups - 1),
        input_size=input_size,
        recon_loss="logit_laplace",
        codebook_dim=dec_in_w.shape[0],
        stem_kernel=stem_w.shape[-1],
        pixel_eps=0.1,  # DALL-E's logit_laplace_eps, used by its map_pixels
    )

    state = {
        "encoder.stem.weight": stem_w,
        "encoder.stem.bias": _require(enc, "blocks.input.b", enc_path),
        # Decoder input conv (vocab -> n_init, 1x1) as codebook rows; bias folded in (exact since
        # a one-hot or softmax sums to 1).
        "codebook.weight": dec_in_w[:, :, 0, 0].T + dec_in_b[None, :],
    }
    state |= _map_dalle_keys(enc, "encoder", enc_path)
    state |= _map_dalle_keys(dec, "decoder", dec_path)
    model = DiscreteVAE(cfg)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    bad_shapes = [k for k in state if k in expected and state[k].shape != expected[k].shape]
    if missing or bad_shapes:
        raise TokenizerFileError(
            f"{enc_path} / {dec_path} do not fit the DALL-E layout: missing {missing[:5]}, "
            f"shape mismatches {bad_shapes[:5]}."
        )
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    is_preset = cfg.to_dict() == {**TOKENIZER_PRESETS["dalle"].to_dict(), "input_size": input_size}
    logger.info(
        "imported DALL-E dVAE from %s / %s (%s)",
        enc_path,
        dec_path,
        "the 'dalle' preset" if is_preset else f"non-standard size: {cfg}",
    )
    return model.eval()


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
