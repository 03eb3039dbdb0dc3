"""Without the real test data the suite skips locally but fails in CI (CI=true):
a CI run that skipped most tests must not read as green."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import REPO

TEST = "tests/dataproc/test_readers.py::test_txt_lines_chunked_equals_whole"


def _run(tmp_path, ci: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["ZEROLM_TEST_DATA"] = str(tmp_path / "missing")
    if ci is not None:
        env["CI"] = ci
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", TEST], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)


def test_missing_test_data_skips_locally_and_fails_in_ci(tmp_path):
    local = _run(tmp_path, None)
    assert local.returncode == 0 and "1 skipped" in local.stdout, local.stdout
    ci = _run(tmp_path, "true")
    assert ci.returncode == 1 and "CI: real test data not found" in ci.stdout, ci.stdout
