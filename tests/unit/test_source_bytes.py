"""A source folder whose bytes are wrong: exit 1 with the file, what is wrong and what to do; nothing written.

Each case was a traceback (exit 3) before `builder.checkpoint` checked every header against its file.
"""

from __future__ import annotations

import json
import shutil
import struct

import pytest
from test_pipeline import write_recipe

from builder.cli import main


def _header(entries: dict) -> bytes:
    raw = json.dumps(entries).encode()
    return struct.pack("<Q", len(raw)) + raw


def _rewrite(weights, change) -> None:
    """Rewrite a safetensors file's header through `change(header) -> header`, keeping the data bytes."""
    data = weights.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    weights.write_bytes(_header(change(header)) + data[8 + length :])


def _first_tensor(header: dict) -> str:
    return next(name for name in header if name != "__metadata__")


def _drop_dtype(header):
    del header[_first_tensor(header)]["dtype"]
    return header


def _lie_offsets(header):
    header[_first_tensor(header)]["data_offsets"][1] += 10**9
    return header


def _lie_shape(header):
    header[_first_tensor(header)]["shape"][0] += 1
    return header


CASES = {
    "four-byte file": (lambda w: w.write_bytes(b"\x00\x01\x02\x03"), "fewer than the 8"),
    "header length 2**40": (lambda w: w.write_bytes(struct.pack("<Q", 2**40) + b"{}"), "header length"),
    "header is a list": (lambda w: w.write_bytes(_header([1, 2])), "not a mapping"),  # type: ignore[arg-type]
    "header not JSON": (lambda w: w.write_bytes(struct.pack("<Q", 4) + b"\xff\xfe{{"), "not JSON"),
    "entry without dtype": (lambda w: _rewrite(w, _drop_dtype), "has no dtype"),
    "offsets past the data": (lambda w: _rewrite(w, _lie_offsets), "outside the file's"),
    "shape that does not match its bytes": (lambda w: _rewrite(w, _lie_shape), "shape"),
    "body truncated mid-tensor": (lambda w: w.write_bytes(w.read_bytes()[:-4096]), "truncated or corrupted"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_weights_exit_1_naming_the_file(case, tiny_llama, tmp_path, capsys):
    source = tmp_path / "model"
    shutil.copytree(tiny_llama, source)
    damage, expected = CASES[case]
    damage(source / "model.safetensors")
    recipe = write_recipe(tmp_path, source)
    assert main(["build", str(recipe), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "model.safetensors is not a valid safetensors file" in err and expected in err
    assert "re-save or re-download" in err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists() or not any(p.suffix != ".lock" for p in (tmp_path / "out").iterdir())


def test_index_naming_a_missing_shard(tiny_llama, tmp_path, capsys):
    source = tmp_path / "model"
    shutil.copytree(tiny_llama, source)
    (source / "model.safetensors").rename(source / "model-00001-of-00002.safetensors")
    names = [
        info
        for info in json.loads(
            (source / "model-00001-of-00002.safetensors").read_bytes()[
                8 : 8 + struct.unpack("<Q", (source / "model-00001-of-00002.safetensors").read_bytes()[:8])[0]
            ]
        )
        if info != "__metadata__"
    ]
    weight_map = {name: "model-00001-of-00002.safetensors" for name in names}
    weight_map[names[-1]] = "model-00002-of-00002.safetensors"
    (source / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    recipe = write_recipe(tmp_path, source)
    assert main(["build", str(recipe), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "model-00002-of-00002.safetensors" in err and "Traceback" not in err


def test_config_that_is_not_a_mapping(tiny_llama, tmp_path, capsys):
    source = tmp_path / "model"
    shutil.copytree(tiny_llama, source)
    (source / "config.json").write_text("[1, 2]")
    recipe = write_recipe(tmp_path, source)
    assert main(["build", str(recipe), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "config.json" in err and "Traceback" not in err
