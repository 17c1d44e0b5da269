"""Tests for the discrete-VAE tokenizer model, its schedules, codebook tools and FLOP counts."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from beitdomain.tokenizer import (
    TOKENIZER_PRESETS,
    CodebookCollapseWarning,
    CodeUsage,
    DiscreteVAE,
    DVAEConfig,
    check_codebook_usage,
    count_params,
    create_tokenizer,
    encoder_gflops,
    gumbel_softmax,
    gumbel_temperature,
    kl_weight,
    psnr,
    reinit_dead_codes,
    reset_optimizer_rows,
    tokenizer_config,
)


def structured_images(n: int = 8, size: int = 32) -> torch.Tensor:
    """Colour gradients, stripes and discs: [n, 3, size, size] in [0, 1]."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    out = []
    for i in range(n):
        colour = torch.tensor([(i * 0.37) % 1, (i * 0.61) % 1, (i * 0.13 + 0.3) % 1]).view(3, 1, 1)
        pattern = [
            xx,
            (torch.sin(math.pi * (i + 2) * yy) > 0).float(),
            (((xx - 0.5) ** 2 + (yy - 0.5) ** 2) < (0.1 + 0.05 * i) ** 2).float(),
            0.5 * (xx + yy),
        ][i % 4]
        out.append(colour * pattern + (1 - colour) * (1 - pattern))
    return torch.stack(out)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def tiny() -> DiscreteVAE:
    torch.manual_seed(0)
    return create_tokenizer("tiny")


# --- model -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(TOKENIZER_PRESETS))
def test_presets_build_with_expected_grid(name: str) -> None:
    cfg = TOKENIZER_PRESETS[name]
    with torch.device("meta"):  # no weights allocated for the big presets
        model = DiscreteVAE(cfg)
    assert model.grid_size == cfg.input_size // cfg.downsample
    assert model.encoder.logits_conv.out_channels == cfg.vocab_size
    assert model.codebook.weight.shape == (cfg.vocab_size, cfg.codebook_dim)


def test_dalle_preset_matches_published_architecture() -> None:
    cfg = TOKENIZER_PRESETS["dalle"]
    assert (cfg.hidden, cfg.n_blocks, cfg.n_groups, cfg.vocab_size) == (256, 2, 4, 8192)
    assert cfg.grid_size == 14  # 112 px -> the 14x14 grid of a patch-16 ViT at 224 px
    with torch.device("meta"):
        model = DiscreteVAE(cfg)
    # Encoder of the DALL-E release: 53.8 M parameters.
    assert count_params(model.encoder) == pytest.approx(53.8e6, rel=0.01)
    assert encoder_gflops(model, 112) == pytest.approx(52.0, rel=0.02)


def test_encoder_gflops_scales_with_pixels(tiny: DiscreteVAE) -> None:
    assert encoder_gflops(tiny, 64) == pytest.approx(4 * encoder_gflops(tiny, 32), rel=1e-6)


def test_forward_shapes_ranges_and_loss(tiny: DiscreteVAE) -> None:
    x = structured_images(2)
    out = tiny(x, temperature=0.5)
    assert out.recon.shape == x.shape
    recon = out.recon.detach()
    assert float(recon.min()) >= 0.0 and float(recon.max()) <= 1.0
    assert out.logits.shape == (2, 64, 8, 8)
    for t in (out.recon_loss, out.kl):
        assert t.ndim == 0 and t.dtype == torch.float32 and torch.isfinite(t)
    expected = out.recon_loss.detach() + 2.0 * out.kl.detach()
    assert float(out.loss(2.0).detach()) == pytest.approx(float(expected))
    out.loss(1.0).backward()
    assert tiny.codebook.weight.grad is not None
    assert tiny.encoder.stem.weight.grad.abs().sum() > 0


def test_kl_to_uniform_limits() -> None:
    uniform = torch.zeros(2, 16, 3, 3)
    assert float(DiscreteVAE.kl_to_uniform(uniform)) == pytest.approx(0.0, abs=1e-6)
    peaked = torch.full((2, 16, 3, 3), -1e4)
    peaked[:, 5] = 0.0
    assert float(DiscreteVAE.kl_to_uniform(peaked)) == pytest.approx(math.log(16), rel=1e-5)


def test_usage_kl_sees_the_batch_not_the_cell() -> None:
    k = 16
    # Every cell certain, the batch spread evenly over all 16 codes: no usage penalty, while
    # the per-cell KL is at its maximum log K.
    spread = torch.full((4, k, 2, 2), -1e4)
    for i in range(k):
        spread[i // 4, i, (i % 4) // 2, i % 2] = 0.0
    assert float(DiscreteVAE.usage_kl_to_uniform(spread)) == pytest.approx(0.0, abs=1e-6)
    assert float(DiscreteVAE.kl_to_uniform(spread)) == pytest.approx(math.log(k), rel=1e-5)
    # Every cell on code 3: usage KL log K.
    same = torch.full((4, k, 2, 2), -1e4)
    same[:, 3] = 0.0
    assert float(DiscreteVAE.usage_kl_to_uniform(same)) == pytest.approx(math.log(k), rel=1e-5)
    # Convexity: the batch-average distribution is never further from uniform than the cells.
    logits = torch.randn(3, k, 4, 4) * 3
    assert DiscreteVAE.usage_kl_to_uniform(logits) <= DiscreteVAE.kl_to_uniform(logits) + 1e-6


def test_loss_adds_the_weighted_usage_term(tiny: DiscreteVAE) -> None:
    out = tiny(structured_images(4), temperature=0.5)
    expected = out.recon_loss + 0.2 * out.kl + 0.7 * out.usage_kl
    assert float(out.loss(0.2, 0.7)) == pytest.approx(float(expected), rel=1e-6)
    assert float(out.loss(0.2)) == pytest.approx(float(out.recon_loss + 0.2 * out.kl), rel=1e-6)


def test_gumbel_softmax_samples_the_softmax() -> None:
    torch.manual_seed(0)
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0]).view(1, 4, 1, 1).expand(20000, 4, 1, 1)
    y = gumbel_softmax(logits, tau=1.0)
    assert y.shape == logits.shape
    torch.testing.assert_close(y.sum(1), torch.ones(20000, 1, 1))
    # argmax of logits + Gumbel noise is a draw from softmax(logits) (the Gumbel-max trick).
    freq = torch.bincount(y.argmax(1).flatten(), minlength=4).float() / 20000
    torch.testing.assert_close(freq, logits[0, :, 0, 0].softmax(0), atol=0.015, rtol=0)
    # Low temperature -> nearly one-hot samples.
    assert float(gumbel_softmax(logits[:100], tau=0.01).amax(1).mean()) > 0.99


def test_gumbel_softmax_straight_through() -> None:
    torch.manual_seed(1)
    logits = torch.randn(8, 5, 2, 2, requires_grad=True)
    weights = torch.randn(8, 5, 2, 2)
    torch.manual_seed(2)
    hard = gumbel_softmax(logits, tau=0.7, hard=True)
    assert set(hard.detach().unique().tolist()) == {0.0, 1.0}
    torch.testing.assert_close(hard.detach().sum(1), torch.ones(8, 2, 2))
    (hard * weights).sum().backward()
    grad_hard = logits.grad.clone()
    logits.grad = None
    torch.manual_seed(2)  # the same noise: the soft sample the straight-through one came from
    soft = gumbel_softmax(logits, tau=0.7)
    assert torch.equal(soft.detach().argmax(1), hard.detach().argmax(1))
    (soft * weights).sum().backward()
    torch.testing.assert_close(grad_hard, logits.grad)


def test_logit_laplace_loss_is_the_density_nll() -> None:
    torch.manual_seed(1)
    model = create_tokenizer("tiny")
    x = torch.rand(2, 3, 8, 8)
    stats = torch.randn(2, 6, 8, 8)
    y = 0.8 * x + 0.1  # map_pixels with eps = 0.1
    mu, log_b = stats[:, :3], stats[:, 3:]
    # Laplace density of logit(y) times the Jacobian of the logit: 1 / (y (1 - y)).
    laplace = torch.distributions.Laplace(mu, log_b.exp())
    nll = -(laplace.log_prob(torch.logit(y)) - torch.log(y * (1 - y)))
    assert float(model.reconstruction_loss(stats, x)) == pytest.approx(float(nll.mean()), rel=1e-5)


@pytest.mark.parametrize("loss", ["l1", "mse"])
def test_pixel_losses(loss: str) -> None:
    model = create_tokenizer("tiny", recon_loss=loss)
    assert model.decoder.head.conv.out_channels == 3
    x, stats = torch.rand(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    ref = F.l1_loss if loss == "l1" else F.mse_loss
    assert float(model.reconstruction_loss(stats, x)) == pytest.approx(
        float(ref(torch.sigmoid(stats), x)), rel=1e-6
    )


def test_edge_loss_sees_a_missing_thin_line_that_mse_weighs_like_an_offset() -> None:
    from beitdomain.tokenizer.dvae import edge_loss

    x = torch.zeros(1, 1, 32, 32)
    x[..., 16, :] = 1.0  # a 1-px crack across the image
    no_line = torch.zeros_like(x)  # the crack lost
    offset = x + math.sqrt(F.mse_loss(no_line, x))  # as far from x in MSE, crack kept
    assert float(F.mse_loss(offset, x)) == pytest.approx(float(F.mse_loss(no_line, x)))
    assert float(edge_loss(x, x)) == 0.0 and float(edge_loss(offset, x)) < 1e-6
    # Two row-differences of size 1 (into and out of the line) over 31 x 32 of them, halved.
    assert float(edge_loss(no_line, x)) == pytest.approx(0.5 * 2 * 32 / (31 * 32))
    # Symmetric in H and W: the same line turned by 90 degrees costs the same.
    xt = x.transpose(-1, -2)
    assert float(edge_loss(torch.zeros_like(xt), xt)) == pytest.approx(float(edge_loss(no_line, x)))


def test_tiny_tokenizer_overfits_a_few_images(tiny: DiscreteVAE) -> None:
    x = structured_images(8)
    opt = torch.optim.Adam(tiny.parameters(), lr=1e-2)
    first = last = None
    steps = 60
    for step in range(steps):
        out = tiny(x, temperature=gumbel_temperature(step, steps, 1.0, 0.5))
        loss = out.loss(kl_weight(step, 10, 0.01))
        opt.zero_grad()
        loss.backward()
        opt.step()
        last = (float(out.recon_loss.detach()), float(psnr(out.recon.detach(), x)))
        first = first or last
    assert last[0] < first[0] - 0.3, (first, last)
    assert last[1] > first[1] + 1.5, (first, last)
    # Hard tokens decode better than at init too.
    with torch.inference_mode():
        tokens_psnr = float(psnr(tiny.decode_tokens(tiny.encode(x)), x))
    assert tokens_psnr > first[1] + 1.0


def _usage_after_training(usage_weight: float, straight_through: bool = False) -> float:
    """Share of the 64 codes the tiny tokenizer uses on its 8 training images after 40 steps.

    Built to collapse: no per-cell KL and a high lr, so a few codes take over early.
    """
    torch.manual_seed(0)
    model = create_tokenizer("tiny")
    x = structured_images(8)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(40):
        out = model(x, gumbel_temperature(step, 40, 1.0, 0.25), hard=straight_through)
        opt.zero_grad()
        out.loss(0.0, usage_weight).backward()
        opt.step()
    usage = CodeUsage(64)
    usage.update(model.encode(x))
    return usage.fraction_used


def test_usage_weight_keeps_more_codes_alive() -> None:
    without, with_usage = _usage_after_training(0.0), _usage_after_training(1.0)
    assert with_usage >= without + 0.15, (without, with_usage)
    assert _usage_after_training(1.0, straight_through=True) >= without + 0.15


def test_encode_decode_contract(tiny: DiscreteVAE) -> None:
    x = structured_images(3)
    with torch.inference_mode():
        tokens = tiny.encode(x)
        images = tiny.decode_tokens(tokens)
    assert tokens.shape == (3, 8, 8) and tokens.dtype == torch.int64
    assert int(tokens.min()) >= 0 and int(tokens.max()) < 64
    assert torch.equal(tokens, tiny.logits(x).argmax(1))
    assert images.shape == (3, 3, 32, 32)
    assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        tiny.decode_tokens(torch.full((1, 8, 8), 64))


def test_grayscale_and_downsample_8() -> None:
    model = create_tokenizer("tiny", in_chans=1, downsample=8)
    tokens = model.encode(torch.rand(2, 1, 32, 32))
    assert tokens.shape == (2, 4, 4)
    assert model.decode_tokens(tokens).shape == (2, 1, 32, 32)


def test_channels_last_and_bf16_autocast(tiny: DiscreteVAE) -> None:
    x = structured_images(2)
    ref = tiny.encode(x)
    cl = create_tokenizer("tiny")
    cl.load_state_dict(tiny.state_dict())
    cl = cl.to(memory_format=torch.channels_last)
    assert torch.equal(cl.encode(x.contiguous(memory_format=torch.channels_last)), ref)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = tiny(x, temperature=1.0)
    assert out.logits.dtype == torch.float32
    assert out.recon_loss.dtype == torch.float32 and torch.isfinite(out.recon_loss)
    assert out.kl.dtype == torch.float32 and torch.isfinite(out.kl)


@pytest.mark.parametrize("tied", [(), (3, 7)])
def test_encode_breaks_ties_to_the_first_code_in_either_layout(tied: tuple[int, ...]) -> None:
    """Tokens are the first maximum (argmax's rule) whether the tokenizer is NCHW or
    channels_last: on a zeroed head every code ties (token 0); with codes 3 and 7 tied above
    the rest, token 3."""
    model = create_tokenizer("tiny")
    with torch.no_grad():
        model.encoder.head.weight.zero_()
        model.encoder.head.bias.zero_()
        for k in tied:
            model.encoder.head.bias[k] = 1.0
    x = structured_images(2)
    nchw = model.encode(x)
    cl = model.to(memory_format=torch.channels_last)
    assert cl.logits(x.contiguous(memory_format=torch.channels_last)).is_contiguous(
        memory_format=torch.channels_last
    )
    assert torch.equal(cl.encode(x.contiguous(memory_format=torch.channels_last)), nchw)
    want = tied[0] if tied else 0
    assert torch.equal(nchw, torch.full_like(nchw, want))


def test_input_and_config_errors(tiny: DiscreteVAE) -> None:
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        tiny.encode(torch.rand(1, 1, 32, 32))
    with pytest.raises(ValueError, match="downsample factor 4"):
        tiny.encode(torch.rand(1, 3, 30, 30))
    with pytest.raises(ValueError, match=r"DVAEConfig.downsample=16 .*4 or 8"):
        DVAEConfig(downsample=16)
    with pytest.raises(ValueError, match="recon_loss"):
        DVAEConfig(recon_loss="bce")
    with pytest.raises(KeyError, match="available"):
        tokenizer_config("huge")
    with pytest.raises(ValueError, match="unknown tokenizer config key"):
        DVAEConfig.from_dict({"vocab": 3}, source="x.json")


# --- schedules ---------------------------------------------------------------------------------


def test_gumbel_temperature_schedule() -> None:
    assert gumbel_temperature(0, 100) == pytest.approx(1.0)
    assert gumbel_temperature(100, 100) == pytest.approx(1 / 16)
    assert gumbel_temperature(500, 100) == pytest.approx(1 / 16)  # held after the end
    assert gumbel_temperature(50, 100) == pytest.approx(0.25)  # sqrt(1 * 1/16)
    assert gumbel_temperature(25, 100) == pytest.approx(0.5)  # halves every quarter
    assert gumbel_temperature(50, 100, 2.0, 0.5, mode="cosine") == pytest.approx(1.25)
    assert gumbel_temperature(0, 100, 2.0, 0.5, mode="cosine") == pytest.approx(2.0)
    values = [gumbel_temperature(s, 100, mode="cosine") for s in range(0, 101, 10)]
    assert values == sorted(values, reverse=True)
    with pytest.raises(ValueError, match="mode"):
        gumbel_temperature(0, 10, mode="linear")


def test_kl_weight_schedule() -> None:
    assert kl_weight(0, 5000, 6.6) == 0.0
    assert kl_weight(2500, 5000, 6.6) == pytest.approx(3.3)
    assert kl_weight(1250, 5000, 6.6) == pytest.approx(6.6 * (1 - math.cos(math.pi / 4)) / 2)
    assert kl_weight(5000, 5000, 6.6) == pytest.approx(6.6)
    assert kl_weight(9000, 5000, 6.6) == pytest.approx(6.6)
    assert kl_weight(1250, 5000, 6.6, mode="linear") == pytest.approx(6.6 / 4)
    assert kl_weight(3, 0, 2.0) == 2.0  # no warm-up


# --- codebook health ---------------------------------------------------------------------------


def test_code_usage_statistics() -> None:
    usage = CodeUsage(8)
    usage.update(torch.tensor([[[0, 1], [2, 3]]]))
    assert usage.fraction_used == 0.5
    assert usage.perplexity == pytest.approx(4.0)
    assert usage.dead_codes().tolist() == [4, 5, 6, 7]
    logits = torch.zeros(1, 8, 2, 2)
    logits[:, 0] = 5.0
    usage.update(logits)  # four more of code 0
    assert usage.counts.tolist() == [5, 1, 1, 1, 0, 0, 0, 0]
    assert usage.dead_codes(min_count=2).tolist() == [1, 2, 3, 4, 5, 6, 7]
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        usage.update(torch.tensor([8]))
    with pytest.raises(ValueError, match=r"\[B, 8, \.\.\.\]"):
        usage.update(torch.zeros(1, 7, 2, 2))


def test_collapse_warning() -> None:
    usage = CodeUsage(100)
    usage.update(torch.tensor([0, 1, 2] * 10))
    with pytest.warns(CodebookCollapseWarning, match=r"CODEBOOK COLLAPSE: only 3 of 100"):
        msg = check_codebook_usage(usage)
    assert "reinit_dead_codes" in msg
    usage.update(torch.arange(100))
    assert check_codebook_usage(usage) is None


def test_reinit_dead_codes_revives_a_collapsed_codebook(tiny: DiscreteVAE) -> None:
    x = structured_images(8)
    with torch.no_grad():
        tiny.encoder.logits_conv.bias[0] = 100.0  # code 0 wins everywhere
    usage = CodeUsage(64)
    usage.update(tiny.encode(x))
    assert usage.fraction_used == pytest.approx(1 / 64)
    recon_before = tiny.decode_tokens(tiny.encode(x))

    # Seeds from half the batch; judged on the whole batch.
    revived = reinit_dead_codes(
        tiny, usage.dead_codes(), samples=x[:4], generator=torch.Generator().manual_seed(0)
    )
    assert sorted(revived.tolist()) == list(range(1, 64))
    after = CodeUsage(64)
    after.update(tiny.encode(x))
    assert after.fraction_used > 0.9
    assert after.perplexity > 20
    # Children copy their parent's embedding: reconstructions are unchanged by the split.
    torch.testing.assert_close(tiny.decode_tokens(tiny.encode(x)), recon_before)


def test_reinit_dead_codes_input_checks(tiny: DiscreteVAE) -> None:
    with pytest.raises(ValueError, match="exactly one"):
        reinit_dead_codes(tiny, [1])
    with pytest.raises(ValueError, match=r"\[N, 64\]"):
        reinit_dead_codes(tiny, [1], features=torch.rand(10, 3))
    # Fewer seeds than dead codes: revives what it can.
    feats = torch.rand(5, 64)
    assert len(reinit_dead_codes(tiny, list(range(10, 30)), features=feats)) <= 5


def test_reset_optimizer_rows(tiny: DiscreteVAE) -> None:
    opt = torch.optim.Adam(tiny.parameters(), lr=1e-3)
    tiny(structured_images(2)).loss(1.0).backward()
    opt.step()
    idx = torch.tensor([3, 7])
    reset_optimizer_rows(opt, tiny, idx)
    state = opt.state[tiny.encoder.logits_conv.weight]
    assert state["exp_avg"][idx].abs().sum() == 0 and state["exp_avg_sq"][idx].abs().sum() == 0
    assert state["exp_avg_sq"][[0, 1, 2]].abs().sum() > 0
    assert opt.state[tiny.codebook.weight]["exp_avg"][idx].abs().sum() == 0


def test_temperature_anneals_over_the_first_part_then_holds() -> None:
    from beitdomain.tokenizer.schedule import anneal_steps

    total = 1000
    n = anneal_steps(0.25, total)
    assert n == 250
    temps = [gumbel_temperature(s, n, 1.0, 1 / 16) for s in range(total)]
    assert temps[0] == 1.0 and temps[125] == pytest.approx(0.25)  # geometric midpoint
    assert temps[250:] == [pytest.approx(1 / 16)] * 750  # held for the remaining 75%
    with pytest.raises(ValueError, match=r"anneal fraction must be in \(0, 1\]"):
        anneal_steps(0.0, total)


def test_kl_weight_per_element_is_the_same_balance_for_gray_and_rgb() -> None:
    from beitdomain.tokenizer.schedule import kl_weight_per_element

    # DALL-E: sum of sub-pixel NLLs + 6.6 * sum of cell KLs, 8x8 pixels per cell. Divided by
    # the number of sub-pixels (what a mean reconstruction loss is), the KL weight is
    # 6.6 / (C * 64); the recipe's per-pixel 6.6 / 64 gives exactly that for C = 1 and 3.
    for c in (1, 3):
        assert kl_weight_per_element(6.6 / 64, c) == pytest.approx(6.6 / (c * 64))
