"""The torch engine and the installed transformers: the KV cache goes by the keyword this
version's forward names, and generation calls nothing transformers has deprecated (what it
deprecates it removes a few minor versions later: 5.24 warns that ``past_key_values`` goes in
5.40)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

from actors.torch_engine import Request, TorchEngine, cache_keyword


def _engine(path: Path, resume_kv: str) -> TorchEngine:
    return TorchEngine(
        str(path),
        device="cpu",
        dtype=torch.float32,
        max_num_seqs=4,
        max_new_tokens=6,
        temperature=1.0,
        top_p=1.0,
        stop_token_ids=[],
        pad_token_id=0,
        seed=3,
        resume_kv=resume_kv,
    )


def _deprecations(caught: list[warnings.WarningMessage]) -> list[str]:
    return [
        f"{w.category.__name__}: {w.message}"
        for w in caught
        if issubclass(w.category, (FutureWarning, DeprecationWarning))
    ]


def test_generation_calls_nothing_transformers_has_deprecated(tiny_model_dir: Path) -> None:
    for resume_kv in ("keep", "recompute"):
        engine = _engine(tiny_model_dir, resume_kv)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            engine.add(Request(0, [50, 51], 2, 0))
            engine.step()  # prefill + first decode
            engine.set_version(1)  # rows in flight: recompute re-prefills before the next step
            engine.add(Request(1, [52], 2, 1))  # merged into the running batch
            done = []
            while engine.has_work():
                done += engine.step()
        engine.close()
        assert len(done) == 4 and all(len(s.token_ids) == 6 for s in done)
        assert _deprecations(caught) == [], resume_kv


class _FakeOldSignatureModel:
    """Stands in for a model of transformers before the rename (4.56 .. early 5.x)."""

    def forward(
        self, input_ids: Any = None, past_key_values: Any = None, use_cache: bool = False
    ) -> None: ...


class _FakeNewSignatureModel:
    """Stands in for a model of transformers after the rename, where both names are known."""

    def forward(self, input_ids: Any = None, cache: Any = None, **kwargs: Any) -> None: ...


def test_the_cache_keyword_is_the_one_the_forward_names(tiny_model_dir: Path) -> None:
    assert cache_keyword(_FakeOldSignatureModel()) == "past_key_values"
    assert cache_keyword(_FakeNewSignatureModel()) == "cache"
    # The real model (its forward is wrapped by transformers' decorators): the keyword chosen
    # is one its signature lists.
    engine = _engine(tiny_model_dir, "keep")
    import inspect

    assert engine._cache_keyword in inspect.signature(engine.model.forward).parameters
    engine.close()
