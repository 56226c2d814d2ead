"""``mlxcluster doctor`` reports what it finds on this machine."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from mlxcluster.cli import app
from mlxcluster.worker.blas import openblas_path


def test_doctor_json_reports_each_part(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLXCLUSTER_MODELS_DIR", str(tmp_path / "models"))
    result = CliRunner().invoke(app, ["doctor", "--json"])
    checks = {c["name"]: c for c in json.loads(result.stdout)}
    assert set(checks) == {"mlxcluster", "mlx", "blas", "nats-server", "models dir", "demo model"}
    assert checks["nats-server"]["status"] == "ok" and "nats-server" in checks["nats-server"]["detail"]
    assert checks["mlx"]["status"] == "ok"
    # an empty models dir is a warning with the command that fixes it, not a failure
    assert checks["demo model"]["status"] == "warn" and "models demo" in checks["demo model"]["detail"]
    assert checks["blas"]["status"] == ("ok" if openblas_path() else "warn")
    assert result.exit_code == 0
