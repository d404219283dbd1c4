"""Generation engines. Both take prompt token ids (encoded exactly as in training) and generation
options, and yield text.

Stopping an answer: the transformers engine generates in a thread of its own (its streamer hands the text to
the caller as it comes). When the caller stops reading (Ctrl+C raises KeyboardInterrupt while it waits, or it
closes the generator), a stopping criterion ends `generate` at its next token and the thread is joined before
the caller goes on: no generation thread outlives its answer (one still running when the interpreter exits
ends the process with `terminate called without an active exception`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from threading import Event, Thread

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from telechat_lab.tokenizer import EOS_ID, PAD_ID, visible_ids


class HuggingFaceEngine:
    """transformers generate with a streamer; an adapter is applied with peft, without merging."""

    def __init__(
        self,
        base: Path,
        adapters: list[Path],
        dtype: str = "auto",
        attn_implementation: str = "auto",
        device: str = "auto",
    ):
        from telechat_lab.model.loading import load_model, resolve_attention, resolve_dtype
        from telechat_lab.tokenizer import load_tokenizer

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        on_cuda = device.startswith("cuda")
        model = load_model(base, resolve_dtype(dtype, on_cuda=on_cuda), resolve_attention(attn_implementation, on_cuda))
        if adapters:
            model = self._with_adapters(model, adapters)
        self.model = model.to(device).eval()
        self.tokenizer = load_tokenizer(base)
        self.device = device
        self.max_length = model.config.training_seqlen

    @staticmethod
    def _with_adapters(model, adapters):
        """Several adapters stack as merge.py merges them: each earlier one merged in order, the last one applied on
        top, unmerged."""
        from peft import PeftModel

        for adapter in adapters[:-1]:
            model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
        return PeftModel.from_pretrained(model, str(adapters[-1]))

    def stream(self, prompt_ids: list[int], generation: dict) -> Iterator[str]:
        streamer = _answer_streamer(self.tokenizer)
        kwargs = generation_kwargs(generation)
        inputs = torch.tensor([prompt_ids], device=self.device)
        errors: list[BaseException] = []
        stop = Event()
        thread = Thread(target=self._generate, args=(inputs, streamer, kwargs, stop, errors), daemon=True)
        thread.start()
        try:
            yield from streamer
        finally:  # the answer is done, failed, or the caller stopped reading (Ctrl+C, close())
            stop.set()
            _join(thread)
        if errors:  # generation failed in its thread (out of memory, bad options): raise it here
            raise errors[0]

    def _generate(self, inputs, streamer, kwargs, stop: Event, errors):
        try:
            with torch.no_grad():
                self.model.generate(
                    input_ids=inputs,
                    attention_mask=torch.ones_like(inputs),
                    streamer=streamer,
                    eos_token_id=EOS_ID,
                    pad_token_id=PAD_ID,
                    stopping_criteria=StoppingCriteriaList([_StopWhenSet(stop)]),
                    **kwargs,
                )
        except BaseException as err:  # noqa: BLE001 - handed to the caller
            errors.append(err)
            streamer.end()


def _join(thread: Thread) -> None:
    """Wait for the generation thread (it stops at its next token); a further Ctrl+C does not cut the wait."""
    while thread.is_alive():
        try:
            thread.join()
        except KeyboardInterrupt:
            continue


class _StopWhenSet(StoppingCriteria):
    """Ends generation at the next token once `event` is set."""

    def __init__(self, event: Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def _answer_streamer(tokenizer):
    """A TextIteratorStreamer that shows the answer as `visible_ids` says: the tool tags (ids 9/10 of a tool
    call) kept, the other control tokens (<_end>, ...) dropped. `skip_special_tokens` would drop both."""
    from transformers import TextIteratorStreamer

    class AnswerStreamer(TextIteratorStreamer):
        def put(self, value):
            if self.skip_prompt and self.next_tokens_are_prompt:
                return super().put(value)
            return super().put(torch.tensor(visible_ids(value.reshape(-1).tolist()), dtype=torch.long))

    return AnswerStreamer(tokenizer, skip_prompt=True, skip_special_tokens=False)


def generation_kwargs(generation: dict) -> dict:
    temperature = float(generation.get("temperature", 0.7))
    do_sample = bool(generation.get("do_sample", True)) and temperature > 0
    kwargs = {
        "max_new_tokens": int(generation.get("max_new_tokens", 512)),
        "do_sample": do_sample,
        "repetition_penalty": float(generation.get("repetition_penalty", 1.0)),
    }
    if do_sample:
        kwargs.update(
            temperature=temperature, top_p=float(generation.get("top_p", 1.0)), top_k=int(generation.get("top_k", 50))
        )
    return kwargs


class VLLMEngine:
    """vLLM offline engine; adapters through vLLM's LoRA support (no merge)."""

    def __init__(
        self,
        base: Path,
        adapters: list[Path],
        max_model_len: int | None = None,
        gpu_memory_utilization: float = 0.9,
        tensor_parallel_size: int = 1,
        max_lora_rank: int = 64,
        dtype: str = "auto",
    ):
        if len(adapters) > 1:
            raise ValueError("infer_backend=vllm serves one adapter; merge the others first (merge.py)")
        if adapters:  # converted to the module layout vLLM's TeleChat2 serves (refused up front if it cannot)
            import tempfile

            from telechat_lab.vllm_adapter import convert_adapter

            self._converted = tempfile.TemporaryDirectory(prefix="telechat-lab-vllm-lora-")
            adapters = [convert_adapter(adapters[0], base, Path(self._converted.name))]
        try:
            from vllm import LLM
        except ImportError as err:
            raise ImportError(
                "infer_backend=vllm needs vLLM: install the `vllm` extra "
                "(pip install 'telechat-lab[vllm]') on a CUDA machine"
            ) from err
        from telechat_lab.tokenizer import load_tokenizer

        config = json.loads((base / "config.json").read_text())
        self.max_length = max_model_len or config.get("training_seqlen", 8192)
        self.llm = LLM(
            model=str(base),
            trust_remote_code=True,
            tokenizer=str(base),
            max_model_len=self.max_length,
            gpu_memory_utilization=gpu_memory_utilization,
            tensor_parallel_size=tensor_parallel_size,
            enable_lora=bool(adapters),
            max_lora_rank=max_lora_rank,
            dtype=dtype,
        )
        self.adapters = adapters
        self.tokenizer = load_tokenizer(base)

    def stream(self, prompt_ids: list[int], generation: dict) -> Iterator[str]:
        (ids,) = self.generate_ids([prompt_ids], generation)
        # decoded here, not by vLLM (which drops every special token): the tool tags must reach the user
        yield self.tokenizer.decode(visible_ids(ids))

    def generate_ids(self, prompts: list[list[int]], generation: dict) -> list[list[int]]:
        """The generated token ids of each prompt: one generate call for them all (vLLM batches it itself)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.lora.request import LoRARequest

        kw = generation_kwargs(generation)
        params = SamplingParams(
            max_tokens=kw["max_new_tokens"],
            temperature=kw.get("temperature", 0.0),
            top_p=kw.get("top_p", 1.0),
            top_k=kw.get("top_k", -1),
            repetition_penalty=kw["repetition_penalty"],
            stop_token_ids=[EOS_ID],
        )
        lora = LoRARequest("adapter", 1, str(self.adapters[0])) if self.adapters else None
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, lora_request=lora)
        return [list(out.outputs[0].token_ids) for out in outs]
