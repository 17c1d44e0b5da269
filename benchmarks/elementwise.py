"""The element-wise passes of a BEiT block, eager against `torch.compile`, at the demo's shapes.

Run: ``python benchmarks/elementwise.py --threads 2`` (about a minute, most of it compiling).

What a fused step would save is the time of these passes, and `torch.compile` (inductor's
generated C++ on a CPU, Triton on CUDA) is the tool that fuses them. If its kernels for the same
passes are slower than eager PyTorch's, compiling the step cannot pay whatever it fuses, which
is what this measures on the machine at hand, one pass at a time:

* GELU (erf) forward, and forward + backward, on the MLP's hidden activations `[B, N, 4D]`;
* the attention's `softmax(scores + bias)` forward + backward, `[B, H, N, N]` with a `[H, N, N]`
  bias that gets a gradient (BEiT's relative position bias);
* LayerNorm forward + backward on the float32 residual stream `[B, N, D]`, its output cast to
  the matmuls' dtype (what autocast runs).

Each pass is timed in both forms in the same process, alternating, median of `--calls` calls
after a warm-up (compilation excluded; its time is reported). Defaults: the demo's pre-training
batch (`recipes/elpv-cpu.yaml`: 64 images, 65 tokens, width 128, 4 heads) in bf16.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C


def _gelu(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x)


def _gelu_fwd_bwd(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    x = x.detach().requires_grad_(True)
    F.gelu(x).backward(g)
    return x.grad


def _softmax_bias_fwd_bwd(s: torch.Tensor, bias: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    s = s.detach().requires_grad_(True)
    bias = bias.detach().requires_grad_(True)
    (s + bias).softmax(-1).backward(g)
    return bias.grad


def _layer_norm_fwd_bwd(
    x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, g: torch.Tensor
) -> torch.Tensor:
    x = x.detach().requires_grad_(True)
    F.layer_norm(x, x.shape[-1:], w, b).to(g.dtype).backward(g)
    return x.grad


def cases(batch: int, tokens: int, width: int, heads: int, dtype: torch.dtype) -> dict[str, Any]:
    """name -> (function, arguments) at the given shapes (seeded random values)."""
    gen = torch.Generator().manual_seed(0)

    def rand(*shape: int, dt: torch.dtype = dtype) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(dt)

    hidden = rand(batch, tokens, 4 * width)
    scores = rand(batch, heads, tokens, tokens)
    stream = rand(batch, tokens, width, dt=torch.float32)
    return {
        "GELU forward": (_gelu, (hidden,)),
        "GELU forward + backward": (_gelu_fwd_bwd, (hidden, torch.ones_like(hidden))),
        "softmax(scores + bias) forward + backward": (
            _softmax_bias_fwd_bwd,
            (scores, rand(heads, tokens, tokens), rand(batch, heads, tokens, tokens)),
        ),
        "LayerNorm (fp32 in, cast out) forward + backward": (
            _layer_norm_fwd_bwd,
            (stream, torch.ones(width), torch.zeros(width), rand(batch, tokens, width)),
        ),
    }


def run(
    batch: int, tokens: int, width: int, heads: int, dtype: torch.dtype, calls: int
) -> list[dict[str, Any]]:
    cpu = torch.device("cpu")
    rows = []
    for name, (fn, args) in cases(batch, tokens, width, heads, dtype).items():
        compiled = torch.compile(fn, dynamic=False)
        t0 = time.perf_counter()
        compiled(*args)
        compile_s = time.perf_counter() - t0
        # The same function in both forms: outputs agree to the dtype's rounding.
        torch.testing.assert_close(compiled(*args), fn(*args), rtol=0.05, atol=0.05)
        times = C.interleaved_times(  # alternating, so drift hits both alike
            {"eager": lambda f=fn, a=args: f(*a), "compiled": lambda g=compiled, a=args: g(*a)},
            steps=calls,
            warmup=2,
            device=cpu,
        )
        e, c = (1e3 * statistics.median(times[k]["wall"]) for k in ("eager", "compiled"))
        rows.append(
            {
                "pass": name,
                "eager_ms": e,
                "compiled_ms": c,
                "compiled_over_eager": c / e,
                "compile_s": compile_s,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--tokens", type=int, default=65, help="patches + [CLS] (64 px, patch 8)")
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--calls", type=int, default=120, help="timed calls per form")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    rows = run(a.batch, a.tokens, a.width, a.heads, dtype, a.calls)
    cpu = torch.device("cpu")
    title = (
        f"{a.dtype}, batch {a.batch}, {a.tokens} tokens, width {a.width}, {a.heads} heads, "
        f"{torch.get_num_threads()} threads"
    )
    table = C.markdown_table(
        ["pass", "eager ms", "compiled ms", "compiled / eager", "compile s"],
        [
            [
                r["pass"],
                f"{r['eager_ms']:.3f}",
                f"{r['compiled_ms']:.3f}",
                f"{r['compiled_over_eager']:.2f}",
                f"{r['compile_s']:.1f}",
            ]
            for r in rows
        ],
    )
    info = C.env_info(cpu)
    C.emit(f"{C.header_lines(info)}\n\n{title}\n\n{table}", {"env": info, "rows": rows}, a.json)


if __name__ == "__main__":
    main()
