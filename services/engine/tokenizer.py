"""Tokenizer, chat template and incremental detokenization.

Encoding uses ``tokenizer.json`` through the ``tokenizers`` library, so special
tokens (BOS...) are added exactly as Hugging Face's fast tokenizer adds them.
Chat prompts are rendered with the checkpoint's jinja2 chat template and then
encoded without special tokens, as ``apply_chat_template`` does.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import cached_property
from pathlib import Path
from typing import Any

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

from services.common.errors import InvalidRequestError, ModelFormatError
from services.common.model_files import read_json_object


def config_eos_token_ids(value: Any) -> tuple[int, ...]:
    """A model config's ``eos_token_id``: one id, a list of them, or none."""
    return tuple(value) if isinstance(value, list) else (() if value is None else (value,))


def end_of_sequence_ids(config_eos: Iterable[int], tokenizer: Tokenizer) -> frozenset[int]:
    """The ids that end a request (unless ``ignore_eos``): the config's and the tokenizer's."""
    eos = set(config_eos)
    if tokenizer.eos_token_id is not None:
        eos.add(tokenizer.eos_token_id)
    return frozenset(eos)


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):  # AddedToken serialised form
        return value.get("content")
    return value


def _config_text(cfg: dict[str, Any], key: str, file: Path) -> str | None:
    """A special token of tokenizer_config.json: its text, a serialised AddedToken's or none."""
    text = _token_text(cfg.get(key))
    if text is not None and not isinstance(text, str):
        raise ModelFormatError(f"{file}: {key} must be a token's text, got {text!r}")
    return text


def _chat_template_text(value: Any, file: Path) -> str | None:
    """tokenizer_config.json's ``chat_template``: one template, or Hugging Face's list of named
    ones, of which the one named ``default`` is the chat template."""
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        value = named.get("default")
    if value is not None and not isinstance(value, str):
        raise ModelFormatError(f"{file}: chat_template must be a template's text, got {value!r}")
    return value


def _raise_exception(message: str) -> None:
    raise InvalidRequestError(f"chat template: {message}")


class Tokenizer:
    def __init__(self, path: Path) -> None:
        file = path / "tokenizer.json"
        if not file.is_file():
            raise ModelFormatError(f"{path} has no tokenizer.json")
        try:
            self._tok = HFTokenizer.from_file(str(file))
        except Exception as exc:  # the tokenizers library raises a bare Exception
            raise ModelFormatError(f"{file} is not a tokenizer: {exc}") from None
        cfg_file = path / "tokenizer_config.json"
        cfg = read_json_object(cfg_file) if cfg_file.is_file() else {}
        self.bos_token = _config_text(cfg, "bos_token", cfg_file)
        self.eos_token = _config_text(cfg, "eos_token", cfg_file)
        self.chat_template = _chat_template_text(cfg.get("chat_template"), cfg_file)
        template_file = path / "chat_template.jinja"
        if self.chat_template is None and template_file.is_file():
            try:
                self.chat_template = template_file.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise ModelFormatError(f"{template_file} cannot be read: {exc}") from None

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def eos_token_id(self) -> int | None:
        return None if self.eos_token is None else self._tok.token_to_id(self.eos_token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # encode_batch releases the GIL while it works (encode holds it): a long prompt encoded
        # on a thread leaves the caller's event loop running (services/router/prompts.py).
        [encoding] = self._tok.encode_batch([text], add_special_tokens=add_special_tokens)
        return encoding.ids

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(token_ids, skip_special_tokens=skip_special_tokens)

    @cached_property
    def _chat_template(self) -> jinja2.Template:
        if not self.chat_template:
            raise InvalidRequestError("this model has no chat template; send a plain prompt")
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
        )
        env.globals["raise_exception"] = _raise_exception
        try:
            return env.from_string(self.chat_template)
        except jinja2.TemplateError as exc:
            raise ModelFormatError(f"this model's chat template does not compile: {exc}") from None

    def apply_chat_template(
        self, messages: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        try:
            return self._chat_template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
            )
        except InvalidRequestError:  # the template's raise_exception: refused for this request
            raise
        except Exception as exc:  # the template is the checkpoint's code: any failure is its
            raise ModelFormatError(f"this model's chat template failed: {exc!r}") from None

    def encode_chat(self, prompt: str) -> list[int]:
        text = self.apply_chat_template([{"role": "user", "content": prompt}])
        return self.encode(text, add_special_tokens=False)


class IncrementalDetokenizer:
    """Turns a growing list of output tokens into text deltas.

    Decoding one token at a time breaks multi-byte characters and drops the
    leading space some decoders strip, so each step decodes a short window
    (the tokens already emitted since the last boundary plus the new ones) and
    emits only what the window adds. A window ending in U+FFFD is an
    incomplete character and is held back until the next token completes it.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self.token_ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0
        self.text = ""

    def add(self, token_ids: list[int]) -> str:
        self.token_ids.extend(token_ids)
        decode = self._tokenizer.decode
        prefix = decode(self.token_ids[self._prefix_offset : self._read_offset])
        full = decode(self.token_ids[self._prefix_offset :])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""
        delta = full[len(prefix) :]
        self._prefix_offset, self._read_offset = self._read_offset, len(self.token_ids)
        self.text += delta
        return delta
