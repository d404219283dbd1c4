"""TeleChat2 tokenizer and chat template (SPEC sections 4 and 5).

The tokenizer is a *fast* tokenizer (``transformers.TokenizersBackend``, a.k.a. ``PreTrainedTokenizerFast``)
whose ``tokenizers`` pipeline is built here from the SentencePiece ``tokenizer.model``. It encodes exactly like
``sentencepiece.SentencePieceProcessor.encode`` (checked by ``tests/test_tokenizer.py`` on the golden cases, on
every record of the release's demo data and on every piece of the vocabulary), with one deliberate addition
required by SPEC sections 4-5: the control pieces (``<_user>``, ``<_bot>``, ``<_end>``, ...) written in text become
their ids, and every text segment between them is encoded on its own (so each gets the dummy-prefix ``▁``). Ids 9-12
are named, as in the release's own tokenizer, by the tool tags ``<tool_call>``, ``</tool_call>``,
``<tool_response>``, ``</tool_response>`` (not ``<_control1..4>``).

How the pipeline reproduces SentencePiece's BPE encoder:

* control pieces are special added tokens matched on the raw text, so the text is split at them first;
* normalizer: spaces become ``▁`` (identity normalizer, no extra-whitespace removal); a segment that already
  starts with ``▁`` gets a second one, because SentencePiece always adds the dummy prefix;
* pre-tokenizer: ``Metaspace(prepend_scheme="always", split=False)`` adds the dummy prefix to every segment,
  then the user-defined pieces (digits, ``_``..``____``, ``\\n``, ``\\t``, ``<reserveN>``) are isolated,
  longest match first: SentencePiece freezes them and never merges across them;
* model: BPE whose merges are every split of every normal piece into two normal pieces, ranked by the score of
  the merged piece (SentencePiece merges the adjacent pair whose concatenation has the highest score);
  ``byte_fallback`` for characters outside the vocabulary; ``ignore_merges`` so that a chunk that is itself a
  piece (a user-defined piece, or a normal piece, which SentencePiece also produces whole) maps to that piece.

The chat template keeps control-token names inside message text as text, as the training encoder does (no role
injection through ``apply_chat_template``): it writes ``<_`` in message text as ``<`` + :data:`TEXT_ESCAPE` +
``_`` (and the mark itself twice), so the special-token matcher does not see the name, and the normalizer's first
two steps undo that exactly before the text is encoded. (``split_special_tokens=True`` would not do: it turns
the template's own control tokens into text too.)

``save_tokenizer`` writes ``tokenizer.json``, ``tokenizer_config.json`` naming the standard fast tokenizer class
by the name transformers 4.x and 5.x both know (``PreTrainedTokenizerFast``), ``chat_template.jinja`` and a copy
of ``tokenizer.model``, so ``AutoTokenizer.from_pretrained(dir)`` reloads it without importing this package.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "BOS_TOKEN",
    "BOT_TOKEN",
    "CHAT_TEMPLATE",
    "chat_template",
    "CONTROL_TOKENS",
    "DEFAULT_SYSTEM_PROMPT",
    "EOS_TOKEN",
    "IGNORE_INDEX",
    "OBSERVATION_TOKEN",
    "PAD_TOKEN",
    "SPECIAL_TOKENS",
    "SYSTEM_TOKEN",
    "TEXT_ESCAPE",
    "TINY_TOKENIZER_PATH",
    "TOOLS_PREFIX",
    "TOOLS_SUFFIX",
    "TOOL_TAGS",
    "UNK_TOKEN",
    "USER_TOKEN",
    "build_backend_tokenizer",
    "find_model_file",
    "format_tool_call",
    "format_tool_response",
    "format_tools",
    "load_tokenizer",
    "save_tokenizer",
    "split_tool_tags",
    "tokenizer_hash",
    "visible_ids",
]

# --------------------------------------------------------------------------------------------------------------
# Constants (SPEC sections 4 and 5)
# --------------------------------------------------------------------------------------------------------------

#: The control pieces of TeleChat2's SentencePiece model and their ids (identical in the tiny tokenizer shipped in
#: assets/). SentencePiece never produces them from text.
CONTROL_TOKENS: dict[str, int] = {
    "<_unk>": 0,
    "<_start>": 1,
    "<_end>": 2,
    "<_pad>": 3,
    "<_user>": 4,
    "<_bot>": 5,
    "<_system>": 6,
    "<_observation>": 7,
    "<_sep>": 8,
    **{f"<_control{i}>": 8 + i for i in range(1, 10)},
}
UNK_TOKEN = "<_unk>"
BOS_TOKEN = "<_start>"
EOS_TOKEN = "<_end>"
PAD_TOKEN = "<_pad>"
USER_TOKEN = "<_user>"
BOT_TOKEN = "<_bot>"
SYSTEM_TOKEN = "<_system>"
OBSERVATION_TOKEN = "<_observation>"

#: The tool tags: the release's tokenizer gives the control ids 9-12 these names (SPEC section 4), so wherever
#: one of these strings stands in text it is that id, in the tokenizer and in the training encoder alike.
TOOL_TAGS: dict[str, int] = {"<tool_call>": 9, "</tool_call>": 10, "<tool_response>": 11, "</tool_response>": 12}
#: The special tokens of the fast tokenizer by name: the control pieces, ids 9-12 under their tool-tag names.
SPECIAL_TOKENS: dict[str, int] = dict(
    sorted(
        {**{n: i for n, i in CONTROL_TOKENS.items() if i not in TOOL_TAGS.values()}, **TOOL_TAGS}.items(),
        key=lambda item: item[1],
    )
)
BOS_ID, EOS_ID, PAD_ID = CONTROL_TOKENS[BOS_TOKEN], CONTROL_TOKENS[EOS_TOKEN], CONTROL_TOKENS[PAD_TOKEN]
SYSTEM_ID, USER_ID, BOT_ID = CONTROL_TOKENS[SYSTEM_TOKEN], CONTROL_TOKENS[USER_TOKEN], CONTROL_TOKENS[BOT_TOKEN]
#: The label of a token that is not trained (PyTorch's cross-entropy ignore_index).
IGNORE_INDEX = -100

DEFAULT_SYSTEM_PROMPT = (
    "你是中国电信星辰语义大模型，英文名是TeleChat，你是由中电信人工智能科技有限公司和中国电信人工智能研究院"
    "（TeleAI）研发的人工智能助手。"
)

#: Appended to the system prompt before the tool definitions (one JSON line each), then TOOLS_SUFFIX.
TOOLS_PREFIX = (
    "\n\n# 可用工具\n你可以调用<tools></tools>标签中包含的一个或多个工具来辅助你回答问题,"
    "以下是可用工具详情：\n<tools>\n"
)
TOOLS_SUFFIX = (
    "</tools>\n\n# 调用方法\n你需要遵循工具的要求，使用json格式返回工具名称及参数，并用<tool_call></tool_call>包含。"
    '下方是一个调用模板：\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>\n\n'
)

#: The tiny SentencePiece model trained by scripts/train_tiny_tokenizer.py (same control pieces and flags).
TINY_TOKENIZER_PATH = Path(__file__).resolve().parent / "assets" / "tiny_tokenizer.model"

_MODEL_FILE = "tokenizer.model"

# --------------------------------------------------------------------------------------------------------------
# Python helpers that render exactly what the chat template renders (reused by the data pipeline)
# --------------------------------------------------------------------------------------------------------------


def _dumps(obj: Any) -> str:
    # What transformers' chat-template `tojson` filter produces: json.dumps, ensure_ascii=False, default separators.
    return json.dumps(obj, ensure_ascii=False)


def _wrap_tool(tool: Mapping[str, Any]) -> Mapping[str, Any]:
    if tool.get("type") == "function" and isinstance(tool.get("function"), Mapping):
        return tool
    return {"type": "function", "function": tool}


def format_tools(tools: str | Iterable[Mapping[str, Any]] | None) -> str:
    """The block appended to the system prompt for ``tools`` (a list, or its JSON string); "" when there are none.

    Identical to what the chat template renders for ``apply_chat_template(..., tools=tools)``.
    """
    if isinstance(tools, str):
        tools = json.loads(tools) if tools.strip() else None
    if not tools:
        return ""
    return TOOLS_PREFIX + "".join(_dumps(_wrap_tool(tool)) + "\n" for tool in tools) + TOOLS_SUFFIX


def format_tool_call(name: str, arguments: Any) -> str:
    """``<tool_call>\\n{"name": ..., "arguments": ...}\\n</tool_call>``; a string ``arguments`` is kept verbatim."""
    args = arguments if isinstance(arguments, str) else _dumps(arguments)
    return '<tool_call>\n{"name": ' + _dumps(name) + ', "arguments": ' + args + "}\n</tool_call>"


def format_tool_response(content: Any) -> str:
    """``<tool_response>\\n{content}\\n</tool_response>`` (non-string content is dumped as JSON)."""
    text = content if isinstance(content, str) else _dumps(content)
    return "<tool_response>\n" + text + "\n</tool_response>"


_TOOL_TAG_RE = re.compile("(" + "|".join(re.escape(tag) for tag in TOOL_TAGS) + ")")


def may_hold_tool_tags(text: str) -> bool:
    """False when ``text`` holds no tool tag for certain (a cheap test: most texts hold none)."""
    return "tool_" in text


def split_tool_tags(text: str) -> list[str | int]:
    """``text`` cut at the tool tags: text segments (never empty) and the tags' ids, in order."""
    if not may_hold_tool_tags(text):
        return [text] if text else []
    parts = _TOOL_TAG_RE.split(text)
    return [TOOL_TAGS[part] if n % 2 else part for n, part in enumerate(parts) if part]


_HIDDEN_IDS = frozenset(i for i in CONTROL_TOKENS.values() if i not in TOOL_TAGS.values())


def visible_ids(ids: Iterable[int]) -> list[int]:
    """A generated answer's ids as a user reads them: control tokens (``<_end>``, ...) dropped, tool tags kept
    (a tool call the model makes is ids 9/10: it must reach the user, SPEC section 4)."""
    return [i for i in ids if i not in _HIDDEN_IDS]


# --------------------------------------------------------------------------------------------------------------
# Chat template
# --------------------------------------------------------------------------------------------------------------


#: The chat template writes "<_" in message text as "<" + TEXT_ESCAPE + "_" (and TEXT_ESCAPE itself twice), so a
#: control token's name in the text is not matched as the control token; the tokenizer's normalizer undoes it
#: (SPEC section 5: text that looks like a control token stays text, as the training encoder keeps it). A Unicode
#: noncharacter (U+FDD0, reserved for a program's internal use): text never holds it by accident.
TEXT_ESCAPE = "\ufdd0"


def _jinja_str(text: str) -> str:
    # A JSON string literal is a valid Jinja string literal with the same value (Jinja unescapes \n, \", \\).
    return json.dumps(text, ensure_ascii=False)


_CHAT_TEMPLATE_SRC = """
{#- TeleChat2 chat format (telechat-lab). Variables: messages, tools, add_generation_prompt, default_system
    (None/undefined: the TeleChat default system prompt; "": no <_system> block when there is no system). -#}
{#- text(): message text with every "<_" written "<@ESC@_" (and @ESC@ itself doubled), so that a control token's
    name in the text is not the control token (the tokenizer matches those names anywhere in the string); the
    tokenizer's normalizer undoes the escape, so the text is encoded as itself. -#}
{%- macro text(value) -%}
    {{- value | replace('@ESC@', '@ESC@@ESC@') | replace('<_', '<@ESC@_') -}}
{%- endmacro -%}
{%- macro render_content(content) -%}
    {%- if content is string -%}
        {{- content -}}
    {%- elif content is mapping -%}
        {{- content | tojson -}}
    {%- elif content is iterable -%}
        {%- for part in content -%}
            {%- if part is string -%}
                {{- part -}}
            {%- elif part is mapping and part['text'] is defined -%}
                {{- part['text'] -}}
            {%- else -%}
                {{- part | tojson -}}
            {%- endif -%}
        {%- endfor -%}
    {%- elif content is defined and content is not none -%}
        {{- content | tojson -}}
    {%- endif -%}
{%- endmacro -%}
{%- if default_system is defined and default_system is not none -%}
    {%- set fallback_system = default_system -%}
{%- else -%}
    {%- set fallback_system = @DEFAULT_SYSTEM@ -%}
{%- endif -%}
{%- if messages and messages[0]['role'] == 'system' -%}
    {%- set system = render_content(messages[0]['content']) -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set system = '' -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- if not system -%}
    {%- set system = fallback_system -%}
{%- endif -%}
{%- if system or tools -%}
    {{- '<_system>' + text(system) -}}
    {%- if tools -%}
        {{- @TOOLS_PREFIX@ -}}
        {%- for tool in tools -%}
            {%- if tool['type'] is defined and tool['type'] == 'function' and tool['function'] is mapping -%}
                {{- text(tool | tojson) -}}
            {%- else -%}
                {{- text({'type': 'function', 'function': tool} | tojson) -}}
            {%- endif -%}
            {{- '\\n' -}}
        {%- endfor -%}
        {{- @TOOLS_SUFFIX@ -}}
    {%- endif -%}
    {{- '\\n' -}}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- set role = message['role'] -%}
    {%- if role == 'user' -%}
        {{- '<_user>' + text(render_content(message['content'])) -}}
    {%- elif role == 'tool' or role == 'observation' -%}
        {%- if loop.first or loop.previtem['role'] not in ['tool', 'observation'] -%}
            {{- '<_user>' -}}
        {%- else -%}
            {{- '\\n' -}}
        {%- endif -%}
        {{- '<tool_response>\\n' + text(render_content(message['content'])) + '\\n</tool_response>' -}}
    {%- elif role == 'assistant' or role == 'bot' -%}
        {%- set content = text(render_content(message['content'])) -%}
        {{- '<_bot>' -}}
        {%- generation -%}
            {{- content -}}
            {%- if message['tool_calls'] is defined and message['tool_calls'] -%}
                {%- for call in message['tool_calls'] -%}
                    {%- if content or not loop.first -%}
                        {{- '\\n' -}}
                    {%- endif -%}
                    {%- set fn = call['function'] if call['function'] is defined else call -%}
                    {%- if fn['arguments'] is string -%}
                        {%- set arguments = fn['arguments'] -%}
                    {%- else -%}
                        {%- set arguments = fn['arguments'] | tojson -%}
                    {%- endif -%}
                    {{- '<tool_call>\\n{"name": ' + text(fn['name'] | tojson)
                        + ', "arguments": ' + text(arguments) + '}\\n</tool_call>' -}}
                {%- endfor -%}
            {%- endif -%}
            {{- '<_end>' -}}
        {%- endgeneration -%}
        {%- if not loop.last -%}
            {{- '\\n' -}}
        {%- endif -%}
    {%- else -%}
        {{- raise_exception('TeleChat2 chat template: unsupported role ' + role
                            + ' (a system message must come first)') -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt and (not loop_messages or loop_messages[-1]['role'] not in ['assistant', 'bot']) -%}
    {{- '<_bot>' -}}
{%- endif -%}
"""


def chat_template(default_system: str | None = None) -> str:
    """The Jinja chat template (SPEC section 5), self-contained: it needs nothing from this package to render. A
    conversation without a system message gets `default_system` (None: TeleChat's; "": no system block)."""
    fallback = DEFAULT_SYSTEM_PROMPT if default_system is None else default_system
    return (
        _CHAT_TEMPLATE_SRC.strip()
        .replace("@DEFAULT_SYSTEM@", _jinja_str(fallback))
        .replace("@TOOLS_PREFIX@", _jinja_str(TOOLS_PREFIX))
        .replace("@TOOLS_SUFFIX@", _jinja_str(TOOLS_SUFFIX))
        .replace("@ESC@", TEXT_ESCAPE)
    )


CHAT_TEMPLATE = chat_template()

# --------------------------------------------------------------------------------------------------------------
# Building the fast tokenizer from the SentencePiece model
# --------------------------------------------------------------------------------------------------------------

# sentencepiece_model.proto ModelProto.SentencePiece.Type
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _BYTE, _UNUSED = 1, 2, 3, 4, 6, 5


def _load_proto(model_file: str | os.PathLike):
    from transformers.convert_slow_tokenizer import import_protobuf

    proto = import_protobuf().ModelProto()
    with open(model_file, "rb") as f:
        proto.ParseFromString(f.read())
    return proto


def _longest_match_regex(words: Iterable[str]) -> str:
    """A regex matching, at each position, the longest of ``words`` (as SentencePiece's prefix matcher does).

    Built as a trie (``_(?:_(?:__?)?)?|<reserve(?:1(?:0(?:0>|>)|1>|...``) rather than a flat alternation: the
    same matches, but the regex engine follows one branch per character instead of trying every word.
    """
    trie: dict = {}
    for word in words:
        node = trie
        for char in word:
            node = node.setdefault(char, {})
        node[""] = {}

    def render(node: dict) -> str:
        branches = [re.escape(char) + render(child) for char, child in sorted(node.items()) if char]
        if not branches:
            return ""
        body = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
        if "" in node:  # a word ends here: the longer continuations are tried first (greedy), then this one
            return ("(?:" + body + ")?") if len(branches) > 1 or len(body) > 1 else body + "?"
        return body

    branches = [re.escape(char) + render(child) for char, child in sorted(trie.items()) if char]
    return "|".join(branches)


def build_backend_tokenizer(model_file: str | os.PathLike):
    """A ``tokenizers.Tokenizer`` that encodes like SentencePiece, with control pieces split out of the text.

    Only the settings TeleChat2 uses are supported (BPE, identity normalizer, no extra-whitespace removal); any
    other model raises ``ValueError`` rather than building a tokenizer that would silently differ.
    """
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        normalizers,
        pre_tokenizers,
    )
    from tokenizers.models import BPE

    proto = _load_proto(model_file)
    trainer, norm = proto.trainer_spec, proto.normalizer_spec
    if trainer.model_type != 2:  # BPE
        raise ValueError(f"{model_file}: only SentencePiece BPE models are supported")
    if norm.precompiled_charsmap or norm.remove_extra_whitespaces or not norm.escape_whitespaces:
        raise ValueError(f"{model_file}: only the identity normalizer that keeps extra whitespace is supported")
    if trainer.treat_whitespace_as_suffix or not norm.add_dummy_prefix:
        raise ValueError(f"{model_file}: the dummy prefix must be on and whitespace a prefix")
    pieces = proto.pieces
    for name, idx in CONTROL_TOKENS.items():
        if idx >= len(pieces) or pieces[idx].piece != name or pieces[idx].type not in (_CONTROL, _UNKNOWN):
            raise ValueError(f"{model_file}: expected control piece {name} at id {idx}")

    vocab = {p.piece: i for i, p in enumerate(pieces)}
    for name, idx in TOOL_TAGS.items():  # ids 9-12 go by the release's names
        del vocab[pieces[idx].piece]
        vocab[name] = idx
    # not transformers' SentencePieceExtractor / generate_merges: the same merges, but where scores tie in another
    # order (longest left part first; here the piece's id, then the shortest cut), 860 of 2653 differ on the tiny one
    normal = {p.piece: (p.score, i) for i, p in enumerate(pieces) if p.type == _NORMAL}
    ranked = []
    for piece, (score, idx) in normal.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                ranked.append((-score, idx, cut, left, right))
    ranked.sort()
    merges = [(left, right) for _, _, _, left, right in ranked]
    user_defined = [p.piece for p in pieces if p.type == _USER_DEFINED]

    tok = Tokenizer(
        BPE(
            vocab=vocab,
            merges=merges,
            unk_token=trainer.unk_piece,
            fuse_unk=True,
            byte_fallback=trainer.byte_fallback,
            ignore_merges=True,
        )
    )
    # SentencePiece always adds the dummy prefix; Metaspace skips it when the segment already starts with "▁",
    # so such a segment gets a second "▁" first.
    # first the chat template's escape of "<_" in message text is undone (see TEXT_ESCAPE): the inserted mark goes,
    # then a doubled mark is one again (both literal, left to right: an exact inverse of the escape)
    tok.normalizer = normalizers.Sequence(
        [
            normalizers.Replace("<" + TEXT_ESCAPE + "_", "<_"),
            normalizers.Replace(TEXT_ESCAPE * 2, TEXT_ESCAPE),
            normalizers.Replace(" ", "▁"),
            normalizers.Replace(Regex(r"\A▁"), "▁▁"),
        ]
    )
    pre = [pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=False)]
    if user_defined:
        pre.append(pre_tokenizers.Split(Regex(_longest_match_regex(user_defined)), behavior="isolated"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(pre)
    dec = [decoders.Replace("▁", " ")]
    if trainer.byte_fallback:
        dec.append(decoders.ByteFallback())
    dec.append(decoders.Fuse())
    # the text after a tool tag was encoded as its own segment, with its own dummy prefix: drop that space, as
    # SentencePiece's decode of the segment does (so "<tool_call>\n{...}" decodes to itself)
    dec += [decoders.Replace(tag + " ", tag) for tag in TOOL_TAGS]
    dec.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(dec)
    tok.add_special_tokens([AddedToken(name, special=True, normalized=False) for name in SPECIAL_TOKENS])
    return tok


def find_model_file(path: str | os.PathLike) -> Path | None:
    """``path`` itself when it is a file, else ``path/tokenizer.model`` when that exists, else None."""
    path = Path(path)
    if path.is_file():
        return path
    candidate = path / _MODEL_FILE
    return candidate if candidate.is_file() else None


_HASHES: dict[str, str] = {}


def tokenizer_hash(path: str | os.PathLike) -> str:
    """sha256 of the SentencePiece model at ``path`` (file or directory), remembered per file."""
    model = find_model_file(path)
    if model is None:
        raise FileNotFoundError(f"no {_MODEL_FILE} at {path}")
    key = str(model.resolve())
    if key not in _HASHES:
        _HASHES[key] = hashlib.sha256(model.read_bytes()).hexdigest()
    return _HASHES[key]


def load_tokenizer(path: str | os.PathLike, chat_template: str | None = None):
    """Load the TeleChat2 tokenizer as a transformers fast tokenizer.

    ``path`` is a ``tokenizer.model`` file or a directory holding one (a TeleChat2 checkpoint, or a directory
    written by :func:`save_tokenizer`). The checkpoint's own ``tokenizer_config.json`` and remote code are
    ignored: the tokenizer is always rebuilt from the SentencePiece model. A directory with only a
    ``tokenizer.json`` (no ``tokenizer.model``) is loaded as saved. ``chat_template`` defaults to
    :data:`CHAT_TEMPLATE`.
    """
    from transformers import TokenizersBackend

    model_file = find_model_file(path)
    if model_file is None:
        if (Path(path) / "tokenizer.json").is_file():
            tok = TokenizersBackend.from_pretrained(str(path))
            if chat_template is not None or not tok.chat_template:
                tok.chat_template = chat_template or CHAT_TEMPLATE
            return tok
        raise FileNotFoundError(f"no {_MODEL_FILE} (or tokenizer.json) at {path}")

    tok = TokenizersBackend(
        tokenizer_object=build_backend_tokenizer(model_file),
        vocab_file=str(model_file),
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens=[t for t in SPECIAL_TOKENS if t not in (BOS_TOKEN, EOS_TOKEN, UNK_TOKEN, PAD_TOKEN)],
        add_bos_token=False,
        add_eos_token=False,
        clean_up_tokenization_spaces=False,
        padding_side="right",
        chat_template=chat_template or CHAT_TEMPLATE,
    )
    tok.name_or_path = str(model_file.parent if Path(path).is_file() else path)
    return tok


def save_tokenizer(tokenizer, save_directory: str | os.PathLike, release_special_tokens: bool = False) -> list[str]:
    """``save_pretrained`` plus a copy of ``tokenizer.model``: the directory reloads with
    ``AutoTokenizer.from_pretrained`` (with or without ``trust_remote_code``) without this package, in transformers
    4.x (the release pins 4.45) and 5.x alike (see :func:`_portable_tokenizer_config`). ``release_special_tokens``:
    the special-token settings of the release's own ``tokenizer_config.json`` (``<_end>`` as eos and unk, no bos),
    as exports write them."""
    save_directory = Path(save_directory)
    files = [str(f) for f in tokenizer.save_pretrained(str(save_directory))]
    _portable_tokenizer_config(save_directory / "tokenizer_config.json", tokenizer, release_special_tokens)
    target = save_directory / _MODEL_FILE
    source = getattr(tokenizer, "vocab_file", None)
    if not target.is_file() and source and Path(source).is_file():
        shutil.copyfile(source, target)
        files.append(str(target))
    return files


def _portable_tokenizer_config(path: Path, tokenizer, release_special_tokens: bool) -> None:
    """Rewrite transformers 5's tokenizer_config.json in the form 4.x reads too: the class by its name in both
    (``PreTrainedTokenizerFast``; 5.x's ``TokenizersBackend`` does not exist in 4.x), the extra special tokens as
    ``additional_special_tokens`` (4.x wants a mapping under 5.x's key), the chat template inline (4.x before 4.50
    reads no ``chat_template.jinja``), the model's inputs named (4.x adds token_type_ids otherwise)."""
    config = json.loads(path.read_text(encoding="utf-8"))
    config.pop("backend", None)
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    extra = config.pop("extra_special_tokens", None)
    if extra:
        config["additional_special_tokens"] = list(extra.values() if isinstance(extra, dict) else extra)
    config["chat_template"] = tokenizer.chat_template
    # 4.x's PreTrainedTokenizerFast also returns token_type_ids, which generate(**inputs) refuses
    config.update(add_bos_token=False, add_eos_token=False, model_input_names=["input_ids", "attention_mask"])
    if release_special_tokens:
        config.pop("bos_token", None)
        config.update(eos_token=EOS_TOKEN, unk_token=EOS_TOKEN, pad_token=PAD_TOKEN)
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
