"""Issue 40, the items left after the first passes: run folders made through `make_dirs`,
`--resume` on other data, CSV manifests (their root, a carriage return in a name), a failed
`data cache` build, a failure between a job's start and its training, and the cosmetic items
(C1-C4)."""

from __future__ import annotations

import pytest

# --------------------------------------------------------------------------------------------
# B11: the run folder itself is made through fileio.make_dirs
# --------------------------------------------------------------------------------------------


def test_a_run_folder_that_cannot_be_made_is_a_write_error_naming_it(tmp_path):
    from beitdomain.engine.run.folder import RunDir
    from beitdomain.fileio import WriteError

    (tmp_path / "f").write_text("a file, not a folder")
    with pytest.raises(WriteError, match="could not create the folder") as e:
        RunDir.open(tmp_path / "f" / "run", kind="pretrain")
    assert str(tmp_path / "f" / "run") in str(e.value)
    assert (tmp_path / "f").read_text() == "a file, not a folder"
