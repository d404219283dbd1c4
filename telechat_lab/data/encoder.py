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

import numpy as np

from telechat_lab.tokenizer import (
    BOT_ID,
    DEFAULT_SYSTEM_PROMPT,
    EOS_ID,
    IGNORE_INDEX,
    SYSTEM_ID,
    USER_ID,
    find_model_file,
    format_tools,
    may_hold_tool_tags,
    split_tool_tags,
)

from .formats import Conversation, Prompted

SYSTEM, USER, BOT, END, IGNORE = SYSTEM_ID, USER_ID, BOT_ID, EOS_ID, IGNORE_INDEX
TEMPLATE_VERSION = "telechat2-v3"  # part of the cache key: bump when the encoding changes
SYSTEM_MEMO_SIZE = 4096  # distinct system prompts whose ids are remembered (datasets repeat a few)
_EMPTY = np.zeros(0, dtype=np.int32)
_ID_ARRAYS: dict[int, np.ndarray] = {}  # a control id as a one-token array (shared, never written to)


def _id_array(token: int) -> np.ndarray:
    arr = _ID_ARRAYS.get(token)
    if arr is None:
        arr = _ID_ARRAYS[token] = np.array([token], dtype=np.int32)
        arr.flags.writeable = False
    return arr


def _head(parts: list[np.ndarray], n: int) -> list[np.ndarray]:
    """The parts holding the first `n` tokens of `parts`."""
    out = []
    for part in parts:
        if n <= 0:
            break
        out.append(part[:n])
        n -= len(part)
    return out


def _joined(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts) if parts else _EMPTY


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
class EncodedBatch:
    """Conversations encoded one after another: example k is the next lengths[k] tokens/labels and comes from
    conversation `kept[k]` of the batch (the others had nothing to train)."""

    tokens: np.ndarray  # int32
    labels: np.ndarray  # int32, IGNORE where untrained
    lengths: np.ndarray  # int64, per example
    kept: list[int]
    truncated: list[bool]  # per example: cut to cutoff_len

    def examples(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """(input_ids, labels) of each example, views of the flat arrays."""
        ends = np.cumsum(self.lengths).tolist()
        return [(self.tokens[e - n : e], self.labels[e - n : e]) for e, n in zip(ends, self.lengths.tolist())]


@dataclass
class EncodedReplies:
    """A prompt and its replies: `rows[k]` = (input_ids, labels) of the prompt followed by reply k."""

    rows: list[tuple[np.ndarray, np.ndarray]]
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
    file or a directory holding one). `encode_arrays` hands every distinct text segment of a batch
    to SentencePiece in one call (on `num_threads` threads), which returns each as an int32 array, and
    assembles the examples from references to those arrays: each token is copied once, into the batch's
    flat arrays, and no Python int is made per token."""

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
        self._newline = np.asarray(self.newline, dtype=np.int32)
        self._system_memo: dict[str, np.ndarray] = {}  # system prompts repeat across a dataset

    def _pieces(self, texts: list[str]) -> list[np.ndarray]:
        if not texts:
            return []
        return self.sp.encode(texts, num_threads=self.num_threads, return_type="numpy")

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
            ids = np.array([SYSTEM, *self.encode_text(system + "\n")], dtype=np.int32)
            if len(self._system_memo) < SYSTEM_MEMO_SIZE:
                self._system_memo[system] = ids
        return ids.tolist()

    def encode(self, conv: Conversation) -> Encoded | None:
        """None when nothing would be trained (no reply, or no room for any reply token)."""
        return self.encode_batch([conv])[0]

    def _encode_turns(self, convs: list[Conversation]) -> list[tuple[np.ndarray, list[tuple]]]:
        """(system block, [(<_user> text <_bot> parts, their length, reply <_end> parts, their length)]) of each
        conversation: the parts are arrays of ids, shared (never written to)."""
        slots: dict[str, int] = {}  # distinct text segment -> position in the SentencePiece batch

        def plan(text: str) -> list[int]:
            # a text as its segments: a tool tag by its id (>= 0), a text segment by ~slot (< 0)
            if not may_hold_tool_tags(text):  # one segment (most texts): no call to split them, no list of parts
                return [~slots.setdefault(text, len(slots))] if text else []
            return [
                part if isinstance(part, int) else ~slots.setdefault(part, len(slots)) for part in split_tool_tags(text)
            ]

        plans = []
        for conv in convs:
            system = self.system_text(conv)
            prefix = self._system_memo.get(system) if system else _EMPTY
            sys_plan = plan(system + "\n") if prefix is None else None
            plans.append((system, prefix, sys_plan, [(plan(u), plan(a)) for u, a in conv.turns]))
        pieces = self._pieces(list(slots))
        sizes = [len(p) for p in pieces]
        user, bot, end = _id_array(USER), _id_array(BOT), _id_array(END)

        def parts(plan: list[int]) -> tuple[list[np.ndarray], int]:
            if len(plan) == 1 and plan[0] < 0:  # one text segment (most texts)
                return [pieces[~plan[0]]], sizes[~plan[0]]
            out, n = [], 0
            for part in plan:
                if part < 0:
                    out.append(pieces[~part])
                    n += sizes[~part]
                else:
                    out.append(_id_array(part))
                    n += 1
            return out, n

        results = []
        for system, prefix, sys_plan, turn_plans in plans:
            if sys_plan is not None:
                prefix = np.concatenate([_id_array(SYSTEM), *parts(sys_plan)[0]])
                prefix.flags.writeable = False
                if len(self._system_memo) < SYSTEM_MEMO_SIZE:
                    self._system_memo[system] = prefix
            turns = []
            for u, a in turn_plans:
                u_parts, u_len = parts(u)
                a_parts, a_len = parts(a)
                turns.append(([user, *u_parts, bot], u_len + 2, [*a_parts, end], a_len + 1))
            results.append((prefix, turns))
        return results

    def encode_arrays(self, convs: list[Conversation]) -> EncodedBatch:
        """The conversations encoded into flat arrays (the module docstring: the format, truncation, what is
        trained)."""
        parts: list[np.ndarray] = []
        trained: list[bool] = []  # per part
        lengths, kept, truncated = [], [], []
        for k, (prefix, turns) in enumerate(self._encode_turns(convs)):
            example = self._assemble(prefix, turns, parts, trained)
            if example is None:
                continue
            lengths.append(example[0])
            kept.append(k)
            truncated.append(example[1])
        tokens = _joined(parts)
        mask = np.repeat(np.asarray(trained, dtype=bool), [len(p) for p in parts])
        labels = np.where(mask, tokens, np.int32(IGNORE)).astype(np.int32, copy=False)
        return EncodedBatch(tokens, labels, np.asarray(lengths, dtype=np.int64), kept, truncated)

    def encode_batch(self, convs: list[Conversation]) -> list[Encoded | None]:
        """`encode_arrays` as one Encoded (lists of ids) per conversation, None where nothing is trained."""
        batch = self.encode_arrays(convs)
        out: list[Encoded | None] = [None] * len(convs)
        for k, (ids, labels), cut in zip(batch.kept, batch.examples(), batch.truncated):
            out[k] = Encoded(ids.tolist(), labels.tolist(), cut)
        return out

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
            history = [(_joined(p), _joined(r)) for p, _, r, _ in turns[:-n]]
            query = _joined(turns[-1][0])
            results.append(self._assemble_replies(prefix, history, query, [_joined(r) for _, _, r, _ in turns[-n:]]))
        return results

    def _assemble_replies(
        self, prefix: np.ndarray, history: list[tuple[np.ndarray, np.ndarray]], query: np.ndarray, replies: list
    ) -> EncodedReplies | None:
        cutoff, nl = self.options.cutoff_len, len(self._newline)
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
        prompt = np.concatenate([prefix, *(x for p, r in history[drop:] for x in (p, r, self._newline)), query])
        room = cutoff - len(prompt)
        ignored = np.full(len(prompt), IGNORE, dtype=np.int32)
        rows = [(np.concatenate([prompt, r[:room]]), np.concatenate([ignored, r[:room]])) for r in replies]
        return EncodedReplies(rows, len(prompt), truncated)

    def encode_texts(self, texts: list[str]) -> list[tuple[list[np.ndarray], bool]]:
        """Each raw-text document as its rows of at most cutoff_len tokens (the module docstring), and whether
        it was split."""
        cutoff, out = self.options.cutoff_len, []
        plain = [i for i, text in enumerate(texts) if split_tool_tags(text) == [text]]  # one SentencePiece batch
        pieces = dict(zip(plain, self._pieces([texts[i] for i in plain])))
        end = _id_array(END)
        for i, text in enumerate(texts):
            body = pieces[i] if i in pieces else np.asarray(self.encode_text(text), dtype=np.int32)
            ids = np.concatenate([body, end])
            if len(ids) <= cutoff:
                out.append(([ids], False))
                continue
            step = cutoff - 1  # each row starts on the last token of the row before
            rows = [ids[start : start + cutoff] for start in range(0, len(ids) - 1, step)]
            out.append((rows, True))
        return out

    def _assemble(
        self, prefix: np.ndarray, turns: list[tuple], parts: list[np.ndarray], trained: list[bool]
    ) -> tuple[int, bool] | None:
        """Appends one example's parts and whether each is trained to `parts` and `trained`; returns (its
        length, whether it was truncated), or None (nothing appended) when nothing would be trained."""
        opts = self.options
        if not turns:
            return None
        last = len(turns) - 1
        nl = len(self._newline)
        keep: list[int] | range = range(len(turns))
        truncated = False
        cut_reply: int | None = None
        total = len(prefix) + sum(p_len + r_len for _, p_len, _, r_len in turns) + nl * last
        if total > opts.cutoff_len:
            truncated = True
            budget = opts.cutoff_len - len(prefix)
            order = range(last, -1, -1) if opts.mask_history else range(len(turns))
            keep, used = [], 0
            for i in order:
                size = turns[i][1] + turns[i][3] + (nl if keep else 0)
                if used + size > budget:
                    break
                keep.append(i)
                used += size
            if not keep:  # not even one whole turn: keep the first one with its reply cut
                first = order[0]
                room = budget - turns[first][1]
                if room < 1:
                    return None
                keep, cut_reply = [first], room
            keep.sort()
            total = len(prefix) + used if cut_reply is None else opts.cutoff_len

        on_prompt = opts.train_on_prompt
        parts.append(prefix)
        trained.append(on_prompt)
        for n, i in enumerate(keep):
            prompt, p_len, reply, _ = turns[i]
            if cut_reply is not None:
                reply = _head(reply, cut_reply)
            if n:
                parts.append(self._newline)
                trained.append(on_prompt)
            # a reply is trained unless mask_history keeps only the record's last one
            reply_trained = on_prompt or not opts.mask_history or i == last
            parts += prompt
            if on_prompt:
                trained += [True] * len(prompt)
            elif opts.train_role_tokens and reply_trained:  # text never encodes to <_user>/<_bot>: the markers
                trained += [True, *([False] * (len(prompt) - 2)), True]
            else:
                trained += [False] * len(prompt)
            parts += reply
            trained += [reply_trained] * len(reply)
        # every kept reply has at least one token, so something is trained unless mask_history
        # lost the last reply (it never does: truncation keeps the last turn first)
        return total, truncated

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
