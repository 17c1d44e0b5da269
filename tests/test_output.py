"""Output that fits scripts and clusters: stdout holds results, stderr logs and progress;
--json, --version, -q; plain progress lines off a terminal; experiment trackers."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest
from helpers import cli_env, write_separable_set

from beitdomain import __version__
from beitdomain.progress import PlainLines, format_duration, track


def bd(*args: str, **env: str) -> subprocess.CompletedProcess:
    """`beitdomain ARGS` in a subprocess (stderr is a pipe there: not a terminal)."""
    return subprocess.run(
        [sys.executable, "-m", "beitdomain.cli.app", "--device", "cpu", *args],
        capture_output=True,
        text=True,
        env=cli_env(**env),
        timeout=300,
    )


def test_version_flag_and_command():
    for args in (["--version"], ["version"]):
        res = bd(*args)
        assert res.returncode == 0 and res.stdout.strip() == f"beitdomain {__version__}"


def test_env_json_global_and_per_command():
    for args in (["--json", "env"], ["env", "--json"]):
        res = bd(*args)
        assert res.returncode == 0, res.stderr
        rows = json.loads(res.stdout)
        assert rows["beitdomain"] == __version__ and "device" in rows
        # values keep their types: a boolean is true/false, a count a number
        assert isinstance(rows["cuda available"], bool) and isinstance(rows["cpu threads"], int)


def test_version_as_json():
    res = bd("--json", "version")
    assert res.returncode == 0 and json.loads(res.stdout) == {"beitdomain": __version__}


def test_a_mistyped_recipe_name_gets_the_closest_shipped_one(tmp_path):
    res = bd("finetune", "-r", "cpu-dicm", "--data", str(tmp_path), "--out", str(tmp_path / "o"))
    assert res.returncode != 0 and "did you mean 'cpu-dicom'?" in " ".join(res.stderr.split())
    assert not (tmp_path / "o").exists()


def test_data_scan_stdout_is_the_summary_only_and_json_parses(tmp_path):
    data = write_separable_set(tmp_path / "d", per_class=3)
    # -q: no progress anywhere; stdout has the summary table only
    res = bd("-q", "data", "scan", str(data))
    assert res.returncode == 0, res.stderr
    assert "6" in res.stdout and "Reading headers" not in res.stdout + res.stderr
    # without -q the progress goes to stderr (plain lines off a terminal), never stdout
    res = bd("data", "scan", str(data), BEITDOMAIN_LOG_EVERY="0")
    assert "Reading headers and pixels 6/6" in res.stderr
    assert "Reading headers" not in res.stdout
    # --json: one JSON document on stdout, files and frames stated separately
    res = bd("--json", "data", "scan", str(data), "-o", str(tmp_path / "m.jsonl"))
    summary = json.loads(res.stdout)
    assert summary["n_files"] == 6 and summary["n_frames"] == 6
    assert summary["by_label_files"] == {"horizontal": 3, "vertical": 3}
    assert summary["manifest"] == str(tmp_path / "m.jsonl")
    res = bd("data", "scan", str(data), "--json")
    assert json.loads(res.stdout)["n_unreadable"] == 0


def test_data_cache_and_inspect_json_results(tmp_path):
    data = write_separable_set(tmp_path / "d", per_class=2)
    res = bd("--json", "-q", "data", "cache", str(data), "-o", str(tmp_path / "c"), "--size", "32")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["n_items"] == 4 and out["item_shape"] == [1, 32, 32] and not out["reused"]
    res = bd("--json", "-q", "data", "inspect", str(tmp_path / "c"), "-o", str(tmp_path / "s.png"))
    assert json.loads(res.stdout) == {"contact_sheet": str(tmp_path / "s.png")}


def test_plain_progress_lines_have_step_loss_rate_and_eta(caplog):
    lines = PlainLines("pretrain", total=100, start=0, interval=0)
    lines.t0 -= 10  # ten seconds in
    text = lines.line(20, loss=0.6931, ips=128)
    assert text.startswith("pretrain 20/100 (20%)")
    assert "loss 0.6931" in text and "128 img/s" in text
    assert "elapsed 10s" in text and "ETA 40s" in text
    with caplog.at_level(logging.INFO, logger="beitdomain.progress"):
        lines.update(30, 0.5, 100.0)
    assert "pretrain 30/100" in caplog.text
    assert format_duration(75) == "1m15s" and format_duration(4000) == "1h06m"
    assert format_duration(200000) == "2d07h"


def test_plain_progress_rate_is_the_average_since_the_last_line(caplog, monkeypatch):
    """A slow step just before a line (a loader restarting) must not be printed as the rate."""
    clock = [0.0]
    monkeypatch.setattr("beitdomain.progress.time.monotonic", lambda: clock[0])
    lines = PlainLines("pretrain", total=100, interval=30)
    with caplog.at_level(logging.INFO, logger="beitdomain.progress"):
        for step, (t, ips) in enumerate([(10, 300.0), (20, 300.0), (30, 30.0)], 1):
            clock[0] = t
            lines.update(step, 0.5, ips)
    assert len(caplog.records) == 1
    assert "210 img/s" in caplog.text  # (300 * 10 + 300 * 10 + 30 * 10) / 30


def test_plain_progress_is_rate_limited(caplog, monkeypatch):
    monkeypatch.setenv("BEITDOMAIN_LOG_EVERY", "3600")
    with caplog.at_level(logging.INFO, logger="beitdomain.progress"):
        assert list(track(range(5), 5, "reading")) == [0, 1, 2, 3, 4]
    # an hour between lines: only the final line
    assert [r.getMessage().split(",")[0] for r in caplog.records] == ["reading 5/5 (100%)"]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="beitdomain.progress"):
        list(track(range(5), 5, "reading", quiet=True))
    assert caplog.records == []


def test_training_logs_plain_lines_to_stderr_in_a_batch_job(tmp_path):
    """A fine-tune whose stderr is a file (as under SLURM/nohup) logs step, loss, img/s, ETA."""
    from helpers import FINETUNE_SETS, sets_to_args

    data = write_separable_set(tmp_path / "d", per_class=6)
    res = bd(
        "finetune",
        "--data",
        str(data),
        "--init",
        "scratch",
        "--steps",
        "3",
        "--out",
        str(tmp_path / "ft"),
        *sets_to_args(FINETUNE_SETS),
        BEITDOMAIN_LOG_EVERY="0",
    )
    assert res.returncode == 0, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if "finetune 3/3 (100%)" in ln]
    assert lines and "loss " in lines[0] and "img/s" in lines[0] and "ETA" in lines[0]
    assert "finetune 3/3" not in res.stdout


# ------------------------------------------------------------------------------ trackers


def test_missing_tracker_is_a_warning_naming_the_install(tmp_path, monkeypatch, caplog):
    import builtins

    from beitdomain.engine.run.metrics_log import MetricsLog

    real_import = builtins.__import__

    def no_tensorboard(name, *a, **k):
        if name.startswith(("torch.utils.tensorboard", "tensorboard")):
            raise ImportError(f"No module named '{name}'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    with caplog.at_level(logging.WARNING):
        m = MetricsLog(tmp_path / "metrics.jsonl", tensorboard=True)
    assert "tensorboard was asked for but is not installed" in caplog.text
    assert "pip install tensorboard" in caplog.text
    m.log(1, loss=0.5)
    m.close()
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"step": 1, "loss": 0.5}


def test_unknown_tracker_is_refused(tmp_path):
    from beitdomain.engine.run.trackers import open_trackers

    with pytest.raises(ValueError, match="valid: tensorboard, mlflow, wandb"):
        open_trackers(["neptune"], tmp_path)


def test_mlflow_tracker_records_metrics_in_a_local_store(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    from beitdomain.engine.run.metrics_log import MetricsLog

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    m = MetricsLog(tmp_path / "metrics.jsonl", trackers=["mlflow"], config={"optim": {"lr": 0.001}})
    m.log(1, loss=0.75, lr=0.001, note="text is not a metric")
    m.log(2, loss=0.5)
    run_id = mlflow.last_active_run().info.run_id
    m.close()
    client = mlflow.tracking.MlflowClient(tracking_uri=(tmp_path / "mlruns").resolve().as_uri())
    history = client.get_metric_history(run_id, "loss")
    assert [(h.step, h.value) for h in history] == [(1, 0.75), (2, 0.5)]
    assert client.get_run(run_id).data.params["optim.lr"] == "0.001"


def test_wandb_tracker_runs_offline_into_the_run_folder(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from beitdomain.engine.run.metrics_log import MetricsLog

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    m = MetricsLog(tmp_path / "metrics.jsonl", trackers=["wandb"], config={"seed": 0})
    m.log(1, loss=0.75)
    m.close()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))


def _all_commands():
    """(path, click command) for every command of the app, groups walked."""
    import typer

    from beitdomain.cli.app import app

    root = typer.main.get_command(app)
    out = []

    def walk(cmd, path):
        subs = getattr(cmd, "commands", None)
        if subs:
            for name, sub in subs.items():
                walk(sub, [*path, name])
        if not subs or getattr(cmd, "invoke_without_command", False):
            out.append((path, cmd))

    walk(root, [])
    return out


def test_flags_show_no_value_placeholder_in_help():
    from typer.testing import CliRunner

    from beitdomain.cli.app import app

    commands = _all_commands()
    assert len(commands) > 10
    for path, _ in commands:
        res = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "200"})
        assert res.exit_code == 0, (path, res.output)
        assert "<bool>" not in res.output, path


def test_readers_list_json():
    res = bd("--json", "readers", "list")
    names = {r["name"] for r in json.loads(res.stdout)}
    assert {"dicom", "tiff"} <= names


def test_the_api_in_a_script_logs_like_the_cli_and_reads_beitdomain_set(tmp_path):
    # A script calling api.* printed nothing (no handler) and ignored $BEITDOMAIN_SET.
    data = write_separable_set(tmp_path / "d", per_class=3)
    script = (
        "from beitdomain import api\n"
        f"api.scan({str(data)!r}, progress=True)\n"
        "r = api.load_recipe(sets=['finetune.train.batch_size=4'])\n"
        "print(r.finetune.labels, r.finetune.train.batch_size)\n"
    )
    env = cli_env(BEITDOMAIN_LOG_EVERY="0", BEITDOMAIN_SET="finetune.labels=5/class")
    res = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["5/class", "4"]
    assert "INFO" in res.stderr and "6/6" in res.stderr  # the scan's progress, as the CLI's
    quiet = script.replace(
        "from beitdomain import api\n",
        "from beitdomain import api\napi.configure_logging(quiet=True)\n",
    )
    res = subprocess.run(
        [sys.executable, "-c", quiet], capture_output=True, text=True, env=env, timeout=300
    )
    assert res.returncode == 0 and "INFO" not in res.stderr, res.stderr
