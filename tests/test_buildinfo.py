"""The zipapp's build record: the tag it names, ``--version`` in a pyz, and the refusal of another Python."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from mlxcluster import buildinfo, cli


def test_runtime_tag_names_python_version_and_platform() -> None:
    tag = buildinfo.runtime_tag()
    impl, _, platform = tag.partition("-")
    assert impl == f"cp{sys.version_info.major}{sys.version_info.minor}"
    assert platform.startswith(f"{sys.platform}-") and platform == platform.lower()


def test_read_build_info(tmp_path: Path) -> None:
    assert buildinfo.read_build_info(tmp_path) is None  # a normal install has no record
    record = buildinfo.runtime_info(["mlxcluster-balancer-x"])
    (tmp_path / buildinfo.BUILD_INFO_FILE).write_text(json.dumps(record))
    assert buildinfo.read_build_info(tmp_path) == record
    assert record["tag"] == buildinfo.runtime_tag() and record["plugins"] == ["mlxcluster-balancer-x"]


def test_mismatch_names_both_pythons_and_the_fix() -> None:
    assert buildinfo.mismatch(buildinfo.runtime_info()) is None
    other = {"tag": "cp399-linux-x86_64", "python": "CPython 3.99.0", "python_version": "3.99"}
    message = buildinfo.mismatch(other)
    assert message is not None
    assert "built for cp399-linux-x86_64 (CPython 3.99.0)" in message
    assert f"runs on {buildinfo.runtime_tag()}" in message
    assert "python3.99 mlxcluster.pyz" in message


def test_version_text_in_and_outside_a_zipapp(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(buildinfo, "read_build_info", lambda package_dir=None: None)
    assert "zipapp" not in cli.version_text()
    record = {"tag": "cp311-linux-x86_64", "python": "CPython 3.11.7", "libc": "glibc 2.36"}
    monkeypatch.setattr(buildinfo, "read_build_info", lambda package_dir=None: record)
    text = cli.version_text()
    assert text.startswith("mlxcluster ")
    assert text.endswith("; zipapp built for cp311-linux-x86_64 with CPython 3.11.7, glibc 2.36)")
