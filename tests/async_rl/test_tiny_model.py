"""The embedded tiny model: a real Hugging Face directory, built offline, deterministic.

With the defaults the model has 525,824 parameters (vocabulary 259 = 3 special tokens + 256
bytes, hidden 128, 2 layers, tied embeddings).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from async_rl.tiny_model import build_tiny_model, default_model_dir, ensure_tiny_model


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "m", seed=0)


def test_tokenizer_ids_are_bytes_plus_three(model_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(model_dir)
    # "1" is byte 49, "2" 50, "+" 43, "3" 51, "4" 52, "=" 61, "6" 54; each id is byte + 3.
    assert tok.encode("12+34=46") == [52, 53, 46, 54, 55, 64, 55, 57]
    assert tok("12+34=")["input_ids"] == [52, 53, 46, 54, 55, 64]  # __call__: no BOS/EOS either
    assert tok.convert_ids_to_tokens([0, 1, 2]) == ["<pad>", "<eos>", "<unk>"]
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert tok.bos_token_id is None
    assert len(tok) == 259
    assert tok.chat_template is None


@pytest.mark.parametrize(
    "text",
    [
        "12+34=46",
        "sum 3,5,8,1:",
        "a  b\n\tc ",  # repeated spaces, newline, tab, trailing space survive
        " lead and 12 , 3 .",  # no cleanup of spaces before punctuation
        "Janet’s ducks lay 16 eggs; 5 × €2 = €10",  # non-ASCII: several bytes, still exact
    ],
)
def test_encode_decode_round_trip(model_dir: Path, text: str) -> None:
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok.encode(text)
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.decode(ids) == text  # nothing special was added
    assert len(ids) == len(text.encode("utf-8"))  # one token per byte


def test_eos_appended_explicitly_is_skipped(model_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(model_dir)
    assert tok.decode([*tok.encode("46"), tok.eos_token_id]) == "46<eos>"
    assert tok.decode([*tok.encode("46"), tok.eos_token_id], skip_special_tokens=True) == "46"


def test_config_ids_agree_with_tokenizer(model_dir: Path) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    assert config["model_type"] == "qwen2"
    assert config["vocab_size"] == 259
    assert (config["eos_token_id"], config["pad_token_id"], config["bos_token_id"]) == (1, 0, 1)
    assert config["tie_word_embeddings"] is True
    gen = json.loads((model_dir / "generation_config.json").read_text())
    assert (gen["eos_token_id"], gen["pad_token_id"]) == (1, 0)
    tok_config = json.loads((model_dir / "tokenizer_config.json").read_text())
    # transformers 4 cannot resolve the v5 name "TokenizersBackend".
    assert tok_config["tokenizer_class"] == "Qwen2Tokenizer"


def test_model_loads_and_runs_forward_525824_params(model_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    # embed 259*128 = 33,152 (tied with the head); per layer: q 128*128+128, k and v
    # 128*64+64 each, o 128*128, mlp 3*128*512, two norms 2*128 = 246,272; final norm 128.
    assert sum(p.numel() for p in model.parameters()) == 33_152 + 2 * 246_272 + 128 == 525_824
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = torch.tensor([tok.encode("12+34=")])
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, 6, 259)
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    # The head is the embedding matrix: logits = final hidden state @ E^T.
    with torch.no_grad():
        hidden = model.model(ids).last_hidden_state
    assert torch.allclose(logits, hidden @ model.model.embed_tokens.weight.T, atol=1e-6)
    # Random init (std 0.02) predicts near-uniformly: entropy close to log(259) = 5.557 nats
    # (5.54 measured), which is what RL from scratch starts from.
    logprobs = logits.log_softmax(-1)
    entropy = -(logprobs.exp() * logprobs).sum(-1)
    assert ((entropy > 5.45) & (entropy <= 5.557)).all()


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path) -> None:
    a = build_tiny_model(tmp_path / "a", seed=0)
    b = build_tiny_model(tmp_path / "b", seed=0)
    c = build_tiny_model(tmp_path / "c", seed=1)
    assert _sha256(a / "model.safetensors") == _sha256(b / "model.safetensors")
    assert _sha256(a / "tokenizer.json") == _sha256(c / "tokenizer.json")
    assert _sha256(a / "model.safetensors") != _sha256(c / "model.safetensors")


def test_build_does_not_touch_global_rng(tmp_path: Path) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_model(tmp_path / "m", seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_default_model_dir_honours_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("ASYNC_RL_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_model_dir(3) == tmp_path / "xdg" / "async-rl" / "tiny-qwen2-char-s3-v2"
    monkeypatch.setenv("ASYNC_RL_CACHE_DIR", str(tmp_path / "base"))
    assert default_model_dir() == tmp_path / "base" / "tiny-qwen2-char-s0-v2"


def test_ensure_builds_once_then_reuses(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("ASYNC_RL_CACHE_DIR", str(tmp_path))
    with caplog.at_level(logging.INFO, logger="async_rl.tiny_model"):
        path = ensure_tiny_model(seed=0)
    assert path == tmp_path / "tiny-qwen2-char-s0-v2"
    assert any("building" in r.message for r in caplog.records)
    mtime = (path / "model.safetensors").stat().st_mtime_ns
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="async_rl.tiny_model"):
        assert ensure_tiny_model(seed=0) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == mtime
    assert not caplog.records
    # No temporary build directories are left beside the cache entry.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-qwen2-char-s0-v2"]


def test_ensure_lost_race_keeps_winner(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Another process finishes first: the target appears while this one is still building.
    import async_rl.tiny_model as tm

    monkeypatch.setenv("ASYNC_RL_CACHE_DIR", str(tmp_path))
    target = tm.default_model_dir(0)
    real_build = tm.build_tiny_model
    winner: dict[str, int] = {}

    def build_after_a_faster_process(out_dir: Path, **kwargs: int) -> Path:
        real_build(target, **kwargs)
        winner["inode"] = (target / "model.safetensors").stat().st_ino
        return real_build(out_dir, **kwargs)

    monkeypatch.setattr(tm, "build_tiny_model", build_after_a_faster_process)
    assert tm.ensure_tiny_model(0) == target
    assert (target / "model.safetensors").stat().st_ino == winner["inode"]  # not replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]  # loser's copy removed


def test_ensure_rejects_incomplete_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ASYNC_RL_CACHE_DIR", str(tmp_path))
    (tmp_path / "tiny-qwen2-char-s0-v2").mkdir()
    (tmp_path / "tiny-qwen2-char-s0-v2" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"not a complete model directory.*delete it"):
        ensure_tiny_model(0)
