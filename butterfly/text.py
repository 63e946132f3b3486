"""Text in, text out: a model directory's tokenizer, chat template and EOS tokens.

A directory written by ``save_pretrained`` (or a hub snapshot) holds ``tokenizer.json``
(read by the ``tokenizers`` library, what ``transformers``' fast tokenizers wrap),
``tokenizer_config.json`` (special tokens; often the chat template) and maybe
``chat_template.jinja`` and ``generation_config.json``. The template is rendered with
``jinja2`` in the sandbox and with the globals ``transformers`` gives it
(``raise_exception``, ``strftime_now``, ``tojson``), so the prompt is the one
``apply_chat_template`` makes; all of ``transformers`` is not needed.

:class:`TextStream` turns one row's tokens into text pieces as they come: it never
splits a UTF-8 character, and never lets out text that may turn out to begin a stop
string.
"""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from .errors import ApiError, ModelError
from .model.eos import read_eos_token_ids

if TYPE_CHECKING:
    from .model.gguf_file import GGUFFile

__all__ = ["Message", "TextStream", "Tokenizer"]

#: A chat message as OpenAI's and ``transformers``' APIs write it.
Message = Mapping[str, Any]


def _token_text(value: object) -> str | None:
    """A special token from ``tokenizer_config.json``: a string or an AddedToken dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return str(value["content"])
    return None


class Tokenizer:
    """A model's tokenizer, chat template and EOS tokens (see the module's docstring)."""

    def __init__(
        self,
        tokenizer: Any,
        *,
        chat_template: str | None = None,
        special_tokens: Mapping[str, str] | None = None,
        eos_token_ids: Sequence[int] = (),
        name: str = "",
    ) -> None:
        self._tokenizer = tokenizer
        self.chat_template = chat_template
        #: ``bos_token``, ``eos_token``, … as the chat template sees them.
        self.special_tokens = dict(special_tokens or {})
        self.eos_token_ids = tuple(eos_token_ids)
        self.name = name
        self._template: Any = None

    @classmethod
    def load(cls, source: str | os.PathLike[str]) -> Tokenizer:
        """The tokenizer of a model directory, of a ``.gguf`` file, or of an ``hf:`` or
        ``gguf:`` model name."""
        text = os.fspath(source)
        for prefix in ("hf:", "gguf:"):
            text = text.removeprefix(prefix)
        path = Path(text).expanduser()
        if path.is_file():
            return cls.from_gguf(path)
        return cls.from_directory(path)

    @classmethod
    def from_gguf(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """The tokenizer inside a GGUF file (``tokenizer.ggml.*``, see
        :mod:`butterfly.model.gguf_tokenizer`); ``ModelError`` when it has none or one of a
        kind that is not supported."""
        from .model.gguf_file import GGUFFile

        return cls.from_gguf_file(GGUFFile(Path(path), vocabulary=True))

    @classmethod
    def from_gguf_file(cls, file: GGUFFile) -> Tokenizer:
        """:meth:`from_gguf` of a file already opened with ``vocabulary=True``."""
        from .model.gguf_tokenizer import build_gguf_tokenizer

        tokenizer, special = build_gguf_tokenizer(file)
        template = file.value("tokenizer.chat_template", None)
        return cls(
            tokenizer,
            chat_template=template if isinstance(template, str) else None,
            special_tokens=special,
            eos_token_ids=file.eos_token_ids(),
            name=file.path.name,
        )

    @classmethod
    def from_directory(cls, directory: str | os.PathLike[str]) -> Tokenizer:
        """Load ``directory``'s tokenizer; ``ModelError`` when it has no ``tokenizer.json``."""
        import tokenizers

        path = Path(directory)
        if not (path / "tokenizer.json").is_file():
            raise ModelError(
                f"{str(path)!r} has no tokenizer.json; text in and out needs a directory "
                "with the model's tokenizer (as save_pretrained writes it)"
            )
        try:
            tokenizer = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
        except Exception as exc:  # the library raises bare Exceptions on bad files
            raise ModelError(f"{str(path / 'tokenizer.json')!r} could not be read: {exc}") from None
        # Some files pad (or cut) every encoding to a fixed length: prompts are padded here
        # with -1 where needed, and too long ones are refused with the context's length.
        tokenizer.no_padding()
        tokenizer.no_truncation()
        config: dict[str, Any] = {}
        config_path = path / "tokenizer_config.json"
        if config_path.is_file():
            try:
                config = json.loads(config_path.read_text(encoding="utf-8"))
            except ValueError as exc:
                raise ModelError(f"{str(config_path)!r} is not valid JSON: {exc}") from None
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: the default one
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        jinja_path = path / "chat_template.jinja"
        if jinja_path.is_file():  # what transformers ≥ 4.54 writes; it takes precedence
            template = jinja_path.read_text(encoding="utf-8")
        special = {
            key: text
            for key in ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token")
            if (text := _token_text(config.get(key))) is not None
        }
        eos = read_eos_token_ids(path)
        if not eos and "eos_token" in special:
            token = tokenizer.token_to_id(special["eos_token"])
            eos = () if token is None else (token,)
        return cls(
            tokenizer,
            chat_template=template if isinstance(template, str) else None,
            special_tokens=special,
            eos_token_ids=eos,
            name=path.name,
        )

    # -- tokens --------------------------------------------------------------------------

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """``text``'s token ids (with the tokenizer's BOS and the like, as ``tokenizer(text)``)."""
        if not isinstance(text, str):
            raise ApiError(f"text to encode must be a str, got {type(text).__name__}")
        return list(self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = True) -> str:
        return str(self._tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens))

    @property
    def vocab_size(self) -> int:
        return int(self._tokenizer.get_vocab_size(with_added_tokens=True))

    # -- chat ----------------------------------------------------------------------------

    def render_chat(
        self, messages: Sequence[Message], *, add_generation_prompt: bool = True
    ) -> str:
        """The prompt the chat template makes of ``messages`` (``apply_chat_template``'s text)."""
        check_messages(messages)
        if self.chat_template is None:
            raise ModelError(
                f"model {self.name!r} has no chat template (neither chat_template.jinja nor "
                "tokenizer_config.json's chat_template); use text completion instead"
            )
        import jinja2

        try:
            return str(
                self._compiled().render(
                    messages=[dict(m) for m in messages],
                    add_generation_prompt=add_generation_prompt,
                    tools=None,
                    documents=None,
                    **self.special_tokens,
                )
            )
        except jinja2.TemplateError as exc:
            raise ApiError(f"the model's chat template refused these messages: {exc}") from None

    def encode_chat(
        self, messages: Sequence[Message], *, add_generation_prompt: bool = True
    ) -> list[int]:
        """The template's prompt as token ids; the template writes the special tokens itself,
        so none are added (as ``apply_chat_template(tokenize=True)``)."""
        text = self.render_chat(messages, add_generation_prompt=add_generation_prompt)
        return self.encode(text, add_special_tokens=False)

    def _compiled(self) -> Any:
        if self._template is None:
            import jinja2
            import jinja2.ext
            import jinja2.sandbox

            def raise_exception(message: str) -> None:
                raise jinja2.TemplateError(message)

            def tojson(
                value: object, ensure_ascii: bool = False, indent: int | None = None, **_: Any
            ) -> str:
                return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent)

            def strftime_now(format: str) -> str:
                return datetime.datetime.now().strftime(format)

            # The environment transformers renders chat templates in.
            env = jinja2.sandbox.ImmutableSandboxedEnvironment(
                trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
            )
            env.filters["tojson"] = tojson
            env.globals["raise_exception"] = raise_exception
            env.globals["strftime_now"] = strftime_now
            try:
                self._template = env.from_string(self.chat_template or "")
            except jinja2.TemplateError as exc:
                raise ModelError(
                    f"model {self.name!r}'s chat template does not compile: {exc}"
                ) from None
        return self._template


def check_messages(messages: object) -> None:
    """A non-empty list of ``{"role": str, "content": ...}`` mappings; ``ApiError`` otherwise."""
    if isinstance(messages, str | bytes | Mapping) or not isinstance(messages, Sequence):
        raise ApiError(
            f"messages must be a list of {{'role': ..., 'content': ...}} dicts, got {messages!r:.80}"
        )
    if not messages:
        raise ApiError("messages is empty: give at least one {'role': 'user', 'content': ...}")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str):
            raise ApiError(f"messages[{i}] must be a dict with a 'role' string, got {m!r:.80}")


@attrs.define
class TextStream:
    """One generated row's tokens turned into text as they come.

    Decoding token by token would break characters that span tokens and drop the spaces
    that SentencePiece-style decoders attach to a word's first piece; instead each step
    decodes a short window of recent tokens and lets out what it adds to the window's text
    (the method of Hugging Face's text-generation-inference). Text that may be the start
    of a ``stop`` string is held back until it is known not to be. ``context`` (the
    prompt's last tokens, for a continuation of text) starts the window, so a first word
    keeps the space that separates it from the prompt.
    """

    tokenizer: Tokenizer
    stop: tuple[str, ...] = ()
    context: Sequence[int] = ()
    #: Text let out so far.
    text: str = ""
    finished: bool = False
    _ids: list[int] = attrs.field(factory=list)
    _prefix: int = 0
    _read: int = 0
    _pending: str = ""

    def __attrs_post_init__(self) -> None:
        self._ids = list(self.context)
        self._prefix, self._read = 0, len(self._ids)

    def push(self, token: int) -> str:
        """Add ``token``; the text it lets out (maybe none). After a stop string: finished."""
        if self.finished:
            return ""
        self._ids.append(token)
        before = self.tokenizer.decode(self._ids[self._prefix : self._read])
        after = self.tokenizer.decode(self._ids[self._prefix :])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""  # an incomplete character: wait for the token that completes it
        self._prefix, self._read = self._read, len(self._ids)
        return self._release(self._pending + after[len(before) :])

    def _release(self, pending: str) -> str:
        for stop in self.stop:
            at = pending.find(stop)
            if at >= 0:
                self.finished = True
                out, self._pending = pending[:at], ""
                self.text += out
                return out
        # Hold back the longest tail that a stop string begins with.
        hold = max(
            (n for s in self.stop for n in range(1, len(s)) if pending.endswith(s[:n])),
            default=0,
        )
        out, self._pending = pending[: len(pending) - hold], pending[len(pending) - hold :]
        self.text += out
        return out

    def flush(self) -> str:
        """At the end: what was held back, for a stop string that never came or for a
        character that never completed (decoded as ``transformers`` decodes it, with
        U+FFFD for the incomplete bytes)."""
        if self.finished:
            self._pending = ""
            return ""
        before = self.tokenizer.decode(self._ids[self._prefix : self._read])
        after = self.tokenizer.decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        tail = self._pending + (after[len(before) :] if len(after) > len(before) else "")
        out = self._release(tail)
        held, self._pending = self._pending, ""
        self.text += held
        return out + held
