"""A model folder's tokenizer and chat template, read once at load time, with what the folder's
``tokenizer_config.json`` says about special tokens. A file that does not parse is a
``ValueError`` naming it (the load fails, nothing else changes).

- ``add_bos_token`` / ``add_eos_token``, where the config sets them, decide whether encoding a
  prompt adds BOS / EOS (as transformers' Llama tokenizer does); otherwise ``tokenizer.json``'s
  own post-processor does.
- ``bos_token`` / ``eos_token`` are the texts a chat template gets.
- ``encode_literal`` encodes text in which special-token text (``<|eot_id|>`` typed by a user)
  stays text: user content never becomes a control token.
"""

from __future__ import annotations

import json
from pathlib import Path

from shardserve.config import ModelConfig


class TextTokenizer:
    def __init__(self, tokenizer, config: dict) -> None:
        from tokenizers import Tokenizer

        # A tokenizer.json may carry padding and truncation settings (sentence-transformers'
        # pad to 128): the engines pad themselves, and cutting a prompt short is for the
        # caller to ask for, never a silent default.
        tokenizer.no_padding()
        tokenizer.no_truncation()
        self._tok = tokenizer
        self._literal = Tokenizer.from_str(tokenizer.to_str())
        self._literal.encode_special_tokens = True
        self.bos_token, self.eos_token = _text(config.get("bos_token")), \
            _text(config.get("eos_token"))
        self._add = {key: config[key] for key in ("add_bos_token", "add_eos_token")
                     if isinstance(config.get(key), bool)}
        self.special_tokens = tuple(t.content for t in
                                    tokenizer.get_added_tokens_decoder().values() if t.special)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not add_special_tokens or not self._add:
            return self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        return self._wrap(self._tok.encode(text, add_special_tokens=False).ids)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if self._add:
            return [self._wrap(e.ids) for e in
                    self._tok.encode_batch(texts, add_special_tokens=False)]
        return [e.ids for e in self._tok.encode_batch(texts)]

    def encode_literal(self, text: str) -> list[int]:
        """``text`` with no special tokens added and none recognised inside it."""
        return self._literal.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def has_special_text(self, text: str) -> bool:
        return any(s in text for s in self.special_tokens)

    def _wrap(self, ids: list[int]) -> list[int]:
        bos = self._id(self.bos_token) if self._add.get("add_bos_token") else None
        eos = self._id(self.eos_token) if self._add.get("add_eos_token") else None
        return ([bos] if bos is not None else []) + ids + ([eos] if eos is not None else [])

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)


def load_tokenizer(config: ModelConfig) -> TextTokenizer | None:
    """The folder's tokenizer, or None if it has no ``tokenizer.json``."""
    if config.tokenizer_path is None:
        return None
    from tokenizers import Tokenizer

    try:
        tokenizer = Tokenizer.from_file(config.tokenizer_path)
    except Exception as e:  # tokenizers raises a bare Exception on a malformed file
        raise ValueError(f"{config.tokenizer_path}: not a valid tokenizer file "
                         f"({str(e)[:200]})") from None
    return TextTokenizer(tokenizer, tokenizer_config(config.path))


def tokenizer_config(folder: str) -> dict:
    """``tokenizer_config.json`` as a dict ({} without one)."""
    path = Path(folder) / "tokenizer_config.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def load_chat_template(folder: str) -> str | None:
    """``chat_template.jinja``, else ``chat_template`` of ``tokenizer_config.json``."""
    path = Path(folder) / "chat_template.jinja"
    if path.is_file():
        return path.read_text()
    template = tokenizer_config(folder).get("chat_template")
    return template if isinstance(template, str) else None


def _text(token: object) -> str | None:
    """A special token as the config writes it: a string, or {"content": ...}."""
    if isinstance(token, dict):
        token = token.get("content")
    return token if isinstance(token, str) else None
