"""Tokenizer, chat template and streaming detokenisation.

Owns :class:`Tokenizer` (a HF ``tokenizers`` tokenizer built from
``tokenizer.json`` text or a model folder, plus the special tokens and the
chat template), :func:`render_chat_template` (jinja2 with Hugging Face
semantics: ``messages``, ``add_generation_prompt``, the special-token strings,
``raise_exception``, ``strftime_now``, HF's ``tojson``) and
:class:`StreamDecoder` (incremental detokenisation that never emits half of a
UTF-8 multibyte character).

Knows nothing about models, sampling, the KV cache or files other than the
HF tokenizer files (``tokenizer.json``, ``tokenizer_config.json``,
``chat_template.jinja``, ``special_tokens_map.json``,
``generation_config.json``, ``config.json``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

from moestream.convert.errors import ModelFormatError, MoestreamError

# Printed as a replacement while a multibyte character is still incomplete.
_REPLACEMENT = "\ufffd"
# End-of-turn tokens used as EOS when a model folder names none.
_FALLBACK_EOS = ("<|im_end|>", "<|endoftext|>", "</s>", "<|eot_id|>", "<|end_of_text|>", "<｜end▁of▁sentence｜>")
_SPECIAL_NAMES = ("bos_token", "eos_token", "pad_token", "unk_token")


class ChatTemplateError(MoestreamError):
    """The chat template is missing, invalid, or raised an error for these messages."""


def _token_content(value: Any) -> str | None:
    """A special token as stored by HF: a string or an AddedToken dict with ``content``."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _id_list(value: Any) -> list[int]:
    """``eos_token_id`` as an int, a list of ints or None -> list."""
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value if isinstance(v, int)]
    return []


def _pick_template(value: Any) -> str | None:
    """``chat_template`` as a string, or HF's list of ``{"name", "template"}`` (pick ``default``)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, Mapping)}
        return named.get("default") or next(iter(named.values()), None)
    return None


def _read_json(path: Path) -> dict:
    """Read a JSON object, raising ModelFormatError naming the file when it is corrupt."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFormatError(f"cannot read {path}: {exc}; re-download or re-convert the model") from exc
    if not isinstance(data, dict):
        raise ModelFormatError(f"{path} is not a JSON object; re-download or re-convert the model")
    return data


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    """HF's ``tojson`` filter (no HTML escaping, unicode kept)."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    """Exposed to templates as ``raise_exception`` (HF semantics)."""
    raise jinja2.exceptions.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    """Exposed to templates as ``strftime_now`` (HF semantics)."""
    return datetime.now().strftime(fmt)


def _compile_template(source: str) -> jinja2.Template:
    """Compile a chat template in HF's sandboxed environment.

    Raises:
        ChatTemplateError: on a syntax error.
    """
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as exc:
        raise ChatTemplateError(f"the model's chat template has a syntax error (line {exc.lineno}): {exc.message}") from exc


def render_chat_template(template: str, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True,
                         special_tokens: Mapping[str, str | None] | None = None, **extra: Any) -> str:
    """Render a chat template with Hugging Face semantics.

    Args:
        template: the jinja2 source (``tokenizer_config.json["chat_template"]``).
        messages: ``[{"role": ..., "content": ...}, ...]``.
        add_generation_prompt: append the assistant-turn opener.
        special_tokens: ``bos_token``, ``eos_token``, ... strings available to the template.
        **extra: further template variables (``tools``, ``documents``, ...).

    Returns:
        The prompt text.

    Raises:
        ChatTemplateError: when the template is invalid or rejects the messages.
    """
    compiled = _compile_template(template)
    variables: dict[str, Any] = {"tools": None, "documents": None}
    variables.update({k: v for k, v in (special_tokens or {}).items()})
    variables.update(extra)
    try:
        return compiled.render(messages=[dict(m) for m in messages], add_generation_prompt=add_generation_prompt,
                               **variables)
    except jinja2.exceptions.TemplateError as exc:
        raise ChatTemplateError(f"the chat template rejected the messages: {exc}") from exc


def _validate_messages(messages: Sequence[Mapping[str, Any]]) -> None:
    """Check the OpenAI/HF message shape.

    Raises:
        ChatTemplateError: naming the first bad message.
    """
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)) or not messages:
        raise ChatTemplateError("messages must be a non-empty list of {'role': ..., 'content': ...}")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str):
            raise ChatTemplateError(f"message {i} needs a string 'role' (system, user or assistant)")
        if not isinstance(m.get("content", ""), (str, list, type(None))):
            raise ChatTemplateError(f"message {i}: 'content' must be a string")


@dataclass
class Tokenizer:
    """A HF fast tokenizer plus the special tokens and chat template of one model.

    Attributes:
        backend: the ``tokenizers.Tokenizer``.
        chat_template: jinja2 source, or None when the model has none.
        special_tokens: ``{"bos_token": str|None, "eos_token": ..., "pad_token": ..., "unk_token": ...}``.
        eos_token_ids: every id that ends generation.
        add_bos: prepend ``bos_token`` to plain (non-chat) prompts.
    """

    backend: HFTokenizer
    chat_template: str | None = None
    special_tokens: dict[str, str | None] = field(default_factory=dict)
    eos_token_ids: set[int] = field(default_factory=set)
    add_bos: bool = False

    # ---------------------------------------------------------------- building
    @classmethod
    def from_shards(cls, reader: Any) -> "Tokenizer":
        """The tokenizer, chat template and EOS ids carried in a moestream shard model's metadata.

        Args:
            reader: an open ``moestream.convert.shards.ShardedModel``.

        Raises:
            ModelFormatError: the shards carry no tokenizer.
        """
        if not reader.tokenizer_json:
            raise ModelFormatError(f"{reader.paths[0]}: the shards carry no tokenizer; convert from an HF folder "
                                   "that has tokenizer.json")
        eos = reader.config.get("eos_token_id")
        return cls.from_str(reader.tokenizer_json, chat_template=reader.chat_template,
                            eos_token_ids=[eos] if isinstance(eos, int) else (eos or []))

    @classmethod
    def from_str(cls, tokenizer_json: str, *, chat_template: str | None = None,
                 tokenizer_config: Mapping[str, Any] | None = None,
                 eos_token_ids: Iterable[int] = ()) -> "Tokenizer":
        """Build from ``tokenizer.json`` text (as carried in shard metadata).

        Args:
            tokenizer_json: the ``tokenizer.json`` contents.
            chat_template: jinja2 source; falls back to ``tokenizer_config["chat_template"]``.
            tokenizer_config: parsed ``tokenizer_config.json`` (special token strings), optional.
            eos_token_ids: ids from ``config.json`` / ``generation_config.json``.

        Returns:
            The tokenizer.

        Raises:
            ModelFormatError: when the JSON is not a valid tokenizer.
        """
        try:
            backend = HFTokenizer.from_str(tokenizer_json)
        except Exception as exc:  # tokenizers raises a bare Exception on bad JSON
            raise ModelFormatError(f"tokenizer.json is not a valid HF tokenizer: {exc}") from exc
        return cls._assemble(backend, chat_template, dict(tokenizer_config or {}), eos_token_ids)

    @classmethod
    def from_file(cls, path: str | Path, **kwargs: Any) -> "Tokenizer":
        """Build from a ``tokenizer.json`` file (see :meth:`from_str` for kwargs).

        Raises:
            ModelFormatError: when the file is missing or invalid.
        """
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ModelFormatError(f"cannot read tokenizer file {path}: {exc.strerror or exc}") from exc
        return cls.from_str(text, **kwargs)

    @classmethod
    def from_folder(cls, folder: str | Path) -> "Tokenizer":
        """Build from a HF model folder.

        Reads ``tokenizer.json`` (required), and when present
        ``tokenizer_config.json``, ``chat_template.jinja``,
        ``special_tokens_map.json``, ``generation_config.json``, ``config.json``.

        Raises:
            ModelFormatError: when ``tokenizer.json`` is missing or a file is corrupt.
        """
        folder = Path(folder)
        tok_path = folder / "tokenizer.json"
        if not tok_path.is_file():
            raise ModelFormatError(
                f"no tokenizer.json in {folder}; moestream needs the HF fast tokenizer file next to config.json")
        config: dict[str, Any] = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            if (folder / name).is_file():
                config.update(_read_json(folder / name))
        template = None
        if (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        elif (folder / "chat_template.json").is_file():
            template = _pick_template(_read_json(folder / "chat_template.json").get("chat_template"))
        eos: list[int] = []
        for name in ("generation_config.json", "config.json"):
            if (folder / name).is_file():
                eos += _id_list(_read_json(folder / name).get("eos_token_id"))
        return cls.from_file(tok_path, chat_template=template, tokenizer_config=config, eos_token_ids=eos)

    @classmethod
    def _assemble(cls, backend: HFTokenizer, chat_template: str | None, config: dict[str, Any],
                  eos_token_ids: Iterable[int]) -> "Tokenizer":
        """Fill in special tokens and EOS ids from every source available."""
        template = chat_template or _pick_template(config.get("chat_template"))
        specials = {name: _token_content(config.get(name)) for name in _SPECIAL_NAMES}
        eos_ids = {int(i) for i in eos_token_ids}
        if specials["eos_token"] is not None:
            eid = backend.token_to_id(specials["eos_token"])
            if eid is not None:
                eos_ids.add(eid)
        if not eos_ids:
            eos_ids = {i for t in _FALLBACK_EOS if (i := backend.token_to_id(t)) is not None}
        if specials["eos_token"] is None and eos_ids:
            specials["eos_token"] = backend.id_to_token(min(eos_ids))
        add_bos = bool(config.get("add_bos_token", False)) and specials["bos_token"] is not None
        return cls(backend=backend, chat_template=template, special_tokens=specials, eos_token_ids=eos_ids,
                   add_bos=add_bos)

    # ---------------------------------------------------------------- use
    @property
    def vocab_size(self) -> int:
        """Size of the vocabulary including added tokens."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        """Text -> token ids.

        Args:
            text: the text (special-token strings in it become their ids).
            add_special_tokens: run the tokenizer's post-processor and prepend
                ``bos_token`` when the model asks for it (plain prompts); chat
                prompts already carry their special tokens.

        Returns:
            Token ids.
        """
        ids = self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self.add_bos:
            bos = self.backend.token_to_id(self.special_tokens["bos_token"] or "")
            if bos is not None and (not ids or ids[0] != bos):
                ids = [bos] + ids
        return ids

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        """Token ids -> text."""
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True,
                            **extra: Any) -> str:
        """Render ``messages`` with the model's chat template (HF semantics).

        Args:
            messages: ``[{"role": "user", "content": "hi"}, ...]``.
            add_generation_prompt: end with the assistant-turn opener.
            **extra: further template variables.

        Returns:
            The prompt text (tokenise it with ``encode(..., add_special_tokens=False)``).

        Raises:
            ChatTemplateError: when the model has no template or the messages are malformed.
        """
        _validate_messages(messages)
        if not self.chat_template:
            raise ChatTemplateError(
                "this model has no chat template (tokenizer_config.json 'chat_template' or chat_template.jinja); "
                "use plain generation (`moestream run`, /v1/completions) instead")
        return render_chat_template(self.chat_template, messages, add_generation_prompt=add_generation_prompt,
                                    special_tokens=self.special_tokens, **extra)

    def stream_decoder(self) -> "StreamDecoder":
        """A fresh incremental detokeniser for one generation."""
        return StreamDecoder(self)


class StreamDecoder:
    """Incremental detokenisation: push ids, get text deltas that are complete characters.

    Decodes a short window of recent ids (the "prefix" window keeps the
    tokenizer's context-dependent spacing right) and only emits text once it
    no longer ends in U+FFFD, i.e. once every multibyte character is complete.
    """

    def __init__(self, tokenizer: Tokenizer, *, skip_special_tokens: bool = True) -> None:
        """Args:
        tokenizer: the model's tokenizer.
        skip_special_tokens: leave special tokens (EOS, ...) out of the text.
        """
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0
        self._read = 0

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=self._skip)

    def push(self, token_id: int) -> str:
        """Add one id and return the newly completed text (possibly empty).

        Args:
            token_id: the next generated id.

        Returns:
            Text that is final: never a partial UTF-8 character.
        """
        self._ids.append(int(token_id))
        prefix_text = self._decode(self._ids[self._prefix:self._read])
        new_text = self._decode(self._ids[self._prefix:])
        if len(new_text) > len(prefix_text) and not new_text.endswith(_REPLACEMENT):
            delta = new_text[len(prefix_text):]
            self._prefix, self._read = self._read, len(self._ids)
            return delta
        return ""

    def flush(self) -> str:
        """Return whatever is still held back (at the end of generation), even if incomplete."""
        prefix_text = self._decode(self._ids[self._prefix:self._read])
        new_text = self._decode(self._ids[self._prefix:])
        self._prefix = self._read = len(self._ids)
        return new_text[len(prefix_text):]
