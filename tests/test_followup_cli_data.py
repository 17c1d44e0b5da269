"""Follow-ups on issues 39 and 40: --resume-other-data on the command line, label subsets that
hold every class, one label-budget warning rule, the --on-error hint, and a label CSV whose paths
repeat the data folder's name."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def stripes(tmp_path_factory):
    from helpers import write_separable_set

    return write_separable_set(tmp_path_factory.mktemp("fu") / "stripes", per_class=6, size=32)


# --------------------------------------------------------------------------------------------
# --resume on other data: the refusal names --resume-other-data, which lets it go on
# --------------------------------------------------------------------------------------------


def test_resume_on_other_data_names_the_flag_and_the_flag_goes_on_with_a_warning(stripes, tmp_path):
    import json
    import shutil

    from helpers import TOKENIZER_SETS, cli, lose_newest_checkpoint, said, sets_to_args

    out = tmp_path / "tok"
    sets = sets_to_args(
        [*TOKENIZER_SETS, "tokenizer.train.steps=2", "tokenizer.train.ckpt_every=1"]
    )
    res = cli("tokenizer", "train", "--data", str(stripes), "--out", str(out), *sets)
    assert res.exit_code == 0, res.output
    lose_newest_checkpoint(out, "tokenizer.safetensors")
    first = json.loads((out / "manifest.json").read_text())["data_fingerprint"]
    other = shutil.copytree(stripes / "horizontal", tmp_path / "other" / "horizontal").parent
    again = ["tokenizer", "train", "--data", str(other), "--out", str(out), "--resume", *sets]

    res = cli(*again)
    assert res.exit_code != 0
    assert said(res.output, "--resume-other-data"), res.output
    assert "Traceback" not in res.output

    res = cli(*again, "--resume-other-data")
    assert res.exit_code == 0, res.output
    assert said(res.output, "resuming on other data"), res.output
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "completed"
    assert m["data_fingerprint"] == first
    assert len(m["other_data"]) == 1


def test_resume_other_data_without_resume_is_refused(stripes, tmp_path):
    from helpers import cli, said

    res = cli("finetune", "--data", str(stripes), "--out", str(tmp_path / "ft"),
              "--resume-other-data")  # fmt: skip
    assert res.exit_code != 0
    assert said(res.output, "--resume-other-data applies only with --resume"), res.output
    assert not (tmp_path / "ft").exists()
