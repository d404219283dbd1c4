"""Tests of telechat_lab.tokenizer: exactness against SentencePiece, control tokens, chat template, save/reload.

The real TeleChat2 tokenizer, the golden template cases and the release's demo data are read from ../shared
(override with TELECHAT_SHARED); the tests that need them skip when it is absent. The tiny tokenizer shipped in
telechat_lab/assets is always tested.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece as spm
from helpers import record_to_chat, with_system

from telechat_lab.tokenizer import (
    CHAT_TEMPLATE,
    CONTROL_TOKENS,
    DEFAULT_SYSTEM_PROMPT,
    SPECIAL_TOKENS,
    TINY_TOKENIZER_PATH,
    TOOL_TAGS,
    TOOLS_PREFIX,
    TOOLS_SUFFIX,
    format_tool_call,
    format_tool_response,
    format_tools,
    load_tokenizer,
    save_tokenizer,
    visible_ids,
)

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TELECHAT_SHARED") or ROOT.parent / "shared")
REAL_MODEL = SHARED / "telechat2" / "tokenizer.model"
GOLDEN_CASES = SHARED / "golden" / "template" / "cases.jsonl"
DEMO_DIR = SHARED / "data" / "telechat2_sft_demo"
NO_SHARED = f"shared reference files not found under {SHARED} (set TELECHAT_SHARED)"

# the special tokens by the names the fast tokenizer knows them (ids 9-12 as the tool tags)
_CONTROL_RE = re.compile("(" + "|".join(re.escape(t) for t in SPECIAL_TOKENS) + ")")
_USER_DEFINED, _NORMAL = 4, 1


# ----------------------------------------------------------------------------------------------------------------
# fixtures and helpers
# ----------------------------------------------------------------------------------------------------------------


class Pair:
    """A fast tokenizer and the SentencePiece processor of the same model file."""

    def __init__(self, model_file: Path) -> None:
        self.model_file = model_file
        self.tok = load_tokenizer(model_file)
        self.sp = spm.SentencePieceProcessor(model_file=str(model_file))

    def reference(self, text: str) -> list[int]:
        """SPEC sections 4-5: split at control tokens and tool tags, each one is its id, each segment is
        sp.encode'd alone."""
        ids: list[int] = []
        for segment in _CONTROL_RE.split(text):
            if segment in SPECIAL_TOKENS:
                ids.append(SPECIAL_TOKENS[segment])
            elif segment:
                ids += self.sp.encode(segment)
        return ids

    def fast(self, texts: list[str]) -> list[list[int]]:
        return self.tok(texts, add_special_tokens=False)["input_ids"]


@pytest.fixture(scope="module")
def tiny() -> Pair:
    return Pair(TINY_TOKENIZER_PATH)


@pytest.fixture(scope="module")
def real() -> Pair:
    if not REAL_MODEL.is_file():
        pytest.skip(NO_SHARED)
    return Pair(REAL_MODEL)


@pytest.fixture(params=["tiny", "real"])
def pair(request) -> Pair:
    return request.getfixturevalue(request.param)


def _read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _golden_params():
    if not GOLDEN_CASES.is_file():
        return [pytest.param(None, marks=pytest.mark.skip(reason=NO_SHARED), id="no-shared")]
    return [pytest.param(case, id=case["id"]) for case in _read_jsonl(GOLDEN_CASES)]


@pytest.fixture(scope="module")
def demo_records() -> list[dict]:
    files = sorted(DEMO_DIR.glob("*.jsonl")) if DEMO_DIR.is_dir() else []
    if not files:
        pytest.skip(NO_SHARED)
    return [record for path in files for record in _read_jsonl(path)]


def _record_texts(record) -> list[str]:
    """Every string inside a raw record (its contents), for the raw-text exactness checks."""
    if isinstance(record, str):
        return [record] if record else []
    if isinstance(record, dict):
        return [t for value in record.values() for t in _record_texts(value)]
    if isinstance(record, list):
        return [t for value in record for t in _record_texts(value)]
    return []


# Strings that exercise the corners of SentencePiece's encoder: leading/trailing/repeated spaces, a literal "▁",
# tabs and newlines (user-defined pieces), digits, underscores, reserve pieces, bytes outside the vocabulary.
TRICKY = [
    "Hello world",
    " leading space",
    "   three leading spaces",
    "trailing spaces   ",
    "double  space and\ttab",
    " ",
    "   ",
    "\n",
    "\n\n\nx",
    "a\r\nb",
    "▁already a meta symbol",
    "▁",
    "snake_case __dunder__ ____ _____ ______",
    "<reserve7>text<reserve100>9<reserve10>",
    "3.14159 + 2,718 = 5.85 12345678901234567890",
    "😀🚀 emoji and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 and \u200b zero width",
    "龘靐齉 rare characters 丨乂",
    "你好，世界！今天天气很好。",
    "混合 mixed 文本 text 123",
    "<_user without closing and <_bot> with one",
    "<_user><_bot><_end>",
    '<tool_call>\n{"name": "f"}\n</tool_call>x<tool_response>\nok\n</tool_response>',
    "<tool_call> spaced </tool_call><tool_call>",
    "<_control1> is text now, <tool_call is not a tag",
    'json: {"name": "get_weather", "arguments": {"city": "北京"}}',
    "def f(x):\n\treturn x ** 2  # comment",
]


# ----------------------------------------------------------------------------------------------------------------
# control tokens and special tokens
# ----------------------------------------------------------------------------------------------------------------


def test_control_pieces_have_the_spec_ids(pair: Pair):
    for name, idx in CONTROL_TOKENS.items():
        assert pair.sp.id_to_piece(idx) == name
        assert pair.sp.is_control(idx) or pair.sp.is_unknown(idx)
    assert len(CONTROL_TOKENS) == 18 and sorted(CONTROL_TOKENS.values()) == list(range(18))


def test_control_tokens_in_text_become_ids(pair: Pair):
    tok, sp = pair.tok, pair.sp
    for name, idx in SPECIAL_TOKENS.items():
        assert tok.encode(name, add_special_tokens=False) == [idx]
        assert sp.encode(name) != [idx]  # SentencePiece alone never produces a control id (SPEC section 4)
    text = "<_system>S\n<_user>hi there<_bot> yo<_end>\n<_user>again<_bot>"
    expected = (
        [6]
        + sp.encode("S\n")
        + [4]
        + sp.encode("hi there")
        + [5]
        + sp.encode(" yo")
        + [2]
        + sp.encode("\n")
        + [4]
        + sp.encode("again")
        + [5]
    )
    assert tok.encode(text, add_special_tokens=False) == expected
    # each segment gets the dummy prefix: the "\n" after <_end> is "▁", "\n"
    assert tok.convert_ids_to_tokens(tok.encode("<_end>\n<_user>", add_special_tokens=False)) == [
        "<_end>",
        "▁",
        "\n",
        "<_user>",
    ]


def test_tool_tags_are_control_ids_9_to_12(pair: Pair):
    """The release's tokenizer names ids 9-12 by the tool tags (SPEC section 4); the SentencePiece pieces
    <_control1..4> behind them are no longer names that text can produce."""
    tok, sp = pair.tok, pair.sp
    assert TOOL_TAGS == {"<tool_call>": 9, "</tool_call>": 10, "<tool_response>": 11, "</tool_response>": 12}
    assert [sp.id_to_piece(i) for i in TOOL_TAGS.values()] == [f"<_control{i}>" for i in range(1, 5)]
    assert tok.convert_ids_to_tokens(list(TOOL_TAGS.values())) == list(TOOL_TAGS)
    call = '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>'
    ids = tok.encode("a" + call, add_special_tokens=False)
    assert ids == sp.encode("a") + [9] + sp.encode('\n{"name": "f", "arguments": {}}\n') + [10]
    assert tok.encode("<_control1>", add_special_tokens=False) == sp.encode("<_control1>")
    # decoding gives the tags back, with the text after each exactly as written
    for text in (call, "<tool_response>\nok\n</tool_response>", "<tool_call> two  spaces</tool_call>", "x<tool_call>"):
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    # a generated answer as a user reads it: <_end> and the other controls dropped, the tags kept
    assert visible_ids([9, 100, 10, 2, 3, 4, 5, 11, 12]) == [9, 100, 10, 11, 12]
    assert tok.decode(visible_ids(ids + [2])) == "a" + call


def test_special_tokens_and_no_bos(pair: Pair):
    tok = pair.tok
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 3)
    assert (tok.unk_token, tok.bos_token, tok.eos_token, tok.pad_token) == ("<_unk>", "<_start>", "<_end>", "<_pad>")
    assert set(tok.all_special_ids) == set(CONTROL_TOKENS.values()) == set(SPECIAL_TOKENS.values())
    assert tok.is_fast
    ids = tok("hello")["input_ids"]  # add_special_tokens=True by default: still no bos / eos
    assert ids == pair.sp.encode("hello")
    assert len(tok) == pair.sp.get_piece_size()


# ----------------------------------------------------------------------------------------------------------------
# exactness: fast tokenizer == SentencePiece
# ----------------------------------------------------------------------------------------------------------------


def test_fast_equals_sentencepiece_on_tricky_strings(pair: Pair):
    assert pair.fast(TRICKY) == [pair.reference(t) for t in TRICKY]
    assert pair.tok("", add_special_tokens=False)["input_ids"] == []


def test_fast_equals_sentencepiece_on_every_piece(pair: Pair):
    """Each normal piece, alone after a frozen "\\n": SentencePiece emits it whole, and so must the fast tokenizer
    (this is what makes ``ignore_merges`` in the BPE model safe)."""
    from transformers.convert_slow_tokenizer import import_protobuf

    proto = import_protobuf().ModelProto()
    proto.ParseFromString(pair.model_file.read_bytes())
    user_defined = [p.piece for p in proto.pieces if p.type == _USER_DEFINED]
    texts, ids = [], []
    for idx, piece in enumerate(proto.pieces):
        if piece.type == _NORMAL and not any(u in piece.piece for u in user_defined):
            texts.append("\n" + piece.piece.replace("▁", " "))
            ids.append(idx)
    prefix = pair.sp.encode("\n")
    assert pair.sp.encode(texts) == [prefix + [i] for i in ids]
    assert pair.fast(texts) == [prefix + [i] for i in ids]


def test_fast_equals_sentencepiece_on_demo_data(pair: Pair, demo_records):
    tok = pair.tok
    raw = [t for record in demo_records for t in _record_texts(record)]
    assert len(raw) > 10000
    assert sum("<tool_call>" in t for t in raw) > 100  # the release's tool data: its tags are ids 9-12
    assert pair.fast(raw) == [pair.reference(t) for t in raw]
    rendered = []
    for record in demo_records:
        system, messages, _ = record_to_chat(record, {"formatting": "telechat"})
        rendered.append(tok.apply_chat_template(with_system(system, messages), tokenize=False))
    assert pair.fast(rendered) == [pair.reference(text) for text in rendered]


@pytest.mark.parametrize("case", _golden_params())
def test_fast_equals_sentencepiece_on_golden_case(real: Pair, case):
    system, messages, tools = record_to_chat(case["record"], case["dataset_info"])
    texts = _record_texts(case["record"])
    assert real.fast(texts) == [real.reference(t) for t in texts]
    rendered = real.tok.apply_chat_template(with_system(system, messages), tools=tools, tokenize=False)
    assert real.fast([rendered]) == [real.reference(rendered)] == [case["expected"]["input_ids"]]


# ----------------------------------------------------------------------------------------------------------------
# chat template against the golden cases
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", _golden_params())
def test_chat_template_matches_golden_case(real: Pair, case):
    tok, expected = real.tok, case["expected"]
    system, messages, tools = record_to_chat(case["record"], case["dataset_info"])
    chat = with_system(system, messages)
    assert chat[-1]["role"] == "assistant"

    prompt_ids = tok.apply_chat_template(chat[:-1], tools=tools, add_generation_prompt=True, tokenize=True)
    assert prompt_ids["input_ids"] == expected["generation_prompt_ids"]

    out = tok.apply_chat_template(chat, tools=tools, tokenize=True, return_assistant_tokens_mask=True)
    assert out["input_ids"] == expected["input_ids"]
    # the template's {% generation %} spans give the trained tokens: each reply plus its <_end>
    mask = out["assistant_masks"]
    if case.get("train_on_prompt"):
        mask = [1] * len(mask)
    elif case.get("mask_history"):
        last_start = max(i for i, m in enumerate(mask) if m and (i == 0 or not mask[i - 1]))
        mask = [int(i >= last_start and m) for i, m in enumerate(mask)]
    if case.get("train_role_tokens"):  # each trained reply's <_bot> and the <_user> that opens its turn
        ids = out["input_ids"]
        for start in [i for i, m in enumerate(mask) if m and not mask[i - 1]]:
            assert ids[start - 1] == 5
            mask[start - 1] = 1
            mask[max(i for i in range(start) if ids[i] == 4)] = 1
    labels = [i if m else -100 for i, m in zip(out["input_ids"], mask)]
    assert labels == expected["labels"]


def test_golden_tool_case_layout(real: Pair):
    """The layout SPEC/golden fix for tools: a call is its own bot turn closed by <_end>; a result a user turn."""
    if not GOLDEN_CASES.is_file():
        pytest.skip(NO_SHARED)
    case = next(
        c
        for c in _read_jsonl(GOLDEN_CASES)
        if c["dataset_info"].get("formatting") == "sharegpt"
        and any(t.get("from") == "observation" for t in c["record"]["conversations"])
    )
    text = "".join(real.tok.convert_ids_to_tokens(case["expected"]["input_ids"]))
    # the tags are ids 9-12: the text after each is its own segment, with its own "▁"
    assert "<_bot><tool_call>▁\n" in text and "</tool_call><_end>▁\n<_user><tool_response>▁\n" in text
    assert "</tool_response><_bot>" in text


# ----------------------------------------------------------------------------------------------------------------
# chat template behaviour
# ----------------------------------------------------------------------------------------------------------------


def _render(tok, messages, **kwargs) -> str:
    return tok.apply_chat_template(messages, tokenize=False, **kwargs)


def test_template_turn_layout(tiny: Pair):
    msgs = [
        {"role": "user", "content": "u1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "u2"},
        {"role": "assistant", "content": "a2"},
    ]
    expected = f"<_system>{DEFAULT_SYSTEM_PROMPT}\n<_user>u1<_bot>a1<_end>\n<_user>u2<_bot>a2<_end>"
    assert _render(tiny.tok, msgs) == expected
    assert _render(tiny.tok, msgs[:3], add_generation_prompt=True) == expected[: expected.rindex("a2<_end>")]
    # a generation prompt is not added after an assistant message
    assert _render(tiny.tok, msgs, add_generation_prompt=True) == expected
    with pytest.raises(Exception, match="unsupported role"):
        _render(tiny.tok, [{"role": "narrator", "content": "x"}])


def test_default_system_override_and_empty(tiny: Pair):
    tok = tiny.tok
    user = [{"role": "user", "content": "hi"}]
    assert _render(tok, user, add_generation_prompt=True) == f"<_system>{DEFAULT_SYSTEM_PROMPT}\n<_user>hi<_bot>"
    assert _render(tok, user, add_generation_prompt=True, default_system=None).startswith(
        f"<_system>{DEFAULT_SYSTEM_PROMPT}\n"
    )
    assert _render(tok, user, add_generation_prompt=True, default_system="Be brief.") == (
        "<_system>Be brief.\n<_user>hi<_bot>"
    )
    assert _render(tok, user, add_generation_prompt=True, default_system="") == "<_user>hi<_bot>"
    # an explicit system message wins over the default; an empty one falls back to the default
    own = [{"role": "system", "content": "Mine."}] + user
    assert _render(tok, own, default_system="") == "<_system>Mine.\n<_user>hi"
    empty = [{"role": "system", "content": ""}] + user
    assert _render(tok, empty, default_system="D") == "<_system>D\n<_user>hi"
    assert _render(tok, empty, default_system="") == "<_user>hi"
    # the tokens: <_system> is id 6, then the system text and "\n" as one segment
    ids = tok.apply_chat_template(
        user, add_generation_prompt=True, default_system="Be brief.", tokenize=True, return_dict=False
    )
    assert ids == [6] + tiny.sp.encode("Be brief.\n") + [4] + tiny.sp.encode("hi") + [5]


TOOLS = [
    {
        "name": "get_weather",
        "description": "Weather <today> & 'tomorrow' in a city / 城市天气",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
    {
        "type": "function",
        "function": {"name": "calc", "description": "a+b", "parameters": {"type": "object", "properties": {}}},
    },
]


def test_tools_block_equals_format_tools(tiny: Pair):
    tok = tiny.tok
    block = format_tools(TOOLS)
    lines = [
        json.dumps({"type": "function", "function": TOOLS[0]}, ensure_ascii=False),
        json.dumps(TOOLS[1], ensure_ascii=False),
    ]
    assert block == TOOLS_PREFIX + lines[0] + "\n" + lines[1] + "\n" + TOOLS_SUFFIX
    assert "<today> & 'tomorrow'" in block and "城市天气" in block  # no HTML escaping, no \u escapes
    assert format_tools(json.dumps(TOOLS)) == block and format_tools([]) == "" and format_tools(None) == ""
    user = [{"role": "user", "content": "weather?"}]
    rendered = _render(tok, user, tools=TOOLS, add_generation_prompt=True)
    assert rendered == f"<_system>{DEFAULT_SYSTEM_PROMPT}{block}\n<_user>weather?<_bot>"
    own = _render(tok, [{"role": "system", "content": "S"}] + user, tools=TOOLS)
    assert own == f"<_system>S{block}\n<_user>weather?"
    assert _render(tok, user, tools=TOOLS, default_system="") == f"<_system>{block}\n<_user>weather?"


def test_format_tools_reproduces_release_tool_data(demo_records):
    """The release's tool records carry the tools block already rendered in their system prompt."""
    checked = 0
    for record in demo_records:
        system = record["system"]
        if "<tools>\n" not in system:
            continue
        head, rest = system.split(TOOLS_PREFIX, 1)
        body = rest.split("</tools>", 1)[0]
        if not body.strip():  # a few release records bake in an empty "<tools>\n\n</tools>" block: not ours
            continue
        tools = [json.loads(line) for line in body.splitlines()]
        assert head + format_tools(tools) == system
        checked += 1
    assert checked > 100


def test_tool_calls_and_results_render(tiny: Pair):
    msgs = [
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {
            "role": "assistant",
            "content": "Let me check.",
            "tool_calls": [
                {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
                {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}},
            ],
        },
        {"role": "tool", "content": '{"temp_c": 20}'},
        {"role": "tool", "content": {"temp_c": 25, "sky": "晴"}},
        {"role": "assistant", "tool_calls": [{"name": "calc", "arguments": {"a": 1}}]},
        {"role": "observation", "content": "2"},
    ]
    expected = (
        "<_user>Weather in Paris and Rome?"
        "<_bot>Let me check.\n"
        + format_tool_call("get_weather", {"city": "Paris"})
        + "\n"
        + format_tool_call("get_weather", '{"city": "Rome"}')
        + "<_end>\n"
        "<_user>"
        + format_tool_response('{"temp_c": 20}')
        + "\n"
        + format_tool_response({"temp_c": 25, "sky": "晴"})
        + "<_bot>"
        + format_tool_call("calc", {"a": 1})
        + "<_end>\n"
        "<_user>" + format_tool_response("2") + "<_bot>"
    )
    assert _render(tiny.tok, msgs, add_generation_prompt=True, default_system="") == expected
    assert format_tool_call("f", {"x": "<é>"}) == '<tool_call>\n{"name": "f", "arguments": {"x": "<é>"}}\n</tool_call>'
    assert format_tool_response("r") == "<tool_response>\nr\n</tool_response>"


# ----------------------------------------------------------------------------------------------------------------
# decoding
# ----------------------------------------------------------------------------------------------------------------


def test_decode_round_trip(pair: Pair):
    tok, sp = pair.tok, pair.sp
    for text in [t for t in TRICKY if not _CONTROL_RE.search(t)]:  # tags: test_tool_tags_are_control_ids_9_to_12
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == sp.decode(ids)
        # a literal "▁" in the text decodes as a space, in SentencePiece too
        assert tok.decode(ids) == text.replace("▁", " ")
    chat = [{"role": "user", "content": "hello 世界"}, {"role": "assistant", "content": "ok 42"}]
    ids = tok.apply_chat_template(chat, default_system="Sys", tokenize=True, return_dict=False)
    assert tok.decode(ids, skip_special_tokens=True) == sp.decode(ids) == "Sys\n hello 世界 ok 42"


# ----------------------------------------------------------------------------------------------------------------
# save_pretrained -> AutoTokenizer.from_pretrained, in a process that cannot import telechat_lab
# ----------------------------------------------------------------------------------------------------------------

_RELOAD_SCRIPT = r"""
import json, sys
sys.modules["telechat_lab"] = None  # any import of telechat_lab now fails
from transformers import AutoTokenizer
directory, probes = sys.argv[1], json.loads(sys.argv[2])
out = {}
for trust in (False, True):
    tok = AutoTokenizer.from_pretrained(directory, trust_remote_code=trust)
    out[str(trust)] = {
        "class": type(tok).__name__,
        "texts": tok(probes["texts"], add_special_tokens=True)["input_ids"],
        "chats": [[tok.apply_chat_template(m, tokenize=False, **kw),
                   tok.apply_chat_template(m, return_dict=False, **kw)] for m, kw in probes["chats"]],
        "special": [tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id],
        "telechat_lab_imported": any(k.startswith("telechat_lab") and sys.modules[k] is not None for k in sys.modules),
    }
print(json.dumps(out))
"""


def _probe_chats():
    msgs = [
        {"role": "user", "content": "u1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "天气?"},
    ]
    tool_msgs = msgs[:1] + [
        {"role": "assistant", "tool_calls": [{"name": "get_weather", "arguments": {"c": 1}}]},
        {"role": "tool", "content": "sunny"},
    ]
    return [
        (msgs, {"add_generation_prompt": True}),
        (msgs, {"add_generation_prompt": True, "default_system": ""}),
        (msgs, {"default_system": "Be brief."}),
        (tool_msgs, {"add_generation_prompt": True, "tools": TOOLS}),
    ]


@pytest.mark.parametrize("which", ["tiny", "real"])
def test_save_and_reload_without_telechat_lab(which, request, tmp_path):
    pair: Pair = request.getfixturevalue(which)
    directory = tmp_path / "tok"
    save_tokenizer(pair.tok, directory)
    assert (directory / "tokenizer.model").read_bytes() == pair.model_file.read_bytes()
    config = json.loads((directory / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] in ("TokenizersBackend", "PreTrainedTokenizerFast")
    assert "auto_map" not in config

    probes = {"texts": TRICKY, "chats": _probe_chats()}
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "-I", "-c", _RELOAD_SCRIPT, str(directory), json.dumps(probes)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])

    tok = pair.tok
    expected_texts = tok(TRICKY, add_special_tokens=True)["input_ids"]
    expected_chats = [
        [tok.apply_chat_template(m, tokenize=False, **kw), tok.apply_chat_template(m, return_dict=False, **kw)]
        for m, kw in _probe_chats()
    ]
    for trust in ("False", "True"):
        got = result[trust]
        assert got["class"] == "TokenizersBackend"
        assert not got["telechat_lab_imported"]
        assert got["texts"] == expected_texts == [pair.reference(t) for t in TRICKY]
        assert got["chats"] == expected_chats
        assert got["special"] == [1, 2, 3, 0]


def test_load_tokenizer_accepts_a_directory_and_a_saved_directory(tiny: Pair, tmp_path):
    save_tokenizer(tiny.tok, tmp_path / "a")
    from_dir = load_tokenizer(tmp_path / "a")  # rebuilt from tokenizer.model
    (tmp_path / "a" / "tokenizer.model").unlink()
    from_json = load_tokenizer(tmp_path / "a")  # only tokenizer.json left
    for tok in (from_dir, from_json):
        assert tok(TRICKY, add_special_tokens=False)["input_ids"] == tiny.fast(TRICKY)
        assert tok.chat_template == CHAT_TEMPLATE
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "missing")


# ----------------------------------------------------------------------------------------------------------------
# the tiny tokenizer asset
# ----------------------------------------------------------------------------------------------------------------


def test_tiny_tokenizer_asset(tiny: Pair):
    from transformers.convert_slow_tokenizer import import_protobuf

    assert TINY_TOKENIZER_PATH.stat().st_size < 300_000
    proto = import_protobuf().ModelProto()
    proto.ParseFromString(TINY_TOKENIZER_PATH.read_bytes())
    spec, norm = proto.trainer_spec, proto.normalizer_spec
    assert 2000 <= len(proto.pieces) <= 4096
    assert spec.model_type == 2 and spec.byte_fallback and spec.split_digits and spec.allow_whitespace_only_pieces
    assert norm.name == "identity" and norm.add_dummy_prefix and not norm.remove_extra_whitespaces
    assert (spec.unk_id, spec.bos_id, spec.eos_id, spec.pad_id) == (0, 1, 2, 3)
    # same special layout as TeleChat2: controls 0..17, user-defined 18..133, bytes 134..389
    assert [p.piece for p in proto.pieces[18:34]] == [*"0123456789", "_", "\n", "\t", "__", "___", "____"]
    assert proto.pieces[133].piece == "<reserve100>" and proto.pieces[134].piece == "<0x00>"
    assert proto.pieces[389].piece == "<0xFF>"
    if REAL_MODEL.is_file():
        real = import_protobuf().ModelProto()
        real.ParseFromString(REAL_MODEL.read_bytes())
        assert [(p.piece, p.type) for p in proto.pieces[:390]] == [(p.piece, p.type) for p in real.pieces[:390]]
    # it is a usable tokenizer: common English and Chinese text needs few byte-fallback pieces
    ids = tiny.sp.encode("The weather is nice today. 今天的天气很好，我们一起去公园。")
    assert sum(134 <= i < 390 for i in ids) == 0 and len(ids) < 30


def test_tiny_tokenizer_training_is_deterministic(tmp_path):
    spec = importlib.util.spec_from_file_location("train_tiny_tokenizer", ROOT / "scripts" / "train_tiny_tokenizer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = module.train(tmp_path / "tiny.model", vocab_size=3072, lines=60000, seed=20240601)
    assert out.read_bytes() == TINY_TOKENIZER_PATH.read_bytes()
