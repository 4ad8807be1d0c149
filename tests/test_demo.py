"""`make demo` runs the whole product end to end; this keeps it working."""
from __future__ import annotations

import subprocess
import sys

import pytest

from .conftest import ROOT

pytestmark = pytest.mark.cluster


def test_demo_shows_the_chain_working_end_to_end():
    result = subprocess.run([sys.executable, "-m", "keyless.demo"], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "kubectl auth whoami on the tenant -> keyless:tenant-a:argocd" in out
    assert "execProviderConfig: cat " in out
    assert "True    Reconciled" in out
    assert "secrets is forbidden" in out
