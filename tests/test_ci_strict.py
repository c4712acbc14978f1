"""Under CI=true a skipped test or module fails the run; a GPU-only skip stays a skip."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SAMPLE = '''
import pytest

def test_download_missing():
    pytest.skip("offline suite unavailable")

def test_gpu_only():
    pytest.skip("needs a CUDA GPU: none here")

def test_fine():
    pass
'''

MISSING_IMPORT = '''
import pytest

pytest.importorskip("no_such_module_for_matryoshka_kv")

def test_never_runs():
    pass
'''


def _pytest(folder: Path, ci: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci is not None:
        env["CI"] = ci
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(folder)],
                          capture_output=True, text=True, cwd=folder, env=env, timeout=120, check=False)


@pytest.fixture
def suite(tmp_path: Path) -> Path:
    shutil.copy(Path(__file__).with_name("conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "test_sample.py").write_text(SAMPLE)
    return tmp_path


def test_skips_fail_under_ci(suite: Path) -> None:
    proc = _pytest(suite, "true")
    assert proc.returncode == 1, proc.stdout
    assert "1 failed, 1 passed, 1 skipped" in proc.stdout
    assert "skipped under CI=true" in proc.stdout and "offline suite unavailable" in proc.stdout


def test_skips_stay_skips_outside_ci(suite: Path) -> None:
    proc = _pytest(suite, None)
    assert proc.returncode == 0, proc.stdout
    assert "1 passed, 2 skipped" in proc.stdout


def test_a_module_skipped_on_a_missing_import_fails_under_ci(suite: Path) -> None:
    (suite / "test_sample.py").unlink()
    (suite / "test_missing.py").write_text(MISSING_IMPORT)
    assert "1 skipped" in _pytest(suite, None).stdout
    proc = _pytest(suite, "true")
    assert proc.returncode != 0
    assert "no_such_module_for_matryoshka_kv" in proc.stdout
