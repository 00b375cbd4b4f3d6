"""Files hashed while the gate runs (`HashAhead`): reused by the write step's file table only when unchanged."""

from __future__ import annotations

import hashlib
import os

from builder.artifact import HashAhead, file_table


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_the_file_table_takes_the_digests_hashed_ahead_and_rehashes_what_changed(tmp_path, monkeypatch):
    (tmp_path / "model.safetensors").write_bytes(b"w" * 5000)
    (tmp_path / "config.json").write_bytes(b"{}")
    ahead = HashAhead(tmp_path)
    assert ahead.entry(tmp_path / "model.safetensors").sha256 == _sha(b"w" * 5000)
    (tmp_path / "config.json").write_bytes(b'{"a": 1}')  # changed after it was hashed
    os.utime(tmp_path / "config.json", ns=(1, 1))  # a different mtime even on a coarse clock
    (tmp_path / "README.md").write_bytes(b"card")  # written after (the write step's files)
    read = []
    real_open = open
    monkeypatch.setattr(
        "builder.artifact.open", lambda path, *a: read.append(path.name) or real_open(path, *a), raising=False
    )
    table = file_table(tmp_path, ahead)
    assert sorted(read) == ["README.md", "config.json"]  # the weights were not read again
    assert table["model.safetensors"].sha256 == _sha(b"w" * 5000)
    assert table["config.json"].sha256 == _sha(b'{"a": 1}') and table["config.json"].size == 8
    assert table["README.md"].sha256 == _sha(b"card")
    assert table == file_table(tmp_path)  # the same table as hashing everything now
    ahead.cancel()
