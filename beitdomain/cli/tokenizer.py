"""`beitdomain tokenizer train|inspect|encode|import-dalle`: flags -> recipe -> one library call."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from beitdomain.cli import options as opt
from beitdomain.cli.common import console, handle_errors, load, load_job, run_job
from beitdomain.cli.output import print_kv, print_result, print_run

app = typer.Typer(
    help="Train, inspect and use the discrete-VAE tokenizer (BEiT's visual vocabulary).",
    no_args_is_help=True,
)


@app.command()
@handle_errors
@opt.grouped
def train(
    ctx: typer.Context,
    recipe: opt.RecipeOpt = None,
    data: opt.DataFlags = opt.offers("data", "cache", "on_error", "nonfinite"),
    preset: Annotated[
        str | None, typer.Option(help="Size preset: tiny, small (CPU), base (GPU), dalle.")
    ] = None,
    vocab_size: Annotated[int | None, typer.Option(help="Number of visual tokens K.")] = None,
    init: Annotated[
        Path | None, typer.Option(help="Continue from a previous tokenizer folder on new data.")
    ] = None,
    dalle: Annotated[
        Path | None,
        typer.Option(
            help="Start from OpenAI's DALL-E dVAE: a folder with encoder.pkl and decoder.pkl "
            "(needs --trust-pickle; converted once to safetensors in the run folder)."
        ),
    ] = None,
    trust_pickle: opt.TrustPickleOpt = False,
    transductive: opt.TransductiveOpt = False,
    train: opt.TrainFlags = opt.offers(),
    run: opt.RunFlags = opt.offers(),
) -> None:
    """Train a discrete VAE on your images, so BEiT's targets speak your domain's language.

    Writes tokenizer.safetensors + tokenizer.json (what `beitdomain pretrain --tokenizer`
    loads), reconstructions.png, code_usage.png, eval.json (held-out PSNR, codes used) and
    samples/ every tokenizer.sample_every steps.

    Examples:

        beitdomain tokenizer train --data /data/ct --out runs/tok

        beitdomain tokenizer train -r ct-dicom --cache /data/ct-cache --preset base --steps 20000

        beitdomain tokenizer train --data /new/scans --init runs/tok --out runs/tok2

        beitdomain tokenizer train --data /data/rgb --dalle ~/dall_e --trust-pickle
    """
    resuming = run.resuming()  # checked before any work
    r, out = load_job(
        ctx,
        "tokenizer",
        recipe,
        run,
        {
            **data.options(transductive=transductive),
            "tokenizer.preset": preset,
            "tokenizer.vocab_size": vocab_size,
            "tokenizer.init": str(init) if init else None,
            **train.options("tokenizer"),
        },
    )
    from beitdomain.engine.tokenizer import train_tokenizer

    if dalle is not None:
        r = _start_from_dalle(r, dalle, out, trust_pickle)
    result = run_job(ctx, train_tokenizer, r, out, **resuming, overwrite=run.overwrite)
    if result:
        print_run(
            "tokenizer",
            out,
            {
                "held-out PSNR (dB)": f"{result['psnr']:.2f}",
                "codes used": f"{100 * result['fraction_used']:.1f}%",
                "perplexity": f"{result['perplexity']:.1f}",
                "parameters": f"{result['params']:,}",
                "encoder GFLOP/image": f"{result['encoder_gflops']:.3f}",
            },
            result,
        )


def _start_from_dalle(r: Any, dalle: Path, out: Path, trust_pickle: bool) -> Any:
    """The recipe with tokenizer.init at DALL-E's dVAE, converted once beside `out`."""
    from dataclasses import replace

    from beitdomain.tokenizer.dalle import import_dalle
    from beitdomain.tokenizer.io import save_tokenizer

    converted = Path(out).parent / f"{Path(out).name}-dalle-init"
    if not (converted / "tokenizer.safetensors").is_file():
        model = import_dalle(
            dalle / "encoder.pkl", dalle / "decoder.pkl", trust_pickle=trust_pickle
        )
        save_tokenizer(model, converted, extra={"source": "OpenAI DALL-E dVAE", "from": str(dalle)})
        console.print(f"converted the DALL-E pickles once to {converted} (safetensors)")
    return replace(r, tokenizer=replace(r.tokenizer, init=str(converted)))


@app.command("inspect")
@handle_errors
@opt.grouped
def tokenizer_inspect(
    ctx: typer.Context,
    tokenizer: Annotated[Path, typer.Argument(help="Tokenizer folder or tokenizer.safetensors.")],
    data: opt.DataFlags = opt.offers("data", "cache", "on_error"),
    recipe: opt.RecipeOpt = None,
    sets: opt.SetOpt = None,
    n: Annotated[int, typer.Option(help="Images to evaluate on (sampled with the seed).")] = 256,
    out: Annotated[
        Path | None,
        typer.Option(
            help="Folder for the PNGs, inspect.json and the list of unreadable files "
            "(default: inspect/ in the tokenizer's folder)."
        ),
    ] = None,
) -> None:
    """Parameters and GFLOPs of a tokenizer; with --data or --cache, its code usage and PSNR
    on images. Everything it writes lands in --out.

    Examples:

        beitdomain tokenizer inspect runs/tok --data /data/ct/test --out runs/tok/inspect

        beitdomain tokenizer inspect runs/tok --cache ct-cache --on-error skip --out tok-check
    """
    import torch

    from beitdomain.data.source import image_source
    from beitdomain.data.unlabeled import EvalViews
    from beitdomain.fileio import atomic_write_json
    from beitdomain.tokenizer import count_params, decoder_gflops, encoder_gflops
    from beitdomain.tokenizer.inspect import (
        evaluate_tokenizer,
        plot_code_usage,
        save_reconstruction_grid,
    )
    from beitdomain.tokenizer.io import load_tokenizer

    model = load_tokenizer(tokenizer)
    cfg = model.config
    rows = {
        "vocabulary": cfg.vocab_size,
        "input": f"{cfg.in_chans} x {cfg.input_size} x {cfg.input_size}",
        "token grid": f"{cfg.grid_size} x {cfg.grid_size}",
        "parameters": f"{count_params(model):,}",
        "encoder GFLOP/image": f"{encoder_gflops(model):.3f}",
        "decoder GFLOP/image": f"{decoder_gflops(model):.3f}",
    }
    if data.data is not None or data.cache is not None:
        import numpy as np

        folder = (
            out
            or Path(tokenizer if Path(tokenizer).is_dir() else Path(tokenizer).parent) / "inspect"
        )
        options = {**data.options(), "data.in_chans": cfg.in_chans}
        r = load(ctx, recipe, sets, options)
        # With --on-error skip the unreadable files are listed in the output folder, not
        # beside the data.
        source, _ = image_source(r, report_dir=folder)
        idx = np.random.default_rng(r.seed).permutation(len(source))[:n]
        views = EvalViews(cfg.input_size, cfg.input_size)
        images = torch.stack([torch.from_numpy(views(source[int(i)], None)[1]) for i in idx])
        result = evaluate_tokenizer(model, images)
        counts = result.pop("usage_counts")
        rows.update(
            {
                "images": len(idx),
                "PSNR (dB)": f"{result['psnr']:.2f}",
                "codes used": f"{100 * result['fraction_used']:.1f}%",
                "perplexity": f"{result['perplexity']:.1f}",
            }
        )
        save_reconstruction_grid(model, images[:16], folder / "reconstructions.png")
        plot_code_usage(counts, folder / "code_usage.png")
        numbers = {  # the table's values as numbers, not as the table displays them
            "vocabulary": cfg.vocab_size,
            "input": [cfg.in_chans, cfg.input_size, cfg.input_size],
            "token_grid": [cfg.grid_size, cfg.grid_size],
            "parameters": count_params(model),
            "encoder_gflops_per_image": encoder_gflops(model),
            "decoder_gflops_per_image": decoder_gflops(model),
            "images": len(idx),
        }
        atomic_write_json(folder / "inspect.json", {**result, **numbers})
        rows["written"] = str(folder)
    print_kv(f"tokenizer {tokenizer}", rows)


@app.command()
@handle_errors
def encode(
    tokenizer: Annotated[Path, typer.Argument(help="Tokenizer folder or tokenizer.safetensors.")],
    images: Annotated[list[Path], typer.Argument(help="Image files (DICOM, TIFF, PNG, ...).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for <name>.npy token maps.")],
    png: Annotated[
        bool, typer.Option(help="Also write a coloured token-map PNG per image.")
    ] = False,
) -> None:
    """Token maps [gh, gw] (int16/int32 .npy) for images, through the same readers as training.

    Example:

        beitdomain tokenizer encode runs/tok scan1.dcm scan2.dcm --out tokens/ --png
    """
    from beitdomain.engine.tokenizer import encode_files
    from beitdomain.tokenizer.io import load_tokenizer

    written = encode_files(load_tokenizer(tokenizer), images, out, png=png)
    print_result(
        f"wrote {len(written)} token maps to {out}", {"token_maps": [str(p) for p in written]}
    )


@app.command("import-dalle")
@handle_errors
def import_dalle_cmd(
    encoder: Annotated[Path, typer.Argument(help="DALL-E encoder.pkl (local file).")],
    decoder: Annotated[Path, typer.Argument(help="DALL-E decoder.pkl (local file).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the converted tokenizer.")],
    trust_pickle: opt.TrustPickleOpt = False,
) -> None:
    """Convert OpenAI's DALL-E dVAE pickles once into a safetensors tokenizer.

    Pickles can run code when loaded, so this needs --trust-pickle; the result is plain
    safetensors that later commands load safely (e.g. --init for tokenizer train, or
    tokenizer.path for pretrain).

    Example:

        beitdomain tokenizer import-dalle encoder.pkl decoder.pkl --out dalle-tok --trust-pickle
    """
    from beitdomain.tokenizer.dalle import import_dalle
    from beitdomain.tokenizer.io import save_tokenizer

    model = import_dalle(encoder, decoder, trust_pickle=trust_pickle)
    save_tokenizer(model, out, extra={"source": "OpenAI DALL-E dVAE", "encoder": encoder.name})
    print_result(
        f"converted to {out}/tokenizer.safetensors (load it without --trust-pickle)",
        {"tokenizer": str(Path(out) / "tokenizer.safetensors")},
    )
