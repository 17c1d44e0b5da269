"""Tests for tokenizer save/load and the DALL-E pickle import."""

from __future__ import annotations

import json
import math
import sys
import types
import warnings
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from beitdomain.tokenizer import create_tokenizer
from beitdomain.tokenizer.dalle import UntrustedPickleError, import_dalle
from beitdomain.tokenizer.io import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    load_tokenizer,
    load_tokenizer_config,
    save_tokenizer,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def saved(tmp_path: Path) -> tuple[nn.Module, Path]:
    torch.manual_seed(0)
    model = create_tokenizer("tiny", in_chans=1)
    return model, save_tokenizer(model, tmp_path / "tok", extra={"steps": 3})


# --- safetensors round trip --------------------------------------------------------------------


def test_round_trip_gives_identical_tokens(saved: tuple[nn.Module, Path]) -> None:
    model, out = saved
    assert sorted(p.name for p in out.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]
    meta = json.loads((out / CONFIG_FILE).read_text())
    assert meta["vocab_size"] == 64 and meta["in_chans"] == 1 and meta["input_size"] == 32
    assert meta["grid_size"] == 8 and meta["format_version"] == 1
    assert meta["normalization"]["map_pixels_eps"] == 0.1 and meta["extra"] == {"steps": 3}

    x = torch.rand(3, 1, 32, 32)
    for path in (out, out / CONFIG_FILE, out / WEIGHTS_FILE):
        loaded = load_tokenizer(path)
        assert not loaded.training
        assert loaded.config == model.config
        assert torch.equal(loaded.encode(x), model.encode(x))
        for key, value in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], value), key
    assert load_tokenizer_config(out) == model.config


def test_failed_save_keeps_the_previous_tokenizer(
    saved: tuple[nn.Module, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A full disk often shows only at fsync (delayed allocation): the new weights never
    # replace the old ones, the error names the file, and no temporary file is left.
    import errno
    import os

    from beitdomain.fileio import WriteError

    model, out = saved
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    torch.manual_seed(1)
    other = create_tokenizer("tiny", in_chans=1)

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(WriteError, match=f"{WEIGHTS_FILE}.*No space left on device"):
        save_tokenizer(other, out)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    x = torch.rand(2, 1, 32, 32)
    assert torch.equal(load_tokenizer(out).encode(x), model.encode(x))


def test_save_channels_last_model(tmp_path: Path) -> None:
    model = create_tokenizer("tiny").to(memory_format=torch.channels_last)
    x = torch.rand(2, 3, 32, 32)
    loaded = load_tokenizer(save_tokenizer(model, tmp_path))
    assert torch.equal(loaded.encode(x), model.encode(x))


def test_missing_file_is_named(saved: tuple[nn.Module, Path]) -> None:
    _, out = saved
    (out / WEIGHTS_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.safetensors not found"):
        load_tokenizer(out)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(out / "nowhere")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m.update(format="something-else"), r"field 'format' is 'something-else'"),
        (lambda m: m.update(format_version=99), r"format_version 99 is not supported"),
        (
            lambda m: m["config"].update(n_layers=3),
            r"unknown tokenizer config key\(s\) \['n_layers'\]",
        ),
        (lambda m: m["config"].update(downsample=5), r"DVAEConfig.downsample=5 is invalid"),
        (lambda m: m.update(vocab_size=65), r"'vocab_size'=65 disagrees"),
    ],
)
def test_bad_json_fields_are_reported_with_the_file(
    saved: tuple[nn.Module, Path], edit, message: str
) -> None:
    _, out = saved
    meta = json.loads((out / CONFIG_FILE).read_text())
    edit(meta)
    (out / CONFIG_FILE).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=message) as err:
        load_tokenizer(out)
    if "DVAEConfig" not in message:
        assert str(out / CONFIG_FILE) in str(err.value)


def test_weights_not_matching_config(saved: tuple[nn.Module, Path]) -> None:
    _, out = saved
    meta = json.loads((out / CONFIG_FILE).read_text())
    meta["config"]["vocab_size"] = meta["vocab_size"] = 128
    (out / CONFIG_FILE).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"tokenizer\.safetensors: tensor .* has shape"):
        load_tokenizer(out)


def test_corrupt_files(saved: tuple[nn.Module, Path]) -> None:
    _, out = saved
    (out / WEIGHTS_FILE).write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match=r"tokenizer\.safetensors is not a readable"):
        load_tokenizer(out)
    (out / CONFIG_FILE).write_text("{oops")
    with pytest.raises(ValueError, match=r"tokenizer\.json is not valid JSON"):
        load_tokenizer(out)


# --- DALL-E import -----------------------------------------------------------------------------
# A miniature of OpenAI's `dall_e` package with the same module paths and attribute names
# (blocks.input, blocks.group_1.block_1.res_path.conv_1, ...; conv weights `w` / `b`), written
# here so the test needs neither the package nor the 400 MB download.

N_HID, N_BLK, VOCAB, N_INIT, EPS = 8, 2, 32, 16, 0.1


def _fake_dall_e() -> dict[str, types.ModuleType]:
    mods = {n: types.ModuleType(n) for n in ("dall_e", "dall_e.utils", "dall_e.encoder")}
    mods["dall_e.decoder"] = types.ModuleType("dall_e.decoder")

    def place(cls: type, module: str) -> type:
        cls.__module__, cls.__qualname__ = module, cls.__name__
        setattr(mods[module], cls.__name__, cls)
        return cls

    class Conv2d(nn.Module):
        def __init__(self, n_in: int, n_out: int, kw: int) -> None:
            super().__init__()
            self.n_in, self.n_out, self.kw = n_in, n_out, kw
            self.device, self.requires_grad, self.use_float16 = torch.device("cpu"), False, True
            self.w = nn.Parameter(torch.randn(n_out, n_in, kw, kw) / math.sqrt(n_in * kw * kw))
            self.b = nn.Parameter(0.1 * torch.randn(n_out))  # non-zero to test the bias mapping

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.conv2d(x, self.w, self.b, padding=(self.kw - 1) // 2)

    def block_class(name: str, kernels: tuple[int, ...]) -> type:
        class Block(nn.Module):
            def __init__(self, n_in: int, n_out: int, n_layers: int) -> None:
                super().__init__()
                n_mid, self.post_gain = n_out // 4, 1 / n_layers**2
                self.id_path = Conv2d(n_in, n_out, 1) if n_in != n_out else nn.Identity()
                widths = [n_in, n_mid, n_mid, n_mid, n_out]
                layers = []
                for i, k in enumerate(kernels):
                    layers += [(f"relu_{i + 1}", nn.ReLU())]
                    layers += [(f"conv_{i + 1}", Conv2d(widths[i], widths[i + 1], k))]
                self.res_path = nn.Sequential(OrderedDict(layers))

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return self.id_path(x) + self.post_gain * self.res_path(x)

        Block.__name__ = name
        return Block

    def stack(widths: list[int], n_in: int, block: type, between: type) -> list:
        groups = []
        for g, width in enumerate(widths):
            items = []
            for i in range(N_BLK):
                items.append((f"block_{i + 1}", block(n_in, width, len(widths) * N_BLK)))
                n_in = width
            if g < len(widths) - 1:
                items.append(("pool" if between is nn.MaxPool2d else "upsample", between(2)))
            groups.append((f"group_{g + 1}", nn.Sequential(OrderedDict(items))))
        return groups

    place(Conv2d, "dall_e.utils")
    enc_block = place(block_class("EncoderBlock", (3, 3, 3, 1)), "dall_e.encoder")
    dec_block = place(block_class("DecoderBlock", (1, 3, 3, 3)), "dall_e.decoder")
    widths = [N_HID * 2**g for g in range(4)]

    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.vocab_size, self.device = VOCAB, torch.device("cpu")
            self.blocks = nn.Sequential(
                OrderedDict(
                    [
                        ("input", Conv2d(3, N_HID, 7)),
                        *stack(widths, N_HID, enc_block, nn.MaxPool2d),
                        (
                            "output",
                            nn.Sequential(
                                OrderedDict(relu=nn.ReLU(), conv=Conv2d(widths[-1], VOCAB, 1))
                            ),
                        ),
                    ]
                )
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.blocks(x)

    class Decoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.vocab_size, self.device = VOCAB, torch.device("cpu")
            upsample = lambda s: nn.Upsample(scale_factor=s, mode="nearest")  # noqa: E731
            upsample.__name__ = "Upsample"
            self.blocks = nn.Sequential(
                OrderedDict(
                    [
                        ("input", Conv2d(VOCAB, N_INIT, 1)),
                        *stack(widths[::-1], N_INIT, dec_block, upsample),
                        (
                            "output",
                            nn.Sequential(OrderedDict(relu=nn.ReLU(), conv=Conv2d(N_HID, 6, 1))),
                        ),
                    ]
                )
            )

        def forward(self, z: torch.Tensor) -> torch.Tensor:
            return self.blocks(z)

    place(Encoder, "dall_e.encoder")
    place(Decoder, "dall_e.decoder")
    return mods


@pytest.fixture(params=["zip", "legacy"])
def dalle_pickles(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Pickled fake DALL-E encoder/decoder in torch's zip or legacy (pre-1.6) format; `dall_e`
    is unimportable again when loading."""
    torch.manual_seed(0)
    zip_format = request.param == "zip"
    with monkeypatch.context() as mp, warnings.catch_warnings():
        # Saving whole modules in the legacy format warns that their source cannot be stored.
        warnings.simplefilter("ignore", UserWarning)
        for name, mod in _fake_dall_e().items():
            mp.setitem(sys.modules, name, mod)
        enc, dec = sys.modules["dall_e.encoder"].Encoder(), sys.modules["dall_e.decoder"].Decoder()
        for module, name in ((enc, "encoder.pkl"), (dec, "decoder.pkl")):
            torch.save(module, tmp_path / name, _use_new_zipfile_serialization=zip_format)
    assert "dall_e" not in sys.modules
    return enc, dec, tmp_path / "encoder.pkl", tmp_path / "decoder.pkl"


def test_import_dalle_refuses_without_trust(dalle_pickles) -> None:
    *_, enc_pkl, dec_pkl = dalle_pickles
    with pytest.raises(UntrustedPickleError, match="--trust-pickle") as err:
        import_dalle(enc_pkl, dec_pkl)
    assert "execute arbitrary code" in str(err.value) and str(enc_pkl) in str(err.value)
    with pytest.raises(UntrustedPickleError):
        import_dalle(enc_pkl, dec_pkl, trust_pickle="yes")  # only the literal True counts


def test_import_dalle_maps_weights_exactly(dalle_pickles, tmp_path: Path) -> None:
    enc, dec, enc_pkl, dec_pkl = dalle_pickles
    model = import_dalle(enc_pkl, dec_pkl, trust_pickle=True, input_size=32)
    cfg = model.config
    assert (cfg.hidden, cfg.n_blocks, cfg.vocab_size, cfg.codebook_dim) == (
        N_HID,
        N_BLK,
        VOCAB,
        N_INIT,
    )
    assert (cfg.downsample, cfg.stem_kernel, cfg.recon_loss) == (8, 7, "logit_laplace")
    assert "dall_e" not in sys.modules  # stand-ins were used, nothing was imported

    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        ref_logits = enc((1 - 2 * EPS) * x + EPS)  # DALL-E: encoder(map_pixels(x))
        torch.testing.assert_close(model.logits(x), ref_logits, rtol=1e-5, atol=1e-5)
        tokens = model.encode(x)
        assert torch.equal(tokens, ref_logits.argmax(1))
        # DALL-E: unmap_pixels(sigmoid(decoder(one_hot(z))[:, :3]))
        stats = dec(F.one_hot(tokens, VOCAB).permute(0, 3, 1, 2).float())
        ref_img = ((torch.sigmoid(stats[:, :3]) - EPS) / (1 - 2 * EPS)).clamp(0, 1)
        torch.testing.assert_close(model.decode_tokens(tokens), ref_img, rtol=1e-5, atol=1e-5)

    # Convert once: the safetensors copy gives the same tokens.
    loaded = load_tokenizer(save_tokenizer(model, tmp_path / "converted"))
    assert torch.equal(loaded.encode(x), tokens)


def test_import_dalle_detects_swapped_files(dalle_pickles) -> None:
    *_, enc_pkl, dec_pkl = dalle_pickles
    with pytest.raises(ValueError, match="swapped"):
        import_dalle(dec_pkl, enc_pkl, trust_pickle=True)


class _Evil:
    """Unpickling this would call open(path, "w") and create the file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_trusted_import_still_blocks_code_execution(tmp_path: Path, dalle_pickles) -> None:
    *_, _, dec_pkl = dalle_pickles
    marker = tmp_path / "pwned"
    torch.save({"blocks": _Evil(marker)}, tmp_path / "evil.pkl")
    with pytest.raises(ValueError, match=r"evil\.pkl: refusing to load global io\.open"):
        import_dalle(tmp_path / "evil.pkl", dec_pkl, trust_pickle=True)
    assert not marker.exists()
