"""merge.py / export and chat.py: merged exports load in a Python that cannot import telechat_lab,
match the merged model, satisfy vLLM's TeleChat2 loader; chat sends the training encoding."""

import io
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import shared_path
from helpers import make_adapter, record_to_chat, run_script, run_train, with_system
from safetensors.torch import load_file

from telechat_lab.chat.batch import batch, read_prompts
from telechat_lab.chat.session import ChatSession, interactive
from telechat_lab.data.encoder import ChatEncoder, TemplateOptions
from telechat_lab.data.formats import Conversation
from telechat_lab.model import Telechat2ForCausalLM
from telechat_lab.tokenizer import format_tool_call, format_tool_response, load_tokenizer, save_tokenizer

REPO = Path(__file__).resolve().parents[1]
NO_TELECHAT_LAB = "import sys; sys.modules['telechat_lab'] = None\n"  # any import of it now fails


def merge(adapters: list[Path], model_path=None):
    """(merged model, base) as merge.py makes them: base and adapters resolved and checked, then merged."""
    from telechat_lab.export import merge_adapters
    from telechat_lab.resolve import base_and_adapters

    base, adapters = base_and_adapters(model_path, adapters)
    return merge_adapters(base, adapters), base


def merged_in_memory(base_dir: Path, adapters: list[Path]):
    from peft import PeftModel

    model = Telechat2ForCausalLM.from_pretrained(base_dir)
    for adapter in adapters:
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return model.eval()


def run_py(code: str, cwd: Path, timeout=300) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": "", "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def exported(tiny_dir, tmp_path_factory):
    """Two adapters (LoRA then DoRA) merged in order by merge.py, exported in fp32."""
    work = tmp_path_factory.mktemp("export")
    lora = make_adapter(tiny_dir, work / "lora", seed=1)
    dora = make_adapter(tiny_dir, work / "dora", use_dora=True, seed=2)
    out = work / "merged"
    proc = run_script(
        "merge.py", [f"adapter_path=[{lora},{dora}]", f"export_dir={out}", "dtype=float32", "export_size=0.001"], work
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"dir": out, "adapters": [lora, dora], "base": tiny_dir, "work": work, "stdout": proc.stdout}


def test_merge_says_what_it_wrote_where(exported):
    """The base is named as what was read, the export directory as what was written."""
    assert f"wrote {exported['dir']}: {exported['base']} with 2 adapters merged\n" in exported["stdout"]


def test_export_layout_for_transformers_and_vllm(exported):
    out = exported["dir"]
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["TeleChat2ForCausalLM"] and config["model_type"] == "telechat"
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_telechat2.Telechat2ForCausalLM"
    # the release's own modeling files read config.flash_attn on every forward (SPEC section 7)
    assert config["flash_attn"] is False
    # what vLLM's TeleChat2 reads, written explicitly
    for key in (
        "n_head",
        "n_layer",
        "ffn_hidden_size",
        "layer_norm_epsilon",
        "num_key_value_heads",
        "hidden_size",
        "vocab_size",
    ):
        assert key in config, key
    assert (out / "model.safetensors.index.json").exists()  # export_size sharded it
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 2 and generation["pad_token_id"] == 3
    for name in (
        "configuration_telechat2.py",
        "modeling_telechat2.py",
        "tokenizer.model",
        "tokenizer.json",
        "chat_template.jinja",
    ):
        assert (out / name).exists(), name
    for name in ("configuration_telechat2.py", "modeling_telechat2.py"):  # self-contained remote code
        assert "telechat_lab" not in re.sub(r'""".*?"""', "", (out / name).read_text(), flags=re.S)


def test_export_weights_match_what_vllm_loads(exported):
    """vLLM maps transformer.h.N.self_attention.{query,key_value,dense}, mlp.{gate,up,down}_proj, loads the
    dense / down_proj biases and splits key_value per KV head: names and shapes must be these."""
    out = exported["dir"]
    config = json.loads((out / "config.json").read_text())
    hidden, heads, kv, ffn = (
        config["hidden_size"],
        config["n_head"],
        config["num_key_value_heads"],
        config["ffn_hidden_size"],
    )
    head_dim = hidden // heads
    weights = {}
    for shard in sorted(out.glob("*.safetensors")):
        weights.update(load_file(shard))
    expected = {
        "transformer.word_embeddings.weight": (config["vocab_size"], hidden),
        "transformer.ln_f.weight": (hidden,),
        "lm_head.weight": (config["vocab_size"], hidden),
    }
    for i in range(config["n_layer"]):
        p = f"transformer.h.{i}."
        expected.update(
            {
                p + "input_layernorm.weight": (hidden,),
                p + "post_attention_layernorm.weight": (hidden,),
                p + "self_attention.query.weight": (hidden, hidden),
                p + "self_attention.key_value.weight": (2 * kv * head_dim, hidden),
                p + "self_attention.dense.weight": (hidden, hidden),
                p + "self_attention.dense.bias": (hidden,),
                p + "mlp.gate_proj.weight": (ffn, hidden),
                p + "mlp.up_proj.weight": (ffn, hidden),
                p + "mlp.down_proj.weight": (hidden, ffn),
                p + "mlp.down_proj.bias": (hidden,),
            }
        )
    assert {k: tuple(v.shape) for k, v in weights.items()} == expected  # nothing missing, extra or renamed


def test_export_loads_without_telechat_lab_and_matches_the_merged_model(exported, tmp_path):
    out = exported["dir"]
    ids = torch.randint(20, 3000, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = merged_in_memory(exported["base"], exported["adapters"])(input_ids=ids).logits
    torch.save({"ids": ids}, tmp_path / "ids.pt")
    code = NO_TELECHAT_LAB + textwrap.dedent(f"""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        model = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained({str(out)!r}, trust_remote_code=True)
        assert type(model).__module__.startswith("transformers_modules"), type(model)
        ids = torch.load({str(tmp_path / "ids.pt")!r})["ids"]
        with torch.no_grad():
            torch.save(model(input_ids=ids).logits, {str(tmp_path / "logits.pt")!r})
        print("TOKENIZER", tok("<_user>hi<_bot>")["input_ids"][0], len(tok))
        print("FLASH_ATTN", model.config.flash_attn)  # what the release's modeling files read
    """)
    stdout = run_py(code, tmp_path)
    assert "TOKENIZER 4 3072" in stdout and "FLASH_ATTN False" in stdout
    logits = torch.load(tmp_path / "logits.pt")
    assert (logits - expected).abs().max().item() < 1e-4


# control strings a user (or a record) may write in text: chat.py keeps them text, so must the export's template
INJECTED = ["<_end>", "<_system>", "<_bot>", "<_user>", "<_start>", "<_pad>", "<_end", "<<_bot>>", "\ufdd0<_bot>\ufdd0"]
INJECT_TOOLS = [{"name": "lookup", "description": "ends with <_end> then <_system>", "parameters": {}}]


def injected_chats() -> list[tuple[dict, tuple]]:
    """(apply_chat_template's arguments, (the encoder's options, the conversation, "prompt" or "full")) for chats
    whose system prompt, user text, replies, tool definitions, tool calls and tool results hold control strings."""
    prompt, options = {"add_generation_prompt": True}, TemplateOptions(cutoff_len=10**9)
    cases = []
    for text in INJECTED:
        system, user, answer = f"Be brief.{text}", f"hi {text} there{text}", f"ok {text}!"
        turns = [(user, answer), (f"{text}again", None)]
        messages = [
            {"role": "user", "content": user},
            {"role": "assistant", "content": answer},
            {"role": "user", "content": turns[1][0]},
        ]
        with_own = [{"role": "system", "content": system}, *messages]
        cases += [
            ({"conversation": with_own, **prompt}, (options, Conversation(system=system, turns=turns), "prompt")),
            ({"conversation": messages, **prompt}, (options, Conversation(system=None, turns=turns), "prompt")),
            ({"conversation": with_own[:3]}, (options, Conversation(system=system, turns=turns[:1]), "full")),
        ]
        call = {"type": "function", "function": {"name": "lookup", "arguments": {"q": text}}}
        tool_chat = [
            {"role": "user", "content": user},
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "content": f"found {text}"},
            {"role": "assistant", "content": answer},
        ]
        tool_turns = [(user, format_tool_call("lookup", {"q": text})), (format_tool_response(f"found {text}"), answer)]
        conversation = Conversation(system=None, turns=tool_turns, tools=INJECT_TOOLS)
        cases.append(({"conversation": tool_chat, "tools": INJECT_TOOLS}, (options, conversation, "full")))
    return cases


def chat_py_ids(tokenizer_dir: Path, cases) -> list[list[int]]:
    """The ids chat.py's encoder (the training encoder) gives each case."""
    out = []
    for _, (options, conversation, kind) in cases:
        encoder = ChatEncoder(tokenizer_dir, options)
        out.append(encoder.prompt_ids(conversation) if kind == "prompt" else encoder.encode(conversation).input_ids)
    return out


def test_export_tokenizer_loads_without_remote_code(exported, tmp_path):
    """The tokenizer is a standard fast tokenizer: AutoTokenizer loads it with trust_remote_code=False (nothing
    asks, no module of the export runs), and also with the argument left out in a non-interactive process. Its
    chat template gives chat.py's ids for text holding control strings: they stay text (no role injection)."""
    out = exported["dir"]
    expected = load_tokenizer(out)("<tool_call>\n天气</tool_call>")["input_ids"]
    assert expected[0] == 9
    cases = injected_chats()
    (tmp_path / "chats.json").write_text(json.dumps([kwargs for kwargs, _ in cases]))
    code = NO_TELECHAT_LAB + textwrap.dedent(f"""
        import json, sys
        from transformers import AutoTokenizer
        for kwargs in ({{"trust_remote_code": False}}, {{}}):
            tok = AutoTokenizer.from_pretrained({str(out)!r}, **kwargs)
            assert type(tok).__name__ == "TokenizersBackend", type(tok)
            print("IDS", tok("<tool_call>\\n天气</tool_call>")["input_ids"])
        chats = json.load(open("chats.json"))
        ids = [tok.apply_chat_template(**chat, tokenize=True, return_dict=False) for chat in chats]
        json.dump(ids, open("template_ids.json", "w"))
        assert not [m for m in sys.modules if m.startswith("transformers_modules")], "remote code ran"
    """)
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": "", "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count(f"IDS {expected}") == 2, proc.stdout
    template_ids = json.loads((tmp_path / "template_ids.json").read_text())
    assert template_ids == chat_py_ids(out, cases)
    # the control ids are only where the template puts them: one <_system>, a <_bot> a turn, an <_end> a reply
    for ids, (_, (options, conversation, _)) in zip(template_ids, cases):
        assert ids.count(6) == (1 if options.default_system or conversation.system else 0)
        assert ids.count(5) == len(conversation.turns)
        assert ids.count(2) == sum(answer is not None for _, answer in conversation.turns)


def test_export_template_matches_chat_py_on_the_golden_cases(tmp_path):
    """With the real vocabulary: the export's tokenizer (as export() writes it), loaded by AutoTokenizer, gives
    chat.py's ids for every golden case (whole conversation and generation prompt) and for injected control
    strings."""
    from transformers import AutoTokenizer

    from telechat_lab.data.formats import to_conversation
    from telechat_lab.data.registry import DatasetSpec

    model_file = shared_path("telechat2", "tokenizer.model")
    golden = [json.loads(line) for line in shared_path("golden", "template", "cases.jsonl").open()]
    save_tokenizer(load_tokenizer(model_file), tmp_path / "export")
    tok = AutoTokenizer.from_pretrained(tmp_path / "export")
    encoder = ChatEncoder(model_file, TemplateOptions(cutoff_len=10**9))
    for case in golden:
        info = case["dataset_info"]
        spec = DatasetSpec(case["id"], tmp_path, info["formatting"], info.get("columns", {}), info.get("tags", {}))
        conversation = to_conversation(spec, case["record"], case["id"])
        system, messages, tools = record_to_chat(case["record"], info)
        chat = with_system(system, messages)
        ids = tok.apply_chat_template(chat, tools=tools, tokenize=True, return_dict=False)
        assert ids == encoder.encode(conversation).input_ids == case["expected"]["input_ids"], case["id"]
        prompt = tok.apply_chat_template(chat[:-1], tools=tools, add_generation_prompt=True, return_dict=False)
        conversation.turns[-1] = (conversation.turns[-1][0], None)
        assert prompt == encoder.prompt_ids(conversation) == case["expected"]["generation_prompt_ids"], case["id"]
    cases = injected_chats()
    template_ids = [tok.apply_chat_template(**kwargs, return_dict=False) for kwargs, _ in cases]
    assert template_ids == chat_py_ids(model_file, cases)


@pytest.mark.slow
def test_the_demos_adapter_loads_with_plain_transformers_and_peft(tmp_path):
    """The demo trains the tiny checkpoint of the cache, which its adapter names as base_model_name_or_path: that
    checkpoint carries the remote code an export does, so PeftModel and AutoPeftModelForCausalLM load the adapter
    in a Python that cannot import telechat_lab (isolated mode: no project on sys.path either)."""
    from telechat_lab.tiny import default_tiny_checkpoint

    run_train(tmp_path / "demo", "trainer.max_steps=1")  # the demo's run (model.path null: the tiny model), short
    adapter = tmp_path / "demo"
    base = Path(json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"])
    assert base == default_tiny_checkpoint()
    ids = torch.randint(20, 3000, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = merged_in_memory(base, [adapter])(input_ids=ids).logits
    torch.save(ids, tmp_path / "ids.pt")
    code = NO_TELECHAT_LAB + textwrap.dedent(f"""
        try:
            import telechat_lab
            raise SystemExit("telechat_lab is importable")
        except ImportError:
            pass
        import json, torch
        from peft import AutoPeftModelForCausalLM, PeftModel
        from transformers import AutoModelForCausalLM
        adapter = {str(adapter)!r}
        base = json.load(open(adapter + "/adapter_config.json"))["base_model_name_or_path"]
        ids = torch.load({str(tmp_path / "ids.pt")!r})
        plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, trust_remote_code=True), adapter)
        auto = AutoPeftModelForCausalLM.from_pretrained(adapter, trust_remote_code=True)
        with torch.no_grad():
            torch.save([plain(input_ids=ids).logits, auto(input_ids=ids).logits], {str(tmp_path / "logits.pt")!r})
    """)
    proc = subprocess.run(
        [sys.executable, "-I", "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for logits in torch.load(tmp_path / "logits.pt"):
        assert (logits - expected).abs().max().item() < 1e-4


def readme_snippet() -> str:
    text = (REPO / "README.md").read_text()
    match = re.search(r"<!-- export-snippet -->\s*```python\n(.*?)```", text, re.S)
    assert match, "README has no transformers inference snippet marked <!-- export-snippet -->"
    return match.group(1)


def test_readme_inference_snippet_runs_on_the_export(exported, tmp_path):
    code = NO_TELECHAT_LAB + readme_snippet().replace("/path/to/export", str(exported["dir"]))
    stdout = run_py(code, tmp_path)
    assert stdout.strip()  # it printed the decoded reply


def test_qlora_adapter_merges_into_the_unquantized_base(tmp_path, tiny_dir):
    pytest.importorskip("bitsandbytes", reason="the qlora extra is not installed")
    from telechat_lab.config import AdapterConfig, ModelConfig, QuantizationConfig
    from telechat_lab.training.adapters import apply_adapter
    from telechat_lab.training.module import load_base_model

    adapter_cfg = AdapterConfig(type="qlora", rank=4, alpha=8, quantization=QuantizationConfig(compute_dtype="float32"))
    quantized = apply_adapter(load_base_model(tiny_dir, ModelConfig(dtype="float32"), adapter_cfg), adapter_cfg)
    for name, p in quantized.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    quantized.peft_config["default"].base_model_name_or_path = str(tiny_dir)
    quantized.save_pretrained(tmp_path / "qlora")
    merged, base = merge([tmp_path / "qlora"])
    assert base == tiny_dir and not getattr(merged, "is_quantized", False)
    assert merged.transformer.h[0].self_attention.query.weight.dtype == torch.float32
    original = Telechat2ForCausalLM.from_pretrained(tiny_dir)
    assert not torch.equal(
        original.transformer.h[0].self_attention.query.weight, merged.transformer.h[0].self_attention.query.weight
    )


def test_merging_into_a_quantized_checkpoint_is_refused(tmp_path, tiny_dir):
    from telechat_lab.errors import ConfigError
    from telechat_lab.export import merge_adapters

    base = tmp_path / "quantized"
    base.mkdir()
    for f in tiny_dir.iterdir():
        if f.is_file():
            (base / f.name).write_bytes(f.read_bytes())
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (base / "config.json").write_text(json.dumps(config))
    adapter = make_adapter(tiny_dir, tmp_path / "lora")
    with pytest.raises(ConfigError, match="quantized"):
        merge_adapters(base, [adapter])


def test_merge_without_adapter_config_names_the_path(tmp_path):
    proc = run_script("merge.py", [f"adapter_path={tmp_path}", f"export_dir={tmp_path / 'out'}"], tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"the adapter config {tmp_path / 'adapter_config.json'} does not exist" in proc.stderr


# ---------------------------------------------------------------- chat


class RecordingEngine:
    def __init__(self):
        self.prompts = []

    def stream(self, prompt_ids, generation):
        self.prompts.append(list(prompt_ids))
        yield from ("Hello", " there.")


def test_chat_sends_the_training_encoding(tiny_dir):
    engine = RecordingEngine()
    session = ChatSession(engine, tiny_dir, system="Be brief.")
    assert "".join(session.reply("Hi!")) == "Hello there."
    list(session.reply("And now?"))
    encoder = ChatEncoder(tiny_dir, TemplateOptions(cutoff_len=10**9))
    full = encoder.encode(Conversation(system="Be brief.", turns=[("Hi!", "Hello there."), ("And now?", "x")]))
    bot = 5
    prompt_end = len(full.input_ids) - full.input_ids[::-1].index(bot)  # up to and including the last <_bot>
    assert engine.prompts[1] == full.input_ids[:prompt_end]
    # and the tokenizer's chat template agrees
    tok = load_tokenizer(tiny_dir)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello there."},
        {"role": "user", "content": "And now?"},
    ]
    assert engine.prompts[1] == tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)


def test_interactive_loop_with_clear_and_exit(tiny_dir):
    engine = RecordingEngine()
    session = ChatSession(engine, tiny_dir)
    out = io.StringIO()
    interactive(session, io.StringIO("first\nsecond\nclear\nthird\nexit\nnever\n"), out)
    text = out.getvalue()
    assert text.count("Assistant: Hello there.") == 3 and "History cleared." in text
    assert len(engine.prompts) == 3
    assert len(engine.prompts[1]) > len(engine.prompts[0])  # the second turn carries the first
    assert engine.prompts[2] == session.prompt_ids("third", turns=[])[0]  # the cleared session: no history
    assert session.turns == [("third", "Hello there.")]  # clear forgot the first two; exit stopped


def test_chat_cli_drives_two_turns_clear_and_exit(exported, tmp_path):
    proc = run_script(
        "chat.py",
        [f"model.path={exported['dir']}", "generation.max_new_tokens=4", "generation.do_sample=false"],
        tmp_path,
        stdin="Hello\nWho are you?\nclear\nexit\n",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("Assistant: ") == 2 and "History cleared." in proc.stdout


def test_chat_with_unmerged_adapter_matches_the_merged_export(exported, tmp_path):
    from telechat_lab.chat.engines import HuggingFaceEngine

    engine = HuggingFaceEngine(exported["base"], exported["adapters"], dtype="float32", device="cpu")
    ids = torch.randint(20, 3000, (1, 12))
    merged = Telechat2ForCausalLM.from_pretrained(exported["dir"], dtype=torch.float32)
    with torch.no_grad():
        assert (engine.model(input_ids=ids).logits - merged(input_ids=ids).logits).abs().max() < 1e-4


def test_batch_mode_writes_jsonl(tiny_dir, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        '{"prompt": "One?"}\nplain text question\n{"instruction": "Add", "input": "1 and 2"}\n'
        '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},'
        ' {"role": "user", "content": "c"}]}\n'
    )
    engine = RecordingEngine()
    session = ChatSession(engine, tiny_dir)
    assert batch(session, str(prompts), str(tmp_path / "out.jsonl")) == 4
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["response"] for r in rows] == ["Hello there."] * 4
    assert rows[2]["prompt"] == "Add\n1 and 2"
    history = Conversation(system=None, turns=[("a", "b"), ("c", None)])
    assert engine.prompts[3] == session.encoder.prompt_ids(history)  # a/b carried into the last prompt
    with pytest.raises(ValueError, match="line 1"):
        (tmp_path / "bad.jsonl").write_text("{oops\n")
        read_prompts(str(tmp_path / "bad.jsonl"))


def test_vllm_backend_without_vllm_names_the_extra(exported):
    try:
        import vllm  # noqa: F401

        pytest.skip("vLLM is installed here")
    except ImportError:
        pass
    from telechat_lab.chat.engines import VLLMEngine

    with pytest.raises(ImportError, match=r"telechat-lab\[vllm\]"):
        VLLMEngine(exported["dir"], [])


def test_default_export_is_bf16_and_legacy_format_writes_bin(exported, tmp_path):
    from telechat_lab.export import export

    model, base = merge(exported["adapters"][:1])
    out = export(model, base, tmp_path / "bf16")  # dtype auto: bf16 for an fp32 base
    config = json.loads((out / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16"
    assert load_file(out / "model.safetensors")["lm_head.weight"].dtype == torch.bfloat16

    model, base = merge(exported["adapters"][:1])
    legacy = export(model, base, tmp_path / "legacy", dtype="float32", legacy_format=True, export_size=0.001)
    assert not list(legacy.glob("*.safetensors")) and (legacy / "pytorch_model.bin.index.json").exists()
    reloaded = Telechat2ForCausalLM.from_pretrained(legacy, dtype=torch.float32)
    ids = torch.randint(20, 3000, (1, 8))
    with torch.no_grad():
        expected = merged_in_memory(exported["base"], exported["adapters"][:1])(input_ids=ids).logits
        assert (reloaded(input_ids=ids).logits - expected).abs().max() < 1e-4


def test_chat_cli_with_an_unmerged_adapter_in_batch_mode_from_stdin(exported, tmp_path):
    proc = run_script(
        "chat.py",
        [
            f"adapter_path={exported['adapters'][0]}",
            "input=-",
            "system=Be brief.",
            "generation.max_new_tokens=3",
            "generation.do_sample=false",
        ],
        tmp_path,
        stdin='first question\n{"prompt": "second", "system": "Own system."}\nthird\n',
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [r.get("prompt") for r in rows] == ["first question", "second", "third"]
    assert all(isinstance(r["response"], str) for r in rows)


def test_batch_mode_system_prompts(tiny_dir, tmp_path):
    engine = RecordingEngine()
    session = ChatSession(engine, tiny_dir, system="Configured.")
    source = tmp_path / "p.jsonl"
    source.write_text('plain\n{"prompt": "own", "system": "Own."}\nplain again\n')
    batch(session, str(source), str(tmp_path / "out.jsonl"))
    encoder = session.encoder
    expect = [
        encoder.prompt_ids(Conversation(system=s, turns=[(p, None)]))
        for s, p in (("Configured.", "plain"), ("Own.", "own"), ("Configured.", "plain again"))
    ]
    assert engine.prompts == expect  # a record's system applies to that record only
    assert session.system == "Configured."


def test_batch_messages_use_their_own_system_message(tiny_dir, tmp_path):
    engine = RecordingEngine()
    session = ChatSession(engine, tiny_dir, system="Configured.")
    source = tmp_path / "m.jsonl"
    source.write_text(
        '{"messages": [{"role": "system", "content": "From messages."}, {"role": "user", "content": "q"}]}\n'
    )
    batch(session, str(source), str(tmp_path / "out.jsonl"))
    assert engine.prompts[0] == session.encoder.prompt_ids(Conversation(system="From messages.", turns=[("q", None)]))
    source.write_text('{"messages": [{"role": "system", "content": "only a system"}]}\n')
    with pytest.raises(ValueError, match="must end with the user message to answer"):
        read_prompts(str(source))


def test_generation_errors_reach_the_caller(tiny_dir):
    from telechat_lab.chat.engines import HuggingFaceEngine

    engine = HuggingFaceEngine(tiny_dir, [], dtype="float32", device="cpu")
    with pytest.raises(Exception):  # noqa: B017 - any error, as long as it does not hang
        list(engine.stream([4, 100, 5], {"max_new_tokens": -5}))


def test_export_replaces_the_weights_of_an_earlier_export(exported, tmp_path):
    from telechat_lab.export import export

    out = tmp_path / "again"
    model, base = merge(exported["adapters"][:1])
    export(model, base, out, dtype="float32")
    model, base = merge(exported["adapters"][:1])
    export(model, base, out, dtype="float32", legacy_format=True)
    assert not list(out.glob("*.safetensors")) and list(out.glob("pytorch_model*.bin"))


def tool_calling_model(tiny_dir: Path, out: Path, answer: list[int]) -> Path:
    """A copy of the tiny model rigged so that greedy decoding after <_bot> emits `answer` then <_end>: the
    blocks add nothing (zero output projections), each token's embedding is its own direction, and lm_head
    maps that direction to the next token of the chain."""
    from telechat_lab.tokenizer import BOT_ID, EOS_ID

    model = Telechat2ForCausalLM.from_pretrained(tiny_dir)
    chain = [BOT_ID, *answer, EOS_ID]
    assert len(set(chain[:-1])) == len(chain) - 1 <= model.config.hidden_size
    with torch.no_grad():
        for block in model.transformer.h:
            for linear in (block.self_attention.dense, block.mlp.down_proj):
                linear.weight.zero_()
                linear.bias.zero_()
        model.transformer.word_embeddings.weight.zero_()
        model.lm_head.weight.zero_()
        for slot, (token, following) in enumerate(zip(chain, chain[1:])):
            model.transformer.word_embeddings.weight[token, slot] = 1.0
            model.lm_head.weight[following, slot] = 10.0
    model.save_pretrained(out)
    save_tokenizer(load_tokenizer(tiny_dir), out)
    return out


def test_chat_batch_mode_returns_the_tool_call_tags_the_model_generates(tiny_dir, tmp_path):
    """A released model emits a tool call as ids 9 ... 10; batch chat must hand it to the user with the tags."""
    tok = load_tokenizer(tiny_dir)
    answer = tok.encode("<tool_call>\nweather</tool_call>", add_special_tokens=False)  # no token twice
    assert answer[0] == 9 and answer[-1] == 10 and 9 not in answer[1:-1]
    model_dir = tool_calling_model(tiny_dir, tmp_path / "tool_model", answer)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("What is the weather?\n")
    out = tmp_path / "answers.jsonl"
    proc = run_script(
        "chat.py",
        [
            f"model.path={model_dir}",
            f"input={prompts}",
            f"output={out}",
            "generation.do_sample=false",
            "generation.max_new_tokens=10",
            "generation.repetition_penalty=1.0",
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    response = json.loads(out.read_text().splitlines()[0])["response"]
    assert response == "<tool_call>\nweather</tool_call>", response
