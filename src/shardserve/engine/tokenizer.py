"""A model folder's tokenizer and chat template, read once at load time. A file that does
not parse is a ``ValueError`` naming it (the load fails, nothing else changes)."""

from __future__ import annotations

import json
from pathlib import Path

from shardserve.config import ModelConfig


def load_tokenizer(config: ModelConfig):
    """The folder's ``tokenizer.json`` as a ``tokenizers.Tokenizer``, or None if it has none."""
    if config.tokenizer_path is None:
        return None
    from tokenizers import Tokenizer

    try:
        tokenizer = Tokenizer.from_file(config.tokenizer_path)
    except Exception as e:  # tokenizers raises a bare Exception on a malformed file
        raise ValueError(f"{config.tokenizer_path}: not a valid tokenizer file "
                         f"({str(e)[:200]})") from None
    # A tokenizer.json may carry padding and truncation settings (sentence-transformers'
    # pad to 128): the engines pad themselves, and cutting a prompt short is for the caller
    # to ask for, never a silent default.
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


def load_chat_template(folder: str) -> str | None:
    """``chat_template.jinja``, else ``chat_template`` of ``tokenizer_config.json``."""
    path = Path(folder) / "chat_template.jinja"
    if path.is_file():
        return path.read_text()
    cfg = Path(folder) / "tokenizer_config.json"
    if not cfg.is_file():
        return None
    try:
        data = json.loads(cfg.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{cfg}: expected a JSON object")
    template = data.get("chat_template")
    return template if isinstance(template, str) else None
