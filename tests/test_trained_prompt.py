"""Chat and serve build prompts with the system prompt the adapter's run trained with (its config.yaml's
data.default_system), unless the command sets default_system itself."""

import pytest
from helpers import run_train

from telechat_lab.config import ChatConfig
from telechat_lab.config.schema import ServeConfig, ServeModelConfig
from telechat_lab.data.encoder import ChatEncoder, TemplateOptions
from telechat_lab.data.formats import Conversation

SYSTEM = "You are X."


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "run"
    run_train(out, "trainer.max_steps=1", f"data.default_system='{SYSTEM}'")
    return out


def _expected(base, system):
    return ChatEncoder(base, TemplateOptions(cutoff_len=10**9, default_system=system)).prompt_ids(
        Conversation(system=None, turns=[("hi", None)])
    )


def test_chat_uses_the_runs_default_system(trained, capsys):
    from telechat_lab.chat import make_session

    session = make_session(ChatConfig(adapter_path=str(trained)))
    ids, _ = session.prompt_ids("hi")
    assert ids == _expected(_base(trained), SYSTEM)
    assert ids != _expected(_base(trained), None)
    assert capsys.readouterr().err.count("default_system") == 0  # nothing overridden: nothing said


def test_an_explicit_default_system_wins_and_says_so(trained, capsys):
    from telechat_lab.chat import make_session

    session = make_session(ChatConfig(adapter_path=str(trained), default_system="You are Y."))
    assert session.prompt_ids("hi")[0] == _expected(_base(trained), "You are Y.")
    err = capsys.readouterr().err
    assert "default_system" in err and SYSTEM in err and "You are Y." in err


def test_serve_uses_each_adapters_default_system(trained):
    from telechat_lab.serve import load

    base = _base(trained)
    _, session = load(ServeConfig(adapters={"x": str(trained)}, model=ServeModelConfig(path=str(base), name="b")))
    conversation = Conversation(system=None, turns=[("hi", None)])
    assert session.encoder_for("x").prompt_ids(conversation) == _expected(base, SYSTEM)
    assert session.encoder_for("b").prompt_ids(conversation) == _expected(base, None)  # the base: TeleChat's


def _base(run_dir):
    from telechat_lab.resolve import base_and_adapters

    return base_and_adapters(None, str(run_dir))[0]


def test_a_merged_exports_chat_template_defaults_to_the_runs_system_prompt(trained, tmp_path):
    from transformers import AutoTokenizer

    from telechat_lab.config.schema import MergeConfig
    from telechat_lab.export import merge_and_export

    out = merge_and_export(MergeConfig(adapter_path=str(trained), export_dir=str(tmp_path / "export")))
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids  # transformers 5 returns a BatchEncoding
    assert list(ids) == _expected(_base(trained), SYSTEM)


def test_an_adapter_without_a_runs_config_records_nothing(tmp_path):
    from telechat_lab.trained_prompt import default_system_for

    (tmp_path / "plain").mkdir()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.yaml").write_text("- a list, not a run's settings\n")
    assert default_system_for([tmp_path / "plain", tmp_path / "other"], None, "chat") is None
