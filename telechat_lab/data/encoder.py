"""Conversation -> `input_ids` / `labels` in the TeleChat2 chat format (SPEC.md sections 4-5).

    <_system>S\\n<_user>u1<_bot>a1<_end>\\n<_user>u2<_bot>a2<_end>

Control tokens are placed by id; every text segment between them is encoded on its own with
SentencePiece (so each gets its dummy-prefix "▁"), exactly like the tokenizer's chat template but
without rendering and re-splitting a string: text in a record that looks like a control token stays
text, except the four tool tags (`<tool_call>` ... `</tool_response>`), which are the control ids 9-12
wherever they stand (SPEC section 4). Each reply and its `<_end>` are trained; `mask_history` trains
only the last reply, `train_on_prompt` trains everything, `train_role_tokens` also trains the `<_user>`
and `<_bot>` of each trained turn (the release's own SFT script).

Truncation to `cutoff_len` keeps whole turns where it can (the first ones, or with `mask_history`
the last ones), else cuts the reply of the one turn kept; a prompt is never kept without at least
one token of its reply: such an example is dropped and counted.

Prompt and replies (`encode_prompted_batch`: the chosen and rejected replies of a preference pair, the completion
of a KTO example): the prompt (system, tools, the earlier turns and the last user message up to its `<_bot>`) is
encoded once, then each reply with its `<_end>`; each sequence is exactly what the conversation ending in that
reply encodes to above. Only the replies are trained (train_on_prompt, mask_history and train_role_tokens are SFT
options: the earlier replies and every role token stay untrained). Truncation, when the prompt and the longest
reply exceed `cutoff_len`, treats the replies together, LLaMA-Factory's budget split (infer_seqlen) with the
prompt cut by whole turns:
1. the prompt's budget is `infer_seqlen(prompt, longest reply, cutoff_len)`: a longest reply under half of
   cutoff_len keeps all of it (the prompt gets the rest); else a prompt under half keeps all of it; else the two
   share cutoff_len in proportion to their lengths;
2. the prompt's earlier turns are dropped, oldest first, until it fits its budget (or none is left): the system
   block and the last turn (the user message the replies answer) are always kept;
3. every reply is cut from its end to what is left (cutoff_len minus the prompt kept: the room step 2 freed goes
   to the replies); a prompt that leaves no room for one reply token drops the example (counted).

Raw text (`encode_texts`, stage pt): each document is its text (as one segment, no chat template) and `<_end>`,
every token trained; a document longer than cutoff_len is split into rows of cutoff_len tokens, each row
starting on the last token of the row before (which predicts nothing there), so that every token of the document
but its first is predicted exactly once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from telechat_lab.tokenizer import (
    BOT_ID,
    DEFAULT_SYSTEM_PROMPT,
    EOS_ID,
    IGNORE_INDEX,
    SYSTEM_ID,
    USER_ID,
    find_model_file,
    format_tools,
    split_tool_tags,
)

from .formats import Conversation, Prompted

SYSTEM, USER, BOT, END, IGNORE = SYSTEM_ID, USER_ID, BOT_ID, EOS_ID, IGNORE_INDEX
TEMPLATE_VERSION = "telechat2-v3"  # part of the cache key: bump when the encoding changes
SYSTEM_MEMO_SIZE = 4096  # distinct system prompts whose ids are remembered (datasets repeat a few)


@dataclass(frozen=True)
class TemplateOptions:
    cutoff_len: int = 1024
    train_on_prompt: bool = False
    mask_history: bool = False
    default_system: str | None = DEFAULT_SYSTEM_PROMPT  # None: TeleChat's default; "": no system block
    train_role_tokens: bool = False  # also train each trained turn's <_user> and <_bot>


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False


@dataclass
class EncodedReplies:
    """A prompt and its replies: `rows[k]` = (input_ids, labels) of the prompt followed by reply k."""

    rows: list[tuple[list[int], list[int]]]
    prompt_len: int
    truncated: bool = False


def infer_seqlen(source_len: int, target_len: int, cutoff_len: int) -> tuple[int, int]:
    """(source, target) budgets of a prompt of `source_len` tokens and a reply of `target_len` within
    `cutoff_len`: the reply whole when it is under half; else the prompt whole when it is under half; else both
    in proportion to their lengths (LLaMA-Factory's rule)."""
    if target_len * 2 < cutoff_len:
        max_target = cutoff_len
    elif source_len * 2 < cutoff_len:
        max_target = cutoff_len - source_len
    else:
        max_target = int(cutoff_len * (target_len / (source_len + target_len)))
    target = min(max_target, target_len)
    return min(max(cutoff_len - target, 0), source_len), target


class ChatEncoder:
    """Encodes conversations with the SentencePiece model at `tokenizer_path` (a tokenizer.model
    file or a directory holding one). `encode_batch` hands every distinct text segment of a batch
    to SentencePiece in one call (on `num_threads` threads) and assembles the examples from them."""

    def __init__(self, tokenizer_path: str | Path, options: TemplateOptions = TemplateOptions(), num_threads: int = 1):
        import sentencepiece as spm

        model_file = find_model_file(tokenizer_path)
        if model_file is None:
            raise FileNotFoundError(f"no tokenizer.model at {tokenizer_path}")
        self.model_file = model_file
        self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        self.options = options
        self.num_threads = max(1, num_threads)
        self.default_system = DEFAULT_SYSTEM_PROMPT if options.default_system is None else options.default_system
        self.newline = self.sp.encode("\n")
        self._system_memo: dict[str, list[int]] = {}  # system prompts repeat across a dataset

    def encode_text(self, text: str) -> list[int]:
        """`text` as one segment: SentencePiece's ids, with the tool tags as their control ids."""
        ids: list[int] = []
        for part in split_tool_tags(text):
            if isinstance(part, int):
                ids.append(part)
            else:
                ids += self.sp.encode(part)
        return ids

    def system_text(self, conv: Conversation) -> str:
        """The system prompt as rendered: record's or default, tools appended; "" for no block."""
        system = conv.system or self.default_system
        return system + format_tools(conv.tools) if conv.tools else system

    def system_ids(self, conv: Conversation) -> list[int]:
        system = self.system_text(conv)
        if not system:
            return []
        ids = self._system_memo.get(system)
        if ids is None:
            ids = [SYSTEM, *self.encode_text(system + "\n")]
            if len(self._system_memo) < SYSTEM_MEMO_SIZE:
                self._system_memo[system] = ids
        return ids

    def encode(self, conv: Conversation) -> Encoded | None:
        """None when nothing would be trained (no reply, or no room for any reply token)."""
        return self.encode_batch([conv])[0]

    def _encode_turns(self, convs: list[Conversation]) -> list[tuple[list[int], list[tuple[list[int], list[int]]]]]:
        """(system block, [(<_user> text <_bot>, reply <_end>)]) of each conversation."""
        slots: dict[str, int] = {}  # distinct text segment -> position in the SentencePiece batch

        def plan(text: str) -> list[int]:
            # a text as its segments: a tool tag by its id (>= 0), a text segment by ~slot (< 0)
            return [
                part if isinstance(part, int) else ~slots.setdefault(part, len(slots)) for part in split_tool_tags(text)
            ]

        plans = []
        for conv in convs:
            system = self.system_text(conv)
            prefix = self._system_memo.get(system) if system else []
            sys_plan = plan(system + "\n") if prefix is None else None
            plans.append((system, prefix, sys_plan, [(plan(u), plan(a)) for u, a in conv.turns]))
        texts = list(slots)
        if self.num_threads > 1:  # SentencePiece's own thread pool
            pieces = self.sp.encode(texts, num_threads=self.num_threads) if texts else []
        else:  # a plain loop is faster than the batch call on one thread
            encode = self.sp.encode
            pieces = [encode(t) for t in texts]

        def ids(parts: list[int]) -> list[int]:
            if len(parts) == 1 and parts[0] < 0:
                return pieces[~parts[0]]
            out: list[int] = []
            for part in parts:
                if part >= 0:
                    out.append(part)
                else:
                    out += pieces[~part]
            return out

        results = []
        for system, prefix, sys_plan, turn_plans in plans:
            if sys_plan is not None:
                prefix = [SYSTEM, *ids(sys_plan)]
                if len(self._system_memo) < SYSTEM_MEMO_SIZE:
                    self._system_memo[system] = prefix
            results.append((prefix, [([USER, *ids(u), BOT], [*ids(a), END]) for u, a in turn_plans]))
        return results

    def encode_batch(self, convs: list[Conversation]) -> list[Encoded | None]:
        return [self._assemble(prefix, turns) for prefix, turns in self._encode_turns(convs)]

    def encode_prompted_batch(self, items: list[Prompted]) -> list[EncodedReplies | None]:
        """Each prompt once, then each of its replies (the module docstring: the sequences, the truncation
        rule); None where the prompt leaves no room for a reply token within cutoff_len."""
        convs = [
            Conversation(it.conv.system, [*it.conv.turns, *((it.query, r) for r in it.replies)], it.conv.tools)
            for it in items
        ]
        results = []
        for it, (prefix, turns) in zip(items, self._encode_turns(convs)):
            n = len(it.replies)
            history, query = turns[:-n], turns[-1][0]
            results.append(self._assemble_replies(prefix, history, query, [reply for _, reply in turns[-n:]]))
        return results

    def _assemble_replies(
        self, prefix: list[int], history: list[tuple[list[int], list[int]]], query: list[int], replies: list[list[int]]
    ) -> EncodedReplies | None:
        cutoff, nl = self.options.cutoff_len, len(self.newline)
        sizes = [len(p) + len(r) + nl for p, r in history]  # a turn and the newline after it
        longest = max(len(r) for r in replies)
        prompt_len = len(prefix) + sum(sizes) + len(query)
        drop, truncated = 0, prompt_len + longest > cutoff
        if truncated:
            budget, _ = infer_seqlen(prompt_len, longest, cutoff)
            while prompt_len > budget and drop < len(history):
                prompt_len -= sizes[drop]
                drop += 1
            if prompt_len >= cutoff:  # not one reply token fits
                return None
        prompt = list(prefix)
        for p, r in history[drop:]:
            prompt += p + r + self.newline
        prompt += query
        room = cutoff - len(prompt)
        rows = [(prompt + r[:room], [IGNORE] * len(prompt) + r[:room]) for r in replies]
        return EncodedReplies(rows, len(prompt), truncated)

    def encode_texts(self, texts: list[str]) -> list[tuple[list[list[int]], bool]]:
        """Each raw-text document as its rows of at most cutoff_len tokens (the module docstring), and whether
        it was split."""
        cutoff, out = self.options.cutoff_len, []
        plain = [i for i, text in enumerate(texts) if split_tool_tags(text) == [text]]  # one SentencePiece batch
        pieces = dict(zip(plain, self.sp.encode([texts[i] for i in plain], num_threads=self.num_threads)))
        for i, text in enumerate(texts):
            ids = [*(pieces[i] if i in pieces else self.encode_text(text)), END]
            if len(ids) <= cutoff:
                out.append(([ids], False))
                continue
            step = cutoff - 1  # each row starts on the last token of the row before
            rows = [ids[start : start + cutoff] for start in range(0, len(ids) - 1, step)]
            out.append((rows, True))
        return out

    def _assemble(self, prefix: list[int], turns: list[tuple[list[int], list[int]]]) -> Encoded | None:
        opts = self.options
        if not turns:
            return None
        last = len(turns) - 1
        keep = list(range(len(turns)))
        truncated = False
        cut_reply: int | None = None
        total = len(prefix) + sum(len(p) + len(r) for p, r in turns) + len(self.newline) * last
        if total > opts.cutoff_len:
            truncated = True
            budget = opts.cutoff_len - len(prefix)
            order = range(last, -1, -1) if opts.mask_history else range(len(turns))
            keep, used = [], 0
            for i in order:
                size = len(turns[i][0]) + len(turns[i][1]) + (len(self.newline) if keep else 0)
                if used + size > budget:
                    break
                keep.append(i)
                used += size
            if not keep:  # not even one whole turn: keep the first one with its reply cut
                first = order[0]
                room = budget - len(turns[first][0])
                if room < 1:
                    return None
                keep, cut_reply = [first], room
            keep.sort()

        input_ids = list(prefix)
        labels = list(prefix) if opts.train_on_prompt else [IGNORE] * len(prefix)
        for n, i in enumerate(keep):
            prompt, reply = turns[i]
            if cut_reply is not None:
                reply = reply[:cut_reply]
            if n:
                prompt = self.newline + prompt
            input_ids += prompt
            input_ids += reply
            # a reply is trained unless mask_history keeps only the record's last one
            trained = opts.train_on_prompt or not opts.mask_history or i == last
            if opts.train_on_prompt:
                labels += prompt
            elif opts.train_role_tokens and trained:  # text never encodes to <_user>/<_bot>: only the markers
                labels += [t if t in (USER, BOT) else IGNORE for t in prompt]
            else:
                labels += [IGNORE] * len(prompt)
            labels += reply if trained else [IGNORE] * len(reply)
        # every kept reply has at least one token, so something is trained unless mask_history
        # lost the last reply (it never does: truncation keeps the last turn first)
        return Encoded(input_ids, labels, truncated)

    def prompt_ids(self, conv: Conversation) -> list[int]:
        """The generation prompt for `conv`'s turns plus a final user message: everything up to and
        including the last `<_bot>` (what chat sends the model)."""
        ids = self.system_ids(conv)
        for n, (u, a) in enumerate(conv.turns):
            if n:
                ids = ids + self.newline
            ids = ids + [USER, *self.encode_text(u), BOT]
            if a is not None:
                ids = ids + [*self.encode_text(a), END]
        return ids
