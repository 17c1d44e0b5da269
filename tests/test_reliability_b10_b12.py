"""Issue 40 items B10, B11 (rest), B12: an output folder that cannot be created, a full disk
under `data cache`, and a damaged cache are each one sentence naming the file, never a
traceback (or a SIGBUS), and leave nothing half-written behind."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pytest
from helpers import (
    PRETRAIN_SETS,
    TOKENIZER_SETS,
    cli,
    flat,
    recipe,
    said,
    sets_to_args,
    write_tiny_tokenizer,
)


def _images(root: Path, n: int = 3, size: int = 16) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img = rng.integers(0, 255, (size, size), dtype=np.uint8)
            Image.fromarray(img).save(root / label / f"{i}.png")
    return root


def _one_error_line(res, path: Path) -> None:
    """The CLI said one `error:` sentence naming `path`, exited 2, and showed no traceback."""
    assert res.exit_code == 2, (res.exception, res.output)
    assert isinstance(res.exception, SystemExit), res.exception
    assert "Traceback" not in res.output
    text = flat(res.output)
    assert text.startswith("error:") and text.count("error:") == 1, res.output
    assert said(res.output, str(path)), res.output


# --------------------------------------------------------------------------------------------
# B11: an output folder that cannot be created (under a regular file: fails as root too)
# --------------------------------------------------------------------------------------------


def _pretrain_run(tmp_path: Path) -> Path:
    """A pre-training run folder holding only what `pretrain export` reads: the recipe and
    the MIM weights (a fresh tiny pixel-target model; no training needed)."""
    from beitdomain.config import dump_recipe
    from beitdomain.engine.job import MIM_FILE, RECIPE_FILE
    from beitdomain.engine.pretrain import build_mim
    from beitdomain.fileio import atomic_write_safetensors

    r = recipe([*PRETRAIN_SETS, "model.target=pixels"])
    model, _ = build_mim(r, 1)
    run = tmp_path / "run"
    run.mkdir()
    dump_recipe(r, run / RECIPE_FILE)
    atomic_write_safetensors(run / MIM_FILE, model.state_dict())
    return run


def _cli_data_cache(tmp_path: Path, out: Path):
    return cli("data", "cache", str(_images(tmp_path / "data")), "--out", str(out), "--size", "16")


def _cli_tokenizer_encode(tmp_path: Path, out: Path):
    tok = write_tiny_tokenizer(tmp_path / "tok")
    image = _images(tmp_path / "data", n=1) / "a" / "0.png"
    return cli("tokenizer", "encode", str(tok), str(image), "--out", str(out))


def _cli_pretrain_export(tmp_path: Path, out: Path):
    return cli("pretrain", "export", str(_pretrain_run(tmp_path)), "--out", str(out))


def _cli_pretrain_export_timm(tmp_path: Path, out: Path):
    run = _pretrain_run(tmp_path)
    return cli("pretrain", "export", str(run), "--format", "timm", "--out", str(out))


def _save_tokenizer(tmp_path: Path, out: Path):
    write_tiny_tokenizer(out)


def _demo_images(tmp_path: Path, out: Path, monkeypatch):
    from PIL import Image

    from beitdomain.engine import demo

    src = tmp_path / "elpv"
    (src / "images").mkdir(parents=True)
    lines = []
    for i in range(10):
        Image.fromarray(np.full((8, 8), i, np.uint8)).save(src / "images" / f"cell{i}.png")
        lines.append(f"images/cell{i}.png {1.0 if i % 2 else 0.0} mono")
    (src / "labels.csv").write_text("\n".join(lines) + "\n")
    monkeypatch.setattr(demo, "elpv_folder", lambda: src)
    demo.export_elpv(out)


def _reconstruction_grid(tmp_path: Path, out: Path):
    import torch

    from beitdomain.tokenizer import create_tokenizer
    from beitdomain.tokenizer.inspect import save_reconstruction_grid

    model = create_tokenizer("tiny", in_chans=1, input_size=32)
    save_reconstruction_grid(model, torch.rand(2, 1, 32, 32), out / "recon.png")


def _code_usage_plot(tmp_path: Path, out: Path):
    from beitdomain.tokenizer.inspect import plot_code_usage

    plot_code_usage([3, 0, 1, 2], out / "usage.png")


CLI_SITES = {
    "data cache": _cli_data_cache,
    "tokenizer encode": _cli_tokenizer_encode,
    "pretrain export": _cli_pretrain_export,
    "pretrain export --format timm": _cli_pretrain_export_timm,
}
LIBRARY_SITES = {
    "save_tokenizer": _save_tokenizer,
    "demo's ELPV copy": _demo_images,
    "reconstruction grid": _reconstruction_grid,
    "code usage plot": _code_usage_plot,
}


@pytest.mark.parametrize("site", [*CLI_SITES, *LIBRARY_SITES])
def test_an_output_folder_that_cannot_be_created_is_one_sentence_naming_it(
    site, tmp_path, monkeypatch
):
    from beitdomain.fileio import WriteError

    blocker = tmp_path / "a-file"
    blocker.write_text("a regular file, so no folder can be made under it (even as root)")
    out = blocker / "out"
    if site in CLI_SITES:
        res = CLI_SITES[site](tmp_path, out)
        _one_error_line(res, out)
        assert said(res.output, "could not create the folder")
        assert "[Errno" not in res.output  # the sentence says why; no errno tag before it
        return
    make = LIBRARY_SITES[site]
    args = (tmp_path, out, monkeypatch) if make is _demo_images else (tmp_path, out)
    with pytest.raises(WriteError) as e:
        make(*args)
    msg = str(e.value)
    assert "could not create the folder" in msg and str(out) in msg and "\n" not in msg
    assert msg.startswith("could not") and e.value.errno == errno.ENOTDIR
    assert blocker.read_text().startswith("a regular file")


# --------------------------------------------------------------------------------------------
# B12: a damaged cache is refused as it opens, naming the file and what is wrong
# --------------------------------------------------------------------------------------------


def _cache(tmp_path: Path, name: str = "c") -> Path:
    from beitdomain.data.cache import build_cache

    data = tmp_path / "data"
    if not data.is_dir():
        _images(data)
    return build_cache(data, tmp_path / name, size=40).cache_dir


def _truncate_images(c: Path) -> None:
    with open(c / "images.npy", "r+b") as f:
        f.truncate(1000)  # 6 images of 40x40 need 9728 bytes


def _shrink_images(c: Path) -> None:
    np.save(c / "images.npy", np.load(c / "images.npy")[:2])  # a valid file, 2 of 6 rows


def _images_of_another_dtype(c: Path) -> None:
    np.save(c / "images.npy", np.load(c / "images.npy").astype(np.float32))


def _items_past_the_images(c: Path) -> None:
    items = np.load(c / "items.npy")
    items[3, 0] = 99
    np.save(c / "items.npy", items)


def _items_past_the_files(c: Path) -> None:
    items = np.load(c / "items.npy")
    items[1, 1] = -1
    np.save(c / "items.npy", items)


def _items_pickled(c: Path) -> None:
    np.save(c / "items.npy", np.array([object()] * 3, dtype=object), allow_pickle=True)


def _items_of_another_shape(c: Path) -> None:
    np.save(c / "items.npy", np.load(c / "items.npy")[:, :2])


def _record_cut_short(c: Path) -> None:
    text = (c / "cache.json").read_text()
    (c / "cache.json").write_text(text[: len(text) // 2])


DAMAGE = {
    "images.npy truncated": (_truncate_images, "images.npy", "is cut short: 1000 bytes"),
    "images.npy shrunk": (
        _shrink_images,
        "items.npy",
        "points at image row 2 (images.npy holds 2)",
    ),
    "images.npy another dtype": (_images_of_another_dtype, "images.npy", "holds float32"),
    "items.npy past the images": (
        _items_past_the_images,
        "items.npy",
        "row 3 points at image row 99",
    ),
    "items.npy past the files": (_items_past_the_files, "items.npy", "row 1 points at file -1"),
    "items.npy pickled": (_items_pickled, "items.npy", "cannot be read as an array"),
    "items.npy another shape": (_items_of_another_shape, "items.npy", "not [N, 3]"),
    "cache.json cut short": (_record_cut_short, "cache.json", "cannot be read as a cache record"),
}


@pytest.mark.parametrize("damage", DAMAGE)
@pytest.mark.parametrize("verify", [True, False])
def test_a_damaged_cache_is_refused_as_it_opens_naming_the_file(damage, verify, tmp_path):
    from beitdomain.data.cache import CachedImages, CacheError

    c = _cache(tmp_path)
    assert len(CachedImages(c)) == 6  # intact, it opens
    spoil, file, what = DAMAGE[damage]
    spoil(c)
    with pytest.raises(CacheError) as e:
        CachedImages(c, verify=verify)
    msg = str(e.value)
    assert str(c / file) in msg and what in msg, msg
    assert "beitdomain data cache" in msg  # how to fix it


def test_building_over_a_damaged_cache_rebuilds_it(tmp_path):
    from beitdomain.data.cache import build_cache

    c = _cache(tmp_path)
    first = np.load(c / "images.npy")
    _truncate_images(c)
    again = build_cache(tmp_path / "data", c, size=40)
    assert not again.reused  # a damaged cache is never taken for a fresh one
    assert np.array_equal(np.load(c / "images.npy"), first)


def test_training_on_a_damaged_cache_is_one_sentence_and_leaves_no_running_run(tmp_path):
    import json

    c = _cache(tmp_path)
    _truncate_images(c)
    out = tmp_path / "r12"
    res = cli(
        "tokenizer",
        "train",
        "--cache",
        str(c),
        "--steps",
        "1",
        "--out",
        str(out),
        *sets_to_args(TOKENIZER_SETS),
    )
    _one_error_line(res, c / "images.npy")
    assert said(res.output, "is cut short")
    manifest = out / "manifest.json"
    assert not manifest.exists() or json.loads(manifest.read_text())["status"] != "running"


# --------------------------------------------------------------------------------------------
# B10: a full disk under `data cache` is a sentence, not a SIGBUS, and leaves no partial file
# --------------------------------------------------------------------------------------------


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_under_data_cache_is_one_sentence_and_leaves_no_partial_file(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(os, "posix_fallocate", _no_space, raising=False)
    out = tmp_path / "c"
    res = _cli_data_cache(tmp_path, out)
    _one_error_line(res, out / "images.npy")
    assert said(res.output, "No space left on device", "MiB needed for 6 images", "MiB free")
    assert not out.exists()  # the build made the folder, and took it back with its files


def test_where_fallocate_is_not_supported_the_space_is_reserved_by_writing(tmp_path, monkeypatch):
    from beitdomain.data.cache import build_cache

    data = _images(tmp_path / "data")
    expected = np.load(build_cache(data, tmp_path / "plain", size=40).cache_dir / "images.npy")
    calls = []

    def unsupported(fd, offset, length):
        calls.append(length)
        raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))

    monkeypatch.setattr(os, "posix_fallocate", unsupported, raising=False)
    c = build_cache(data, tmp_path / "written", size=40).cache_dir
    assert calls == [6 * 40 * 40]  # asked for the pixels' bytes, then wrote them as zeros
    assert np.array_equal(np.load(c / "images.npy"), expected)


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to name an fd")
def test_a_full_disk_met_while_writing_the_reserve_is_a_write_error(tmp_path, monkeypatch):
    from beitdomain.data.cache import build_cache
    from beitdomain.fileio import WriteError

    real_fsync = os.fsync

    def fsync(fd):  # a file system that allocates late says ENOSPC when the data is synced
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".images.partial.npy"):
            _no_space()
        real_fsync(fd)

    monkeypatch.delattr(os, "posix_fallocate", raising=False)
    monkeypatch.setattr(os, "fsync", fsync)
    out = tmp_path / "c"
    with pytest.raises(WriteError, match="No space left on device") as e:
        build_cache(_images(tmp_path / "data"), out, size=40)
    assert str(out / "images.npy") in str(e.value)
    assert not (out / ".images.partial.npy").exists()


def test_a_full_disk_writing_items_npy_is_a_write_error_naming_it(tmp_path, monkeypatch):
    import beitdomain.data.cache as cache_mod
    from beitdomain.fileio import WriteError

    monkeypatch.setattr(cache_mod.np, "save", _no_space)
    out = tmp_path / "c"
    with pytest.raises(WriteError, match="No space left on device") as e:
        cache_mod.build_cache(_images(tmp_path / "data"), out, size=40)
    assert str(out / "items.npy") in str(e.value)
    assert not out.exists()  # the build made the folder, and took it back with its files
