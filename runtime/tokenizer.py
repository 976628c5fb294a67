"""Text <-> token ids for a converted model: encoding, streaming decoding and chat templates.

Chat templates are rendered the way transformers' `apply_chat_template` renders them, so prompts match the ones
the model was trained and evaluated with token for token (runtime/chat_template.py).
"""
from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer
from tokenizers.decoders import DecodeStream

from .modelfile import ModelFileError, read_small_verified
from .pagecache import drop_file


def _utf8(path: Path, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ModelFileError(f"{path}: not UTF-8 ({e.reason} at byte {e.start})") from None


# --- streaming detokenization --------------------------------------------------------------------------------------

class StreamDecoder:
    """Turns generated ids into text pieces; pieces concatenate to `decode(ids)`.

    A piece is '' while a UTF-8 character is split across tokens (byte-level BPE emits emoji/CJK bytes one
    token at a time) or when a skipped special token arrives.
    """

    def __init__(self, tokenizer: _HFTokenizer, skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self.reset()

    def reset(self) -> None:
        self._stream = DecodeStream(skip_special_tokens=self._skip)
        self._ids: list[int] = []
        self._emitted = 0   # characters handed out so far

    def step(self, token_id: int) -> str:
        self._ids.append(token_id)
        piece = self._stream.step(self._tokenizer, token_id) or ""
        self._emitted += len(piece)
        return piece

    def flush(self) -> str:
        """Text still held back at end of generation (an incomplete character decodes as U+FFFD), then reset."""
        text = self._tokenizer.decode(self._ids, skip_special_tokens=self._skip)
        tail = text[self._emitted:]
        self.reset()
        return tail


# --- tokenizer -----------------------------------------------------------------------------------------------------

class Tokenizer:
    def __init__(self, tokenizer_json_path, *, chat_template: str | None, special_tokens: dict,
                 eos_token_ids: list[int], tokenizer_json: str | None = None):
        try:
            self._tok = (_HFTokenizer.from_str(tokenizer_json) if tokenizer_json is not None
                         else _HFTokenizer.from_file(str(tokenizer_json_path)))
        except Exception as e:  # noqa: BLE001 - the tokenizers library raises plain Exceptions
            raise ModelFileError(f"{tokenizer_json_path}: not a valid tokenizer ({str(e)[:200]})") from None
        drop_file(tokenizer_json_path)   # parsed once; its cached pages would count against a memory limit
        self.chat_template = chat_template or None
        self.special_tokens = dict(special_tokens)
        self.eos_token_ids = frozenset(int(i) for i in eos_token_ids) | self._special_eos_id()

    @classmethod
    def from_folder(cls, folder, manifest: dict) -> "Tokenizer":
        """The folder's tokenizer.json and chat template, each checked against the manifest's sha256, and
        the vocabulary checked to fit the model (a token id past the embedding table would be read)."""
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.exists():
            raise ModelFileError(f"{path}: missing; this model folder has no tokenizer")
        text = _utf8(path, read_small_verified(folder, manifest, "tokenizer.json"))
        template_path = folder / "chat_template.jinja"
        template = (_utf8(template_path, read_small_verified(folder, manifest, "chat_template.jinja"))
                    if template_path.exists() else None)
        tok = cls(path, chat_template=template, special_tokens=manifest.get("special_tokens") or {},
                  eos_token_ids=(manifest.get("config") or {}).get("eos_token_ids") or [], tokenizer_json=text)
        vocab_size = (manifest.get("config") or {}).get("vocab_size")
        top = max(tok._tok.get_vocab(with_added_tokens=True).values(), default=-1)
        if isinstance(vocab_size, int) and top >= vocab_size:
            raise ModelFileError(f"{path}: token id {top} is not below the model's vocab_size {vocab_size}")
        return tok

    def _special_eos_id(self) -> frozenset[int]:
        # The template's end-of-turn token also ends generation, even if the config only lists another EOS id.
        eos = self.special_tokens.get("eos_token")
        tid = self._tok.token_to_id(eos) if isinstance(eos, str) else None
        return frozenset() if tid is None else frozenset([tid])

    # -- plain text

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def is_eos(self, token_id: int) -> bool:
        return token_id in self.eos_token_ids

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def decoder(self, skip_special_tokens: bool = True) -> StreamDecoder:
        return StreamDecoder(self._tok, skip_special_tokens)

    # -- chat

    def render_chat(self, messages: list[dict], *, add_generation_prompt: bool = True, tools: list[dict] | None = None,
                    **extra) -> str:
        """The prompt string transformers' apply_chat_template(..., tokenize=False) would produce."""
        from .chat_template import ChatTemplateError, render     # jinja2 loads when a chat is rendered
        if self.chat_template is None:
            raise ChatTemplateError("model has no chat template; use raw completion")
        if not messages:
            raise ChatTemplateError("cannot render an empty conversation")
        if tools is not None and not all(isinstance(t, dict) for t in tools):
            raise TypeError("tools must be JSON-schema dicts")
        # Special token strings first so explicit extras override them, as in transformers.
        return render(self.chat_template, messages, {**self.special_tokens, "tools": tools, "documents": None, **extra},
                      add_generation_prompt=add_generation_prompt)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> list[int]:
        # The template writes BOS etc. itself: adding special tokens again would double them.
        text = self.render_chat(messages, add_generation_prompt=add_generation_prompt, **kwargs)
        return self.encode(text, add_special_tokens=False)
