"""Chat's answers survive interruptions: batch mode appends each answer, continues where it stopped and stops
cleanly on SIGINT / SIGTERM; the terminal loop stops an answer on Ctrl+C and goes on, with line editing and
history (driven through a pty)."""

import io
import os
import pty
import re
import select
import signal
import subprocess
import sys
import threading
import time
from contextlib import suppress

import pytest
import torch
from helpers import REPO

from telechat_lab.chat.batch import batch
from telechat_lab.chat.session import ChatSession
from telechat_lab.errors import ConfigError, Interrupted

PROMPTS = "".join(f"question {n}\n" for n in range(1, 6))


class Numbered:
    """An engine whose answer names the prompt's length; `hook(n)` runs while the n-th answer (1-based) streams."""

    max_length = 256

    def __init__(self, hook=None):
        self.calls, self.hook = 0, hook

    def stream(self, prompt_ids, generation):
        self.calls += 1
        yield f"{len(prompt_ids)} tokens"
        if self.hook:
            self.hook(self.calls)
        yield " ."


@pytest.fixture
def files(tmp_path):
    source = tmp_path / "prompts.txt"
    source.write_text(PROMPTS)
    return source, tmp_path / "answers.jsonl"


def uninterrupted(tiny_dir, source, tmp_path) -> bytes:
    batch(ChatSession(Numbered(), tiny_dir), str(source), str(tmp_path / "whole.jsonl"))
    return (tmp_path / "whole.jsonl").read_bytes()


def test_a_rerun_continues_after_the_last_whole_answer_and_drops_a_half_written_line(tiny_dir, files, tmp_path, capsys):
    source, output = files
    whole = uninterrupted(tiny_dir, source, tmp_path)
    lines = whole.splitlines(keepends=True)
    output.write_bytes(b"".join(lines[:2]) + lines[2][:17])  # killed while writing the third answer
    engine = Numbered()
    assert batch(ChatSession(engine, tiny_dir), str(source), str(output)) == 5
    assert engine.calls == 3 and output.read_bytes() == whole
    assert f"resuming: 2 of 5 answered in {output}" in capsys.readouterr().err


def test_progress_is_one_line_per_answer_when_piped(tiny_dir, files, capsys):
    source, output = files
    batch(ChatSession(Numbered(), tiny_dir), str(source), str(output))
    done = f"the answers to all 5 prompts of {source} are in {output}\n"  # where they are, said at the end
    assert capsys.readouterr().err == "".join(f"answered {n}/5\n" for n in range(1, 6)) + done


def test_prompts_from_stdin_are_said_to_come_from_stdin(tiny_dir, files, capsys):
    _, output = files
    batch(ChatSession(Numbered(), tiny_dir), "-", str(output), stdin=io.StringIO(PROMPTS))
    assert capsys.readouterr().err.endswith(f"the answers to all 5 prompts of stdin are in {output}\n")


def test_progress_is_a_bar_on_a_terminal(tiny_dir, files, monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    screen = Terminal()
    monkeypatch.setattr(sys, "stderr", screen)
    source, output = files
    batch(ChatSession(Numbered(), tiny_dir), str(source), str(output))
    assert "5/5" in screen.getvalue() and "answered 1/5\n" not in screen.getvalue()
    assert "\x1b[" in screen.getvalue()  # drawn in place


@pytest.mark.parametrize(
    "existing, why",
    [
        ("changed", "its line 2 answers another prompt than {source} line 2"),
        ("longer", "it holds more answers than the 5 prompts of {source}"),
        ("not_ours", "its line 1 is not an answer written by chat"),
        ("not_ours_unterminated", "its line 1 is not an answer written by chat"),
    ],
)
def test_an_output_of_another_input_is_refused_and_kept(tiny_dir, files, tmp_path, existing, why):
    source, output = files
    whole = uninterrupted(tiny_dir, source, tmp_path)
    text = {
        "changed": whole.replace(b"question 2", b"question two"),
        "longer": whole + whole.splitlines(keepends=True)[0],
        "not_ours": b"my notes\n",
        "not_ours_unterminated": b"my notes",
    }[existing]
    output.write_bytes(text)
    engine = Numbered()
    with pytest.raises(ConfigError, match=re.escape("exists: add overwrite=true to replace it, or choose another")):
        batch(ChatSession(engine, tiny_dir), str(source), str(output))
    with pytest.raises(ConfigError, match=re.escape(why.format(source=source))):
        batch(ChatSession(engine, tiny_dir), str(source), str(output))
    assert output.read_bytes() == text and engine.calls == 0
    assert batch(ChatSession(engine, tiny_dir), str(source), str(output), overwrite=True) == 5
    assert output.read_bytes() == whole


def test_resume_false_refuses_a_partial_output(tiny_dir, files, tmp_path):
    source, output = files
    output.write_bytes(uninterrupted(tiny_dir, source, tmp_path).splitlines(keepends=True)[0])
    with pytest.raises(ConfigError, match=r"exists: add overwrite=true .*\(resume=false\)"):
        batch(ChatSession(Numbered(), tiny_dir), str(source), str(output), resume=False)


def send_signal_while_answering(answer: int, *signums: int):
    def hook(n):
        if n == answer:
            for signum in signums:
                os.kill(os.getpid(), signum)

    return hook


@pytest.mark.parametrize(
    "signums, kept, code, how",
    [
        ((signal.SIGTERM,), 3, 143, "SIGTERM: stopped;"),
        ((signal.SIGINT,), 3, 130, "SIGINT: stopped;"),
        ((signal.SIGINT, signal.SIGINT), 2, 130, "SIGINT: stopped at once;"),
    ],
)
def test_a_signal_stops_the_batch_with_the_answers_so_far_and_the_rerun_finishes(
    tiny_dir, files, tmp_path, capsys, signums, kept, code, how
):
    source, output = files
    whole = uninterrupted(tiny_dir, source, tmp_path)
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    session = ChatSession(Numbered(send_signal_while_answering(3, *signums)), tiny_dir)
    with pytest.raises(Interrupted) as stopped:
        batch(session, str(source), str(output))
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers  # put back
    assert stopped.value.exit_code == code
    assert str(stopped.value) == (
        f"{how} {kept} of 5 answers kept in {output}: run the same command again to answer the rest"
    )
    assert output.read_bytes() == b"".join(whole.splitlines(keepends=True)[:kept])
    capsys.readouterr()
    engine = Numbered()
    batch(ChatSession(engine, tiny_dir), str(source), str(output))
    assert engine.calls == 5 - kept and output.read_bytes() == whole


def test_a_complete_output_is_said_complete_before_the_model_loads(tiny_dir, files, tmp_path, capsys, monkeypatch):
    import telechat_lab.chat as chat
    from telechat_lab.config import ChatConfig

    source, output = files
    output.write_bytes(uninterrupted(tiny_dir, source, tmp_path))
    monkeypatch.setattr(chat, "make_session", lambda settings: pytest.fail("the model was loaded"))
    capsys.readouterr()
    chat.run_chat(ChatConfig(input=str(source), output=str(output)))
    assert "already holds the answers to all 5 prompts" in capsys.readouterr().err


def test_ctrl_c_while_the_model_loads_ends_with_130_and_a_message(tiny_dir, monkeypatch):
    import telechat_lab.chat as chat
    from telechat_lab.config import ChatConfig

    def interrupted(settings):
        raise KeyboardInterrupt

    monkeypatch.setattr(chat, "make_session", interrupted)
    with pytest.raises(Interrupted, match="interrupted") as stopped:
        chat.run_chat(ChatConfig())
    assert stopped.value.exit_code == 130


def ctrl_c(n):
    raise KeyboardInterrupt


def test_a_stopped_answer_is_kept_in_the_conversation(tiny_dir):
    session = ChatSession(Numbered(hook=ctrl_c), tiny_dir)
    pieces = []
    with pytest.raises(KeyboardInterrupt):
        for piece in session.reply("Hi"):
            pieces.append(piece)
    assert session.turns == [("Hi", pieces[0])]
    replies = session.reply("again")
    next(replies)
    replies.close()  # the caller stops reading
    assert session.turns[1][0] == "again" and len(session.turns) == 2


class CtrlCAtThePrompt:
    """Input where Ctrl+C is pressed at the prompt at the given reads (1-based), and 'hello' typed otherwise."""

    def __init__(self, interrupted_reads):
        self.reads, self.interrupted = 0, interrupted_reads

    def readline(self):
        self.reads += 1
        if self.reads in self.interrupted:
            raise KeyboardInterrupt
        return "hello\n" if self.reads < 6 else ""


def test_ctrl_c_at_the_prompt_gives_a_new_prompt_and_twice_in_a_second_quits(tiny_dir):
    from telechat_lab.chat.session import interactive

    out = io.StringIO()
    interactive(ChatSession(Numbered(), tiny_dir), CtrlCAtThePrompt({1, 3}), out)
    assert out.getvalue().count("Ctrl+C again quits") == 2 and out.getvalue().count("Assistant: ") == 3
    out = io.StringIO()
    interactive(ChatSession(Numbered(), tiny_dir), CtrlCAtThePrompt({2, 3}), out)
    assert out.getvalue().count("Assistant: ") == 1 and out.getvalue().endswith("Quit (Ctrl+C twice).\n")


# ------------------------------------------------------------------------ the transformers engine


@pytest.fixture(scope="module")
def endless_dir(tmp_path_factory):
    """The tiny model with a long context whose greedy answer never ends (<_end> can never win)."""
    from telechat_lab.model import Telechat2ForCausalLM
    from telechat_lab.tiny import write_tiny_checkpoint
    from telechat_lab.tokenizer import EOS_ID, load_tokenizer, save_tokenizer

    source = write_tiny_checkpoint(tmp_path_factory.mktemp("long"), hidden_size=64, training_seqlen=4096)
    model = Telechat2ForCausalLM.from_pretrained(source)
    with torch.no_grad():
        model.lm_head.weight[EOS_ID] = 0.0  # its logit 0: below the best of all the others
    out = tmp_path_factory.mktemp("endless")
    model.save_pretrained(out)
    save_tokenizer(load_tokenizer(source), out)
    return out


@pytest.fixture
def one_thread():
    """torch on one thread: on a shared CPU, more threads than free cores make each token 100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # the same for the processes the tests start


def generation_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if "_generate" in thread.name]


def test_ctrl_c_or_closing_stops_generation_and_joins_its_thread(endless_dir, one_thread):
    from telechat_lab.chat.engines import HuggingFaceEngine

    engine = HuggingFaceEngine(endless_dir, [], dtype="float32", device="cpu")
    options = {"max_new_tokens": 4000, "do_sample": False}
    before = set(generation_threads())
    stream = engine.stream([4, 100, 5], options)
    start = time.monotonic()
    next(stream)
    stream.close()
    assert not set(generation_threads()) - before

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.3)
        with pytest.raises(KeyboardInterrupt):
            for _ in engine.stream([4, 100, 5], options):
                pass
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert not set(generation_threads()) - before  # joined before the interrupt went on
    assert time.monotonic() - start < 10  # stopped, not the 4000 tokens


# ------------------------------------------------------------------------ the terminal, through a pty


class Terminal:
    """chat.py on a pseudo-terminal; every wait is bounded."""

    # The child makes the pty its controlling terminal (so Ctrl+C typed there is a SIGINT) and then becomes chat.py.
    # It is started by subprocess, never by forking this process: a fork of the test process (its threads holding
    # locks) can hang in the child before it runs anything.
    # Like a shell, it starts chat.py with no signal blocked and SIGINT at its default: both are inherited through
    # exec, and this test process's (after hundreds of tests, torch threads among them) need not be a terminal's.
    BECOME = (
        "import fcntl, os, signal, sys, termios; os.setsid(); fcntl.ioctl(0, termios.TIOCSCTTY, 0); "
        "signal.pthread_sigmask(signal.SIG_SETMASK, []); signal.signal(signal.SIGINT, signal.SIG_DFL); "
        "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"
    )

    def __init__(self, args, cwd, env):
        self.fd, tty = pty.openpty()
        command = [sys.executable, "-c", self.BECOME, str(REPO / "chat.py"), *args]
        self.process = subprocess.Popen(command, cwd=cwd, env=env, stdin=tty, stdout=tty, stderr=tty, close_fds=True)
        os.close(tty)
        self.pid = self.process.pid
        self.shown, self.read_to = "", 0

    def _read(self, wait: float) -> bool:
        """Read what the terminal shows; False once the child closed it."""
        if not select.select([self.fd], [], [], wait)[0]:
            return True
        try:
            chunk = os.read(self.fd, 4096)
        except OSError:  # the child has gone
            return False
        self.shown += chunk.decode("utf-8", "replace")
        return bool(chunk)

    def expect(self, text: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.shown[self.read_to :]:
            left = deadline - time.monotonic()
            assert left > 0, f"no {text!r} on the terminal; it shows:\n{self.shown[-3000:]}"
            assert self._read(min(left, 0.5)), f"chat ended without {text!r}:\n{self.shown[-3000:]}"
        self.read_to = self.shown.index(text, self.read_to) + len(text)

    def send(self, data: str) -> None:
        os.write(self.fd, data.encode())

    def exit_code(self, timeout: float = 30) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
            self._read(0.2)
        raise AssertionError(f"chat did not end:\n{self.shown[-3000:]}")

    def kill(self) -> None:
        with suppress(ChildProcessError):
            if not os.waitpid(self.pid, os.WNOHANG)[0]:
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
        os.close(self.fd)


@pytest.mark.slow
def test_terminal_chat_stops_answers_on_ctrl_c_edits_lines_and_quits_on_ctrl_d(endless_dir, tmp_path):
    cache = tmp_path / "cache"
    env = {**os.environ, "TELECHAT_LAB_CACHE": str(cache), "PYTHONUNBUFFERED": "1", "TERM": "xterm", **ONE_THREAD}
    args = [f"model.path={endless_dir}", "generation.do_sample=false", "generation.max_new_tokens=4000"]
    term = Terminal(args, tmp_path, env)
    try:
        term.expect("User: ", timeout=120)
        term.send("Helo\x1b[Dl\r")  # a typo mended with the left arrow: "Hello"
        term.expect("Assistant: ")
        time.sleep(0.5)  # the answer (4000 tokens) streams
        term.send("\x03")
        term.expect("[stopped]")
        term.expect("User: ")
        term.send("\x1b[A\r")  # the previous line again, from the history
        term.expect("Hello")  # shown again at the prompt
        term.expect("Assistant: ")
        time.sleep(0.5)
        term.send("\x03")
        term.expect("[stopped]")
        term.expect("User: ")
        time.sleep(1.2)  # not a double Ctrl+C
        term.send("\x03")  # at the prompt: a new prompt
        term.expect("Ctrl+C again quits")
        term.expect("User: ")
        term.send("\x04")  # Ctrl+D
        code = term.exit_code()
    finally:
        term.kill()
    assert code == 0, term.shown
    assert "Traceback" not in term.shown and "terminate called" not in term.shown
    assert "^[[" not in term.shown  # the arrows moved the cursor, they did not reach the model
    assert (cache / "chat_history").read_text().splitlines() == ["Hello"]  # kept for the next session


@pytest.mark.slow
def test_sigterm_stops_batch_chat_with_exit_143_and_what_it_kept_is_the_uninterrupted_runs(
    endless_dir, tmp_path, one_thread
):
    from dataclasses import asdict

    from telechat_lab.chat.engines import HuggingFaceEngine
    from telechat_lab.config.schema import GenerationConfig

    source, output, whole = tmp_path / "prompts.txt", tmp_path / "answers.jsonl", tmp_path / "whole.jsonl"
    source.write_text(PROMPTS)
    generation = asdict(GenerationConfig(do_sample=False, max_new_tokens=40))
    engine = HuggingFaceEngine(endless_dir, [], device="cpu")
    batch(ChatSession(engine, endless_dir, generation=generation), str(source), str(whole))
    args = [f"model.path={endless_dir}", f"input={source}", f"output={output}", "device=cpu"]
    args += ["generation.do_sample=false", "generation.max_new_tokens=40"]

    proc = subprocess.Popen(
        [sys.executable, str(REPO / "chat.py"), *args],
        cwd=tmp_path,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **ONE_THREAD},
    )
    assert proc.stderr.readline() == "answered 1/5\n"  # lines, not \r
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "answers kept in" in err and "run the same command again" in err and "Traceback" not in err
    kept = output.read_text().splitlines()
    assert 1 <= len(kept) < 5 and kept == whole.read_text().splitlines()[: len(kept)]
    batch(ChatSession(engine, endless_dir, generation=generation), str(source), str(output))  # the rerun
    assert output.read_text() == whole.read_text()
