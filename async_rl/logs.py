"""Logging for every process of a run: one format, stderr plus an optional log file.

Each entry point (the CLI, the launchers, an FSDP learner rank) calls ``setup_logging``
once; library modules only ever ``logging.getLogger(__name__)``.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path


def setup_logging(level: str, log_file: Path | None = None) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file is not None:
        handlers.append(logging.FileHandler(log_file))
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname).1s %(processName)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        handlers=handlers,
        force=True,
    )
    # Library progress bars and advisory warnings would drown the run's own output.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever fetched from a hub
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass
