"""The embedded model: a tiny randomly initialised Qwen2 with a character-level tokenizer.

It is written as an ordinary Hugging Face directory (``config.json``, ``model.safetensors``,
``tokenizer.json``), so every consumer loads it the way it loads a real checkpoint:
``AutoModelForCausalLM.from_pretrained(path)`` / ``AutoTokenizer.from_pretrained(path)``, with no
custom code and no network. Nothing is ever fetched from a hub; the directory is built locally
from a seed and cached.

The tokenizer maps each ASCII character to one token (id = 3 + byte value), so a response of N
ASCII characters is N tokens (plus EOS); other characters are their UTF-8 bytes. ``encode`` adds
no special tokens, and there is no chat template: prompts are used verbatim.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

PAD_TOKEN = "<pad>"
EOS_TOKEN = "<eos>"
UNK_TOKEN = "<unk>"
# Only in a model built with add_bos=True (for tests of prompt rendering): id 259, after the bytes.
BOS_TOKEN = "<bos>"
# Order fixes the ids: <pad> must be 0 (padding with id 0 is a common default), then eos, unk.
SPECIAL_TOKENS = (PAD_TOKEN, EOS_TOKEN, UNK_TOKEN)
# Token id of byte b is BYTE_OFFSET + b, so "0" is 51, "+" is 46, " " is 35, "\n" is 13.
BYTE_OFFSET = len(SPECIAL_TOKENS)

# The pre-tokenizer regex of transformers' Qwen2Tokenizer, copied so that tokenizer.json matches
# what transformers 5 rebuilds (see _build_tokenizer). With no merges it does not change the
# output: every byte becomes its own token whatever the split.
_QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Bump when the vocabulary, the default architecture or the initialisation changes, so that a
# cache written by an older version is never reused.
_CACHE_VERSION = 2

# Files whose presence marks a complete model directory (the build renames a finished directory
# into place, so a partial one is never visible under the final name).
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte, the alphabet of a byte-level BPE vocabulary."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _build_tokenizer(model_max_length: int, add_bos: bool = False):  # -> PreTrainedTokenizerFast
    """A character-level tokenizer: byte-level BPE over the 256 bytes with no merges.

    Why not a WordLevel model over characters: transformers 5 loads every ``model_type=qwen2``
    directory with its own ``Qwen2Tokenizer``, which keeps only the vocabulary and merges of
    tokenizer.json and rebuilds normalizer, pre-tokenizer and decoder as Qwen2's byte-level ones.
    A WordLevel character vocabulary then loses spaces and newlines. A byte-level vocabulary
    with no merges survives that rebuild unchanged, and loads identically in transformers 4
    (which reads tokenizer.json as written). Every ASCII character is one token; other
    characters are their UTF-8 bytes, so no text is ever unknown and decode(encode(s)) == s.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for byte, char in _byte_to_unicode().items():
        vocab[char] = BYTE_OFFSET + byte
    if add_bos:
        vocab[BOS_TOKEN] = len(vocab)
    backend = Tokenizer(
        models.BPE(vocab=vocab, merges=[], unk_token=None, fuse_unk=False, byte_fallback=False)
    )
    # The same pipeline as Qwen2Tokenizer.__init__ in transformers 5.
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    if add_bos:
        # As Llama's tokenizer does: encode() puts BOS first unless add_special_tokens=False.
        backend.post_processor = processors.TemplateProcessing(
            single=f"{BOS_TOKEN} $A",
            pair=f"{BOS_TOKEN} $A $B",
            special_tokens=[(BOS_TOKEN, vocab[BOS_TOKEN])],
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        **({"bos_token": BOS_TOKEN} if add_bos else {}),
        model_max_length=model_max_length,
        # Cleanup would delete the space in "12 , 3"; characters must round-trip exactly.
        clean_up_tokenization_spaces=False,
    )


def build_tiny_model(
    out_dir: Path,
    *,
    seed: int = 0,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 512,
    max_position_embeddings: int = 256,
    add_bos: bool = False,
) -> Path:
    """Write a seeded random ``Qwen2ForCausalLM`` and its character tokenizer to ``out_dir``.

    Two builds with the same arguments write bit-identical ``model.safetensors``. With the
    defaults the model has 525,824 parameters and a vocabulary of 259 tokens (<pad> 0, <eos> 1,
    <unk> 2, then byte b at 3 + b). ``add_bos``: a tokenizer that puts ``<bos>`` (id 259, vocabulary
    260) before every encoded text unless told not to, as Llama-family tokenizers do.
    """
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise ValueError(
            f"hidden_size={hidden_size}, num_heads={num_heads}, num_kv_heads={num_kv_heads}: "
            "hidden_size must be divisible by num_heads and num_heads by num_kv_heads"
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    tokenizer = _build_tokenizer(max_position_embeddings, add_bos)
    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    bos_id = tokenizer.convert_tokens_to_ids(BOS_TOKEN) if add_bos else eos_id
    pad_id = tokenizer.convert_tokens_to_ids(PAD_TOKEN)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        # Real Qwen2 checkpoints also set bos == eos; the tokenizer never adds a BOS itself.
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
    )
    # A private generator state: the build neither depends on nor disturbs the caller's RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config).float()
    model.generation_config.bos_token_id = bos_id
    model.generation_config.eos_token_id = eos_id
    model.generation_config.pad_token_id = pad_id
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    _make_tokenizer_config_portable(out_dir / "tokenizer_config.json")
    return out_dir


def _make_tokenizer_config_portable(path: Path) -> None:
    # transformers 5 records its new class name "TokenizersBackend", which transformers 4 (still
    # supported: pyproject allows >=4.56, and SGLang releases pin 4.x) cannot resolve. Name the class real Qwen2 checkpoints name:
    # transformers 5 uses Qwen2Tokenizer for qwen2 models whatever this says, and transformers 4
    # maps it to Qwen2TokenizerFast, which loads tokenizer.json as written.
    cfg = json.loads(path.read_text())
    cfg["tokenizer_class"] = "Qwen2Tokenizer"
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def default_model_dir(seed: int = 0) -> Path:
    """Cache location of the embedded model built with ``seed``.

    ``$ASYNC_RL_CACHE_DIR/tiny-qwen2-char-s{seed}-v2`` when that variable is set, else
    ``$XDG_CACHE_HOME/async-rl/tiny-qwen2-char-s{seed}-v2`` (``XDG_CACHE_HOME`` defaults to
    ``~/.cache``).
    """
    return cache_root() / f"tiny-qwen2-char-s{seed}-v{_CACHE_VERSION}"


def cache_root() -> Path:
    """Where async-rl caches what it builds (the tiny model, converted GGUF models):
    ``$ASYNC_RL_CACHE_DIR``, else ``$XDG_CACHE_HOME/async-rl`` (``~/.cache/async-rl``)."""
    base_env = os.environ.get("ASYNC_RL_CACHE_DIR")
    if base_env:
        return Path(base_env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "async-rl"


def _is_complete(path: Path) -> bool:
    return all((path / name).is_file() for name in _REQUIRED_FILES)


def ensure_tiny_model(seed: int = 0) -> Path:
    """Return the cached embedded model for ``seed``, building it on first use.

    Safe when several processes call it at once: each builds into its own temporary directory
    beside the target and renames it into place; the first rename wins and the others discard
    their copy (the copies are bit-identical anyway).
    """
    target = default_model_dir(seed)
    if target.exists():
        if _is_complete(target):
            return target
        raise ValueError(
            f"{target} exists but is not a complete model directory (missing one of "
            f"{', '.join(_REQUIRED_FILES)}); delete it and the model will be rebuilt"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.info("building the embedded tiny model (seed %d) into %s", seed, target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        build_tiny_model(tmp, seed=seed)
        try:
            # rename(2) of a directory is atomic and fails if the target exists and is not
            # empty, i.e. if another process finished first.
            os.rename(tmp, target)
        except OSError:
            if not _is_complete(target):
                raise
            logger.info("another process built %s first; using its copy", target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
