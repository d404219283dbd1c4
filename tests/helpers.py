"""Helpers shared by the test files: an independent reading of SPEC section 6 (records -> chat-template messages),
composing and running training (in-process and through train.py), reading a run's losses and adapter, and
callbacks that stop, slow down or poison a run on purpose."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import torch
from hydra import compose, initialize_config_dir


def record_to_chat(record: dict, info: dict) -> tuple[str, list[dict], list | None]:
    """SPEC section 6, reduced to what the golden cases use: a record -> (system, messages, tools)."""
    fmt = info.get("formatting", "alpaca")
    columns = info.get("columns", {})
    tools = None
    if fmt == "alpaca":
        c = {
            "prompt": "instruction",
            "query": "input",
            "response": "output",
            "system": "system",
            "history": "history",
            **columns,
        }
        system = record.get(c["system"]) or ""
        messages = []
        for query, answer in record.get(c["history"]) or []:
            messages += [{"role": "user", "content": query}, {"role": "assistant", "content": answer}]
        prompt, query = record.get(c["prompt"]) or "", record.get(c["query"]) or ""
        messages += [
            {"role": "user", "content": prompt + ("\n" + query if query else "")},
            {"role": "assistant", "content": record.get(c["response"]) or ""},
        ]
    elif fmt == "sharegpt":
        c = {"messages": "conversations", "system": "system", "tools": "tools", **columns}
        tags = {
            "role_tag": "from",
            "content_tag": "value",
            "user_tag": "human",
            "assistant_tag": "gpt",
            "observation_tag": "observation",
            "function_tag": "function_call",
            "system_tag": "system",
            **info.get("tags", {}),
        }
        system = record.get(c["system"]) or ""
        tools = record.get(c["tools"]) or None
        if isinstance(tools, str):
            tools = json.loads(tools) if tools.strip() else None
        messages = []
        for i, turn in enumerate(record[c["messages"]]):
            role, content = turn[tags["role_tag"]], turn[tags["content_tag"]]
            if role == tags["system_tag"] and i == 0:
                system = content
            elif role == tags["user_tag"]:
                messages.append({"role": "user", "content": content})
            elif role == tags["assistant_tag"]:
                messages.append({"role": "assistant", "content": content})
            elif role == tags["observation_tag"]:
                messages.append({"role": "tool", "content": content})
            elif role == tags["function_tag"]:
                calls = json.loads(content)
                calls = calls if isinstance(calls, list) else [calls]
                messages.append(
                    {
                        "role": "assistant",
                        "content": "",
                        "tool_calls": [{"type": "function", "function": call} for call in calls],
                    }
                )
            else:
                raise ValueError(f"unknown role {role!r}")
    elif fmt == "telechat":
        system = record.get("system") or ""
        roles = {"user": "user", "bot": "assistant"}
        messages = [{"role": roles[turn["role"]], "content": turn["content"]} for turn in record["dialog"]]
    else:
        raise ValueError(f"unknown format {fmt!r}")
    return system, messages, tools


def with_system(system: str, messages: list[dict]) -> list[dict]:
    """The chat-template messages: a system message first when there is a system prompt."""
    return ([{"role": "system", "content": system}] if system else []) + messages


REPO = Path(__file__).resolve().parents[1]
CONF = str(REPO / "telechat_lab" / "conf")
# small and quick: 16 identity examples, batch 4 -> 4 steps an epoch, no validation unless asked
QUICK = [
    "data.datasets=[identity]",
    "data.max_samples=16",
    "data.val_size=0",
    "data.batch_size=4",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "logger=csv",
]


def compose_train(overrides, tmp_path=None):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        extra = [f"output_dir={tmp_path}", f"data.cache_dir={tmp_path}/cache"] if tmp_path else []
        return compose("train", overrides=list(overrides) + extra)


def run_train(tmp_path, *overrides):
    """train() as train.py runs it: the composed config and the command line's overrides."""
    from telechat_lab.training.run import train

    overrides = [*QUICK, *overrides, f"output_dir={tmp_path}", f"data.cache_dir={tmp_path}/cache"]
    return train(compose_train(overrides), overrides)


def train_cli(args, cwd, timeout=600, env=None, check=True) -> subprocess.CompletedProcess:
    """python train.py ARGS in `cwd`; `check`: it must succeed; `env`: variables to set (None: to unset)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(Path(__file__).parent), **(env or {})}
    full_env = {key: value for key, value in full_env.items() if value is not None}
    proc = subprocess.run(
        [sys.executable, str(REPO / "train.py"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
    )
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def run_script(script: str, args: list[str], cwd: Path, stdin: str | None = None) -> subprocess.CompletedProcess:
    """python SCRIPT ARGS (an entry point of the repository) in `cwd`."""
    return subprocess.run(
        [sys.executable, str(REPO / script), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        input=stdin,
        timeout=300,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def losses(out_dir, split="train"):
    with open(Path(out_dir) / "loss_history.csv") as f:
        return [float(r["loss"]) for r in csv.DictReader(f) if r["split"] == split]


def adapter_weights(directory) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(Path(directory) / "adapter_model.safetensors")


def tree_snapshot(directory) -> dict[str, bytes]:
    """Every file under `directory` (relative path -> bytes): to show nothing was touched."""
    root = Path(directory)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def make_adapter(base_dir: Path, out: Path, use_dora=False, seed=0) -> Path:
    """A LoRA (or DoRA) adapter with non-zero weights, saved naming its base by absolute path."""
    from peft import LoraConfig, get_peft_model

    from telechat_lab.model import Telechat2ForCausalLM

    torch.manual_seed(seed)
    model = Telechat2ForCausalLM.from_pretrained(base_dir)
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["query", "key_value", "dense", "gate_proj", "up_proj", "down_proj"],
        init_lora_weights=False,
        use_dora=use_dora,
    )
    peft_model = get_peft_model(model, config)
    peft_model.peft_config["default"].base_model_name_or_path = str(base_dir)
    peft_model.save_pretrained(out)
    return out


class StopAfter(L.Callback):
    """Interrupts a run after `step` optimizer steps (as a crash or a pre-empted job would)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.step:
            trainer.should_stop = True


class Heartbeat(L.Callback):
    """Prints 'step N' after each optimizer step and sleeps `delay` seconds, so that a test can signal a
    training process at a step it chooses."""

    def __init__(self, delay: float = 0.2):
        self.delay = delay

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        print(f"step {trainer.global_step}", flush=True)
        time.sleep(self.delay)


class PoisonLoss(L.Callback):
    """Makes the model's output NaN at the given optimizer steps (1-based), as an overflow would."""

    def __init__(self, steps: list[int]):
        self.steps = set(steps)
        self.handle = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.handle is not None:
            self.handle.remove()
            self.handle = None
        if trainer.global_step + 1 in self.steps:
            # the final norm's output (the hidden states the loss reads): the fused loss takes lm_head's weight, not
            # the module, so a hook on lm_head would never run
            norm = getattr(pl_module.model, "get_base_model", lambda: pl_module.model)().transformer.ln_f
            self.handle = norm.register_forward_hook(lambda module, args, output: output * float("nan"))


class PoisonWeights(L.Callback):
    """Turns a trained weight to NaN after the given optimizer step, as a diverging run would."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            with torch.no_grad():
                next(p for p in pl_module.model.parameters() if p.requires_grad).fill_(float("nan"))
