"""runtime.tokenizer against transformers on the real SmolLM2 tokenizer, plus template sandbox checks."""
import jinja2
import pytest

from flashlm.runtime.chat_template import ChatTemplateError
from flashlm.runtime.tokenizer import Tokenizer

STREAM_TEXTS = [
    "Hello 👋🏽 世界",
    "Ça déjà vu, naïve Ünïcödé — «quotes»",
    "def f(x):\n    return x  # ok\n\n\tindented\r\nend",
    " leading spaces  and   runs",
    "日本語のテキストと絵文字🎉🧑‍💻",
]

CHATS = {
    "one_user": [{"role": "user", "content": "What is 2+2?"}],
    "multi_turn": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello. What do you need?"},
        {"role": "user", "content": "A haiku about flash memory."},
    ],
    "unicode": [
        {"role": "system", "content": "Réponds en français 🇫🇷"},
        {"role": "user", "content": "Qu'est-ce que 世界 veut dire? 👋🏽"},
    ],
}


@pytest.fixture(scope="module")
def hf_tok(smollm2_gguf):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)


@pytest.fixture(scope="module")
def smol_folder(hf_tok, tmp_path_factory):
    """The tokenizer files of a converted SmolLM2 folder."""
    folder = tmp_path_factory.mktemp("smollm2_tok")
    (folder / "tokenizer.json").write_text(hf_tok.backend_tokenizer.to_str(), encoding="utf-8")
    (folder / "chat_template.jinja").write_text(hf_tok.chat_template, encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def tok(hf_tok, smol_folder):
    """Our Tokenizer built via from_folder, as the runtime does."""
    import hashlib
    files = {p.name: {"sha256": hashlib.sha256(p.read_bytes()).hexdigest()} for p in smol_folder.iterdir()}
    manifest = {"special_tokens": {k: v for k, v in hf_tok.special_tokens_map.items() if isinstance(v, str)},
                "config": {"bos_token_id": hf_tok.bos_token_id, "eos_token_ids": [hf_tok.eos_token_id]},
                "files": files}
    return Tokenizer.from_folder(smol_folder, manifest)


def _hf_chat_ids(hf_tok, messages):
    out = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    # transformers 5 returns a BatchEncoding by default; 4.x returned the list itself.
    return list(out["input_ids"]) if hasattr(out, "keys") else list(out)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CHATS))
def test_chat_matches_transformers(tok, hf_tok, name):
    messages = CHATS[name]
    assert tok.render_chat(messages) == hf_tok.apply_chat_template(messages, add_generation_prompt=True,
                                                                   tokenize=False)
    assert tok.encode_chat(messages) == _hf_chat_ids(hf_tok, messages)


@pytest.mark.slow
def test_chat_without_generation_prompt(tok, hf_tok):
    messages = CHATS["multi_turn"]
    assert tok.render_chat(messages, add_generation_prompt=False) == hf_tok.apply_chat_template(
        messages, add_generation_prompt=False, tokenize=False)
    assert not tok.render_chat(messages, add_generation_prompt=False).endswith("assistant\n")


# Qwen2.5-style tool template: exercises whitespace control, namespace, loop controls, tojson and None dropping.
TOOL_TEMPLATE = """{%- set ns = namespace(sys='You are helpful.') %}
{%- if messages[0].role == 'system' %}{% set ns.sys = messages[0].content %}{% endif %}
{{- bos_token }}system
{{ ns.sys }}
{%- if tools %}

# Tools
<tools>
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
</tools>
{{ tools[0] | tojson(indent=2) }}
{%- endif %}
{{- eos_token }}
{% for message in messages %}
    {%- if message.role == 'system' %}{% continue %}{% endif %}
    {{- bos_token + message.role }}
    {%- if message.content is defined %}

{{ message.content }}
    {%- endif %}
    {%- for call in message.tool_calls | default([]) %}
<tool_call>{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}</tool_call>
        {%- if loop.last %}{% break %}{% endif %}
    {%- endfor %}
{{ eos_token }}
{% endfor %}
{%- if add_generation_prompt %}{{ bos_token }}assistant
{% endif %}"""


@pytest.mark.slow
def test_tool_template_matches_transformers(tok, hf_tok, smol_folder):
    tools = [{"type": "function", "function": {"name": "météo", "description": "Wetter für «Stadt»",
                                               "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
    messages = [
        {"role": "system", "content": "Use tools. 🛠"},
        {"role": "user", "content": "Weather in 東京?"},
        {"role": "assistant", "content": None,
         "tool_calls": [{"type": "function", "function": {"name": "météo", "arguments": {"city": "東京"}}}]},
        {"role": "tool", "content": "晴れ 25°C"},
    ]
    ours = Tokenizer(smol_folder / "tokenizer.json", chat_template=TOOL_TEMPLATE, special_tokens=tok.special_tokens, eos_token_ids=[])
    for kwargs in ({"tools": tools}, {}):
        expected = hf_tok.apply_chat_template(messages, chat_template=TOOL_TEMPLATE, add_generation_prompt=True,
                                              tokenize=False, **kwargs)
        assert ours.render_chat(messages, **kwargs) == expected
    assert "None" not in expected and "météo" in expected


@pytest.mark.slow
@pytest.mark.parametrize("text", STREAM_TEXTS + ["<|im_start|>user\nhi<|im_end|>", "", "a"])
def test_encode_matches_transformers(tok, hf_tok, text):
    assert tok.encode(text) == hf_tok.encode(text)
    assert tok.encode(text, add_special_tokens=False) == hf_tok.encode(text, add_special_tokens=False)


@pytest.mark.slow
def test_basic_properties(tok, hf_tok):
    assert tok.vocab_size == len(hf_tok)
    assert tok.token_to_id("<|im_end|>") == hf_tok.eos_token_id
    assert tok.token_to_id("no-such-token-xyz") is None
    assert tok.is_eos(hf_tok.eos_token_id) and not tok.is_eos(tok.encode("hi")[0])
    assert tok.decode(tok.encode("Hello 世界")) == "Hello 世界"


@pytest.mark.slow
@pytest.mark.parametrize("text", STREAM_TEXTS)
def test_stream_decode_concatenates_to_decode(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    dec = tok.decoder()
    pieces = [dec.step(i) for i in ids]
    assert all(isinstance(p, str) for p in pieces)
    assert "".join(pieces) == tok.decode(ids) == text
    assert "\ufffd" not in "".join(pieces)   # no half characters leaked out


@pytest.mark.slow
def test_stream_holds_partial_utf8(tok):
    ids = tok.encode("👋", add_special_tokens=False)
    assert len(ids) > 1   # byte-level BPE splits this emoji, which is the point of the test
    dec = tok.decoder()
    assert [dec.step(i) for i in ids] == [""] * (len(ids) - 1) + ["👋"]
    dec.step(ids[0])      # stream cut mid-character: flush hands out what decode() would show
    assert dec.flush() == tok.decode(ids[:1])


@pytest.mark.slow
def test_stream_special_tokens_and_reset(tok):
    ids = tok.encode_chat(CHATS["one_user"]) + tok.encode("Sure thing 👍", add_special_tokens=False)
    ids.append(tok.token_to_id("<|im_end|>"))
    dec = tok.decoder()
    assert "".join(dec.step(i) for i in ids) == tok.decode(ids, skip_special_tokens=True)
    dec.reset()
    raw = tok.decoder(skip_special_tokens=False)
    assert "".join(raw.step(i) for i in ids) == tok.decode(ids)
    assert "<|im_end|>" in tok.decode(ids)


# --- templates on a small tokenizer, no model needed ---------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_tokenizer_json(tmp_path_factory):
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers
    vocab = {chr(c): i for i, c in enumerate(range(32, 127))}
    vocab.update({"<s>": len(vocab), "</s>": len(vocab) + 1})
    t = HFTokenizer(models.WordLevel(vocab, unk_token=" "))
    t.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    t.decoder = decoders.Fuse()
    t.add_special_tokens(["<s>", "</s>"])
    path = tmp_path_factory.mktemp("tiny") / "tokenizer.json"
    t.save(str(path))
    return path


def _tiny(path, template):
    return Tokenizer(path, chat_template=template, special_tokens={"bos_token": "<s>", "eos_token": "</s>"},
                     eos_token_ids=[])


def test_template_variables_and_filters(tiny_tokenizer_json):
    template = ("{{ bos_token }}{% for m in messages %}{{ m.role }}:{{ m.content }}{{ eos_token }}{% endfor %}"
                "{{ tools | tojson }}|{{ tools | tojson(indent=1) }}|{{ flag }}"
                "{% for i in range(5) %}{% if i == 2 %}{% break %}{% endif %}{{ i }}{% endfor %}"
                "{% if add_generation_prompt %}A:{% endif %}")
    t = _tiny(tiny_tokenizer_json, template)
    out = t.render_chat([{"role": "u", "content": "hé", "tool_calls": None}], tools=[{"name": "<é>"}], flag=7)
    assert out == '<s>u:hé</s>[{"name": "<é>"}]|[\n {\n  "name": "<é>"\n }\n]|701A:'
    assert t.is_eos(t.token_to_id("</s>"))   # eos from special_tokens even when the config lists none
    ids = t.encode_chat([{"role": "u", "content": "x"}], add_generation_prompt=False)
    assert ids[0] == t.token_to_id("<s>") and t.decode(ids) == "<s>u:x</s>null|null|01"
    assert t.decode(ids, skip_special_tokens=True).startswith("u:x")


def test_trim_blocks_and_strftime(tiny_tokenizer_json):
    template = "{% for m in messages %}\n  {% if true %}\n{{ m.content }}\n  {% endif %}\n{% endfor %}{{ strftime_now('%Y') }}"
    out = _tiny(tiny_tokenizer_json, template).render_chat([{"role": "u", "content": "x"}])
    assert out[:2] == "x\n" and out[2:].isdigit() and len(out) == 6


def test_raise_exception(tiny_tokenizer_json):
    t = _tiny(tiny_tokenizer_json, "{% if messages[0].role != 'user' %}{{ raise_exception('Roles must alternate') }}{% endif %}")
    with pytest.raises(ChatTemplateError, match="Roles must alternate"):
        t.render_chat([{"role": "assistant", "content": "x"}])
    assert t.render_chat([{"role": "user", "content": "x"}]) == ""


@pytest.mark.parametrize("template", [
    "{{ ''.__class__.__mro__ }}",
    "{{ messages.__class__.__base__.__subclasses__() }}",
    "{% set ns = namespace(__x=1) %}",
    "{{ dict.mro() }}",
    "{{ messages.append(1) }}",
])
def test_sandbox_blocks_escapes(tiny_tokenizer_json, template):
    t = _tiny(tiny_tokenizer_json, template)
    with pytest.raises((ChatTemplateError, jinja2.exceptions.SecurityError)) as err:
        t.render_chat([{"role": "user", "content": "x"}])
    # The template must have been stopped by jinja (sandbox or undefined), not by some unrelated bug.
    assert isinstance(err.value.__cause__ or err.value, jinja2.TemplateError)


def test_missing_and_invalid_template(tiny_tokenizer_json):
    with pytest.raises(ChatTemplateError, match="no chat template; use raw completion"):
        _tiny(tiny_tokenizer_json, None).render_chat([{"role": "user", "content": "x"}])
    with pytest.raises(ChatTemplateError, match="invalid chat template"):
        _tiny(tiny_tokenizer_json, "{% for %}").render_chat([{"role": "user", "content": "x"}])


def test_from_folder_without_template(tiny_tokenizer_json):
    import hashlib
    files = {"tokenizer.json": {"sha256": hashlib.sha256(tiny_tokenizer_json.read_bytes()).hexdigest()}}
    t = Tokenizer.from_folder(tiny_tokenizer_json.parent, {"config": {"eos_token_ids": [3]}, "files": files})
    assert t.chat_template is None and t.is_eos(3) and not t.is_eos(4)
    assert t.decode(t.encode("abc")) == "abc"


def test_from_folder_checks_sha256_and_refuses_corrupt_json(tiny_tokenizer_json):
    import hashlib
    from flashlm.runtime.modelfile import ModelFileError
    good = tiny_tokenizer_json.read_bytes()
    files = {"tokenizer.json": {"sha256": hashlib.sha256(good).hexdigest()}}
    with pytest.raises(ModelFileError, match="not listed with a sha256"):
        Tokenizer.from_folder(tiny_tokenizer_json.parent, {"files": {}})
    try:
        tiny_tokenizer_json.write_bytes(good.replace(b'"a"', b'"A"', 1))    # still valid JSON, other vocabulary
        with pytest.raises(ModelFileError, match=r"tokenizer\.json: sha256 .* does not match"):
            Tokenizer.from_folder(tiny_tokenizer_json.parent, {"files": files})
        bad = good[:len(good) // 2]
        tiny_tokenizer_json.write_bytes(bad)
        files = {"tokenizer.json": {"sha256": hashlib.sha256(bad).hexdigest()}}
        with pytest.raises(ModelFileError, match=r"tokenizer\.json: not a valid tokenizer"):
            Tokenizer.from_folder(tiny_tokenizer_json.parent, {"files": files})
    finally:
        tiny_tokenizer_json.write_bytes(good)
