"""A one-time import of OpenAI's DALL-E dVAE into a :class:`DiscreteVAE`.

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
import logging
import os
import pickle
import re
import types
import warnings
from pathlib import Path
from typing import Any

import torch

from beitdomain.tokenizer.dvae import TOKENIZER_PRESETS, DiscreteVAE, DVAEConfig
from beitdomain.tokenizer.io import TokenizerFileError, TokenizerFileMissing
from beitdomain.user import UserError

__all__ = ["UntrustedPickleError", "import_dalle"]

logger = logging.getLogger(__name__)


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
