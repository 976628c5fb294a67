"""Chat templates: the model's Jinja template rendered the way transformers' apply_chat_template does.

Kept apart from the tokenizer so that raw completion (`flashlm run -p`) never imports jinja2 (~5 MiB of
RSS, measured with `tools/rss_run.py --phases`).
"""
from __future__ import annotations

import functools
import json
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import FlashlmError


class ChatTemplateError(ValueError, FlashlmError):
    """A chat template is missing, invalid, or refused the conversation (via `raise_exception`)."""


# --- chat template environment ------------------------------------------------------------------------------------

def _raise_exception(message: str):
    raise ChatTemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # Jinja's own tojson escapes HTML characters and ASCII-escapes text, which would change the prompt the
    # model was trained on (tool schemas etc.); transformers overrides it the same way.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _TemplateDict:
    # Templates only need dict construction; handing them the real `dict` type exposes type-level attributes.
    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    # Namespaces that reject underscore names, so `ns.__class__`-style keys can't be planted and read back.
    def __init__(*args, **kwargs):  # same signature trick as jinja's Namespace, so `namespace(self=...)` works
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _check_namespace_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _check_namespace_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)


def _check_namespace_name(name) -> None:
    if isinstance(name, str) and name.startswith("_"):
        raise jinja2.exceptions.SecurityError(f"chat templates cannot store underscore attribute {name!r}")


@functools.lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    """Compile once per distinct template string: compiling costs far more than rendering."""
    # Templates come from the Hub and are untrusted code: the immutable sandbox blocks dunder access and mutation
    # of Python objects; trim/lstrip blocks and loopcontrols are what transformers enables, so output matches.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now,
                       dict=_TemplateDict(), namespace=_TemplateNamespace)
    try:
        return env.from_string(template)
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"invalid chat template: {e}") from e


def _plain(value: Any) -> Any:
    """A copy built only from JSON-like types, so templates can't call methods of rich caller objects."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    for base in (bool, str, int, float):   # subclasses (enums, numpy scalars) lose their extra methods
        if isinstance(value, base):
            return base(value)
    return f"<{type(value).__name__}>"


_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _normalize_message(message: dict) -> dict:
    """Drop None values and alias reasoning fields, as transformers does before rendering."""
    if not isinstance(message, dict):
        raise TypeError(f"chat messages must be dicts, got {message!r}")
    # Many templates print a literal "None" for content=None but handle a missing key (OpenAI sends such messages).
    message = {k: v for k, v in message.items() if v is not None}
    reasoning = next((message[k] for k in _REASONING_FIELDS if k in message), None)
    if reasoning is not None:   # templates read `reasoning_content`, gpt-oss reads `thinking`
        message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
    return message


def render(template: str, messages: list, variables: dict, *, add_generation_prompt: bool) -> str:
    """The template's text for `messages`, with `variables` (special token strings, tools, extras) defined."""
    compiled = _compile(template)
    chat = [_normalize_message(m) for m in _plain(list(messages))]
    try:
        return compiled.render(messages=chat, add_generation_prompt=add_generation_prompt, **_plain(variables))
    except jinja2.TemplateError as e:   # sandbox violations, undefined calls...: one error type for callers
        raise ChatTemplateError(f"chat template failed: {e}") from e
