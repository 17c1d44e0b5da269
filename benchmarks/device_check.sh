#!/usr/bin/env bash
# One GPU check of issue 37, from a fresh copy of the repository, in at most 8 minutes on one
# H100: install, environment, the GPU suite (the real pre-training step with and without the
# per-step sync and its MFU, fine-tuning, loader, largest batch, which attention kernel runs),
# the host syncs of the three jobs under torch.cuda.set_sync_debug_mode, run as a short
# real-size tokenizer -> pretrain -> finetune chain, and (DEVICE_CHECK_COMPILE=1) the compiled
# steps. Writes $OUT/summary.md (OUT defaults to ./device_check_out), the suite's JSON and
# every log (logs.tar.gz). Each part has a time limit, so that the script ends in time and says
# which part ran out.
#
#   benchmarks/device_check.sh                 # on the GPU machine
#   benchmarks/device_check.sh --tiny          # the same steps on the CPU at tiny sizes
#                                              # (or DEVICE_CHECK_TINY=1); what the tests run
# Other knobs: DEVICE_CHECK_INSTALL=0|1 (default 1 on a GPU, 0 in tiny mode),
# DEVICE_CHECK_STEPS (steps per job in the chain; 30, tiny 2).
set -uo pipefail
cd "$(dirname "$0")/.."

TINY=${DEVICE_CHECK_TINY:-0}
for arg in "$@"; do
    case $arg in
        --tiny) TINY=1 ;;
        *) echo "device_check.sh: unknown argument $arg (only --tiny)" >&2; exit 2 ;;
    esac
done
OUT=${OUT:-./device_check_out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/device_check.XXXXXX")
LOGS=$WORK/logs
mkdir -p "$LOGS"
SUMMARY=$OUT/summary.md
PY=${PYTHON:-python}
export PYTHONUNBUFFERED=1

if [ "$TINY" = 1 ]; then
    DEVICE=cpu
    INSTALL=${DEVICE_CHECK_INSTALL:-0}
    STEPS=${DEVICE_CHECK_STEPS:-2}
    SUITE_ARGS=(--device cpu --quick)
    SUITE_LIMIT=240
    CHAIN_LIMIT=240
else
    DEVICE=cuda
    INSTALL=${DEVICE_CHECK_INSTALL:-1}
    STEPS=${DEVICE_CHECK_STEPS:-30}
    SUITE_ARGS=(--device cuda)
    [ "${DEVICE_CHECK_COMPILE:-0}" = 1 ] && SUITE_ARGS+=(--compile)
    SUITE_LIMIT=270  # the suite's own estimate is 3-5 minutes on one H100
    CHAIN_LIMIT=120
fi

START=$(date +%s)
say() { printf '%s\n' "$@" >>"$SUMMARY"; }  # one line per argument
# step NAME LIMIT CMD...: runs CMD with its output in logs/NAME.log; records exit and seconds
step() {
    local name=$1 limit=$2 t0 rc
    shift 2
    t0=$(date +%s)
    timeout "$limit" "$@" >"$LOGS/$name.log" 2>&1
    rc=$?
    local note="exit $rc"
    [ $rc = 124 ] && note="TIMED OUT after $limit s"
    say "- \`$name\`: $note, $(($(date +%s) - t0)) s (log: logs/$name.log)"
    return $rc
}

{
    echo "# Device check"
    echo
    echo "$(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)," \
        "mode $([ "$TINY" = 1 ] && echo "tiny (CPU)" || echo "GPU"), device $DEVICE"
} >"$SUMMARY"

say "" "## Install" ""
if [ "$INSTALL" = 1 ]; then
    # README's install, failing fast without the internet; then the package alone, for a
    # machine that has the dependencies but no index to reach
    step install 150 env PIP_RETRIES=0 PIP_DEFAULT_TIMEOUT=5 "$PY" -m pip install -q -e ".[dev]" ||
        step install-offline 60 "$PY" -m pip install -q --no-deps --no-build-isolation -e .
else
    say "- skipped (DEVICE_CHECK_INSTALL=0): the environment's beitdomain is used"
fi

say "" "## Environment" ""
step env 120 "$PY" -m beitdomain.cli.app env --json
"$PY" - "$LOGS/env.log" >>"$SUMMARY" 2>&1 <<'EOF'
import json, sys
import torch
text = open(sys.argv[1]).read()
try:
    env = json.loads(text[text.index("{"):])
    for k, v in env.items():
        print(f"- {k}: {v}")
except ValueError:
    print("- beitdomain env gave no JSON (see logs/env.log)")
print(f"- torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"cuDNN {torch.backends.cudnn.version()}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"- GPU: {p.name}, {p.total_memory / 2**30:.1f} GiB, "
          f"compute capability {p.major}.{p.minor}, {p.multi_processor_count} SMs")
else:
    print("- GPU: none visible to torch")
EOF
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit \
        --format=csv >"$LOGS/nvidia-smi.log" 2>&1 && say "" '```' "$(cat "$LOGS/nvidia-smi.log")" '```'
fi

say "" "## GPU suite" ""
say "The pre-training step synced per step and queued without the sync (its MFU), fine-tuning," \
    "loader, largest batch, attention kernels (benchmarks/gpu_suite.py ${SUITE_ARGS[*]})."
say ""
if step gpu_suite "$SUITE_LIMIT" "$PY" benchmarks/gpu_suite.py "${SUITE_ARGS[@]}" \
    --out "$OUT/gpu_suite.json"; then
    say "" "$(sed -n '/^GPU suite$/,$p' "$LOGS/gpu_suite.log")"
fi

say "" "## Attention kernel" ""
"$PY" - "$OUT/gpu_suite.json" >>"$SUMMARY" 2>&1 <<'EOF'
import json, sys
try:
    att = json.load(open(sys.argv[1]))["attention"]
except (OSError, ValueError, KeyError):
    sys.exit("- no suite results (see logs/gpu_suite.log)")
if "error" in att:
    sys.exit(f"- the attention measurement failed: {att['error']}")
print(f"- timm's SDPA call with the relative position bias as a float mask, {att['shape']}"
      f" {att['dtype']}, runs: {', '.join(att['default_ops'])}")
for name, ms in att["fwd_bwd_ms"].items():
    print(f"- {name}: {ms if isinstance(ms, str) else f'{ms:.2f} ms'}")
EOF

say "" "## Host syncs and the real-size chain" ""
say "tokenizer -> pretrain -> finetune, $STEPS steps each, every job under" \
    "torch.cuda.set_sync_debug_mode('warn'); each synchronizing call counted where it was made."
say ""
DATA=$WORK/images
"$PY" - "$DATA" "$TINY" >"$LOGS/images.log" 2>&1 <<'EOF'
# Two classes of synthetic grayscale images (stripes of two orientations under noise).
import sys
from pathlib import Path
import numpy as np
from PIL import Image
root, tiny = Path(sys.argv[1]), sys.argv[2] == "1"
n, size = (12, 64) if tiny else (192, 256)
rng = np.random.default_rng(0)
yy, xx = np.mgrid[:size, :size]
for c, name in enumerate(("horizontal", "vertical")):
    (root / name).mkdir(parents=True)
    for k in range(n):
        wave = np.sin((yy if c == 0 else xx) / (3 + k % 5))
        img = 127 + 60 * wave + rng.normal(0, 20, (size, size))
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / name / f"{k:04d}.png")
EOF
if [ "$TINY" = 1 ]; then
    RECIPE=()
    SETS=(data.num_workers=0 data.image_size=64 data.tokenizer_size=32 data.in_chans=1
        tokenizer.preset=tiny tokenizer.train.batch_size=8 tokenizer.sample_every=1000
        model.preset=tiny pretrain.train.batch_size=8 finetune.train.batch_size=8
        finetune.train.min_steps=0)
else
    RECIPE=(--recipe elpv-gpu)
    SETS=(tokenizer.sample_every=1000 tokenizer.dead_code_every=10 finetune.train.min_steps=0)
fi
for job in tokenizer pretrain finetune; do
    SETS+=("$job.train.steps=$STEPS" "$job.train.ckpt_every=$STEPS" "$job.train.log_every=1")
done
step chain "$CHAIN_LIMIT" "$PY" - "$WORK" "$DEVICE" "$DATA" "$OUT/syncs.json" "${RECIPE[@]}" \
    -- "${SETS[@]}" <<'EOF'
# The three jobs through the CLI in one process (one import of torch), each under
# set_sync_debug_mode("warn"); every synchronizing call is counted by the innermost frame of
# beitdomain (else timm, else torch) that made it.
import collections, json, sys, time, traceback, warnings
from pathlib import Path
import torch

work, device, data, out = Path(sys.argv[1]), sys.argv[2], sys.argv[3], Path(sys.argv[4])
rest = sys.argv[5:]
recipe, sets = rest[: rest.index("--")], rest[rest.index("--") + 1 :]
set_args = [a for s in sets for a in ("--set", s)]
from beitdomain.cli.app import app

cuda = device == "cuda" and torch.cuda.is_available()
counts: collections.Counter = collections.Counter()

def where() -> str:
    frames = traceback.extract_stack()[:-2]
    for part in ("/beitdomain/", "/timm/", "/torch/"):
        hit = [f for f in frames if part in f.filename]
        if hit:
            f = hit[-1]
            return f"{f.filename.split(part)[-1]}:{f.lineno} ({part.strip('/')})"
    return "elsewhere"

def show(message, category, filename, lineno, file=None, line=None):
    if "synchroniz" in str(message):
        counts[where()] += 1
    else:
        print(f"{category.__name__}: {message}", file=sys.stderr)

jobs = {
    "tokenizer": ["tokenizer", "train", "--data", data, "--out", str(work / "tok")],
    "pretrain": ["pretrain", "--data", data, "--tokenizer", str(work / "tok"),
                 "--out", str(work / "pre")],
    "finetune": ["finetune", "--data", data, "--init", str(work / "pre"),
                 "--out", str(work / "ft")],
}
report, ok = {}, True
for name, args in jobs.items():
    counts.clear()
    t0 = time.perf_counter()
    status = "ok"
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        if cuda:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            app(["--device", device, *args, *recipe, *set_args], standalone_mode=False)
        except SystemExit as e:
            status = "ok" if e.code in (0, None) else f"exit {e.code}"
        except Exception as e:
            traceback.print_exc()
            status = f"{type(e).__name__}: {e}"
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode(0)
    ok = ok and status == "ok"
    metrics = [json.loads(l) for l in (work / {"tokenizer": "tok", "pretrain": "pre",
               "finetune": "ft"}[name] / "metrics.jsonl").read_text().splitlines()
               if l.strip()] if status == "ok" else []
    losses = [m["loss"] for m in metrics if "loss" in m]
    rates = [m["img_per_s"] for m in metrics if "img_per_s" in m]
    report[name] = {
        "status": status,
        "seconds": round(time.perf_counter() - t0, 1),
        "steps": len(losses),
        "loss_first_last": [losses[0], losses[-1]] if losses else None,
        "img_per_s_last": rates[-1] if rates else None,  # the trainer's own rate
        "syncs": sum(counts.values()) if cuda else None,
        "where": counts.most_common(12),
    }
out.write_text(json.dumps(report, indent=1))
sys.exit(0 if ok else 1)
EOF
"$PY" - "$OUT/syncs.json" "$DEVICE" >>"$SUMMARY" 2>&1 <<'EOF'
import json, sys
try:
    report = json.load(open(sys.argv[1]))
except (OSError, ValueError):
    sys.exit("- the chain left no report (see logs/chain.log)")
for name, r in report.items():
    loss = r["loss_first_last"]
    loss = f"loss {loss[0]:.3f} -> {loss[1]:.3f}" if loss else "no loss logged"
    syncs = ("syncs not counted (no CUDA)" if r["syncs"] is None else
             f"{r['syncs']} host syncs ({r['syncs'] / max(r['steps'], 1):.1f} per step)")
    rate = f", {r['img_per_s_last']:,.0f} img/s logged last" if r["img_per_s_last"] else ""
    print(f"- {name}: {r['status']}, {r['seconds']} s, {r['steps']} steps, {loss}{rate}, {syncs}")
    for where, n in r["where"]:
        print(f"    - {n} x {where}")
EOF

say "" "## Compiled step" ""
if [ "$TINY" = 1 ] || [ "${DEVICE_CHECK_COMPILE:-0}" != 1 ]; then
    say "- not run (DEVICE_CHECK_COMPILE=1 adds the suite's compiled pre-training and" \
        "fine-tuning rows, on a GPU)"
else
    say "- in the suite's table above (rows 'compiled')"
fi

say "" "Total: $(($(date +%s) - START)) s"
tar -czf "$OUT/logs.tar.gz" -C "$WORK" logs
rm -rf "$WORK"
echo "device check: $SUMMARY"
