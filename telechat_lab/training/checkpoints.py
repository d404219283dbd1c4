"""What a run keeps on disk, and when: every `save_steps` optimizer steps, at its last step, and when a signal
(SIGINT, SIGTERM, SIGUSR1) asks it to stop.

At each of these points, once the step is finished:
- a resumable checkpoint `checkpoints/step-NNNNNNN.ckpt` (trained parameters, optimizer, scheduler, data position,
  the run's id), written under a temporary name and renamed into place, so that a crash leaves the previous one
  intact; the newest `save_total_limit` are kept;
- a Hugging Face checkpoint `checkpoint-N/` (a PEFT adapter, or for full / freeze fine-tuning a TeleChat2
  directory, with the tokenizer and config.yaml), staged and renamed likewise, pruned likewise;
- nothing at all when a trained parameter is NaN or infinite.
At the end of a completed run the adapter (or model) is also written into the output directory itself.

A signal lets the step finish, writes the resumable checkpoint and stops the run; under SLURM, SIGUSR1 (sent
ahead of the time limit by `#SBATCH --signal=USR1@120`) also requeues the job, which resumes by itself.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import subprocess
import threading
from pathlib import Path

import lightning as L
import torch
import yaml

from telechat_lab.console import without_transformers_bars
from telechat_lab.errors import CheckpointError, NonFiniteLoss
from telechat_lab.files import (
    TEMP_PREFIX,
    remove_stale_temporaries,
    staged_dir,
    staged_files,
    usual_modes,
    write_json,
)

log = logging.getLogger(__name__)
STEP_FILE = re.compile(r"^step-(\d+)\.ckpt$")
HF_DIR = re.compile(r"^checkpoint-(\d+)$")
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


def trained_parameters_finite(module: torch.nn.Module, trainer=None) -> bool:
    """Every trained parameter finite, on every rank (each checks what it holds: its slice under ZeRO-3)."""
    from .zero import local_values

    finite = all(
        bool(torch.isfinite(local_values(p)).all()) for p in module.parameters() if p.requires_grad and p.numel()
    )
    if trainer is not None and trainer.world_size > 1:
        flag = torch.tensor([float(finite)], device=trainer.strategy.root_device)
        finite = bool(trainer.strategy.reduce(flag, reduce_op="min").item())
    return finite


class RunCheckpoints(L.Callback):
    def __init__(
        self, output_dir: Path, base_dir: Path, run_id: str, save_steps: int, keep: int | None, resolved_config: str
    ):
        self.output_dir, self.base_dir = Path(output_dir), Path(base_dir).resolve()
        self.checkpoint_dir = self.output_dir / "checkpoints"
        self.run_id, self.save_steps, self.keep, self.resolved_config = run_id, save_steps, keep, resolved_config
        # the trainer settings its last step was the last of (a resume with others has more to train)
        self.trainer_settings = (yaml.safe_load(resolved_config) or {}).get("trainer") if resolved_config else None
        self.stop_signal: int | None = None  # the signal that stopped the run, once it has
        self._requested = 0
        self._last_saved = -1
        self.final_saved = False
        self._previous_handlers: dict = {}
        self._tokenizer = None

    # ------------------------------------------------------------------------------------ signals

    def _on_signal(self, signum, frame) -> None:
        if self._requested and signum == signal.SIGINT:  # a second Ctrl+C: stop now, without a checkpoint
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        self._requested = signum
        log.warning(
            "received %s: finishing this step, then writing a resumable checkpoint and stopping%s",
            signal.Signals(signum).name,
            " (Ctrl+C again to abort)" if signum == signal.SIGINT else "",
        )

    def on_fit_start(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            remove_stale_temporaries(self.checkpoint_dir)
            remove_stale_temporaries(self.output_dir)

    def on_train_start(self, trainer, pl_module) -> None:
        # installed after Lightning's own SIGTERM handler (which would end the run at once, exit code 0, without a
        # checkpoint) and in its place; every rank learns of a stop through _stop_requested at the same step
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous_handlers[signum] = signal.signal(signum, self._on_signal)

    def on_fit_end(self, trainer, pl_module) -> None:
        self._restore_handlers()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._restore_handlers()

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers = {}

    def _stop_requested(self, trainer) -> int:
        """The signal any rank received (every rank must stop at the same step)."""
        if trainer.world_size == 1:
            return self._requested
        flag = torch.tensor([self._requested], device=trainer.strategy.root_device)
        return int(trainer.strategy.reduce(flag, reduce_op="max").item())

    # ------------------------------------------------------------------------------------ saving

    @staticmethod
    def _last_step(trainer) -> bool:
        """This step is the run's last: max_steps or the last batch of max_epochs is reached."""
        last_epoch = trainer.max_epochs not in (None, -1) and trainer.current_epoch + 1 >= trainer.max_epochs
        return (0 < trainer.max_steps <= trainer.global_step) or (trainer.is_last_batch and last_epoch)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        # final: written at the run's last step (a resume with the same limits has nothing left to train)
        step, final = trainer.global_step, self._last_step(trainer)
        record = {"run_id": self.run_id, "step": step, "final": final, "trainer": self.trainer_settings}
        checkpoint["telechat_run"] = record

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        requested = self._stop_requested(trainer)
        step = trainer.global_step
        final = self._last_step(trainer)
        if step and step != self._last_saved and (step % self.save_steps == 0 or final or requested):
            self.save(trainer, pl_module, step)
        if requested:
            self.stop_signal = requested
            trainer.should_stop = True
            if requested == signal.SIGUSR1 and trainer.is_global_zero:
                requeue_slurm_job()

    def save(self, trainer, pl_module, step: int) -> None:
        if not trained_parameters_finite(pl_module.model, trainer):
            raise NonFiniteLoss(
                f"a trained parameter is NaN or infinite at step {step}: nothing of it was saved; "
                f"the last good checkpoint is step {self._last_saved if self._last_saved > 0 else 'none'}"
            )
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        final = self.checkpoint_dir / f"step-{step:07d}.ckpt"
        staging = self.checkpoint_dir / f"{TEMP_PREFIX}{final.name}"
        trainer.save_checkpoint(staging)  # every rank takes part (sharded strategies); ends with a barrier
        state = self._gathered(trainer, pl_module)
        if trainer.is_global_zero:
            record = {"step": step, "run_id": self.run_id, "final": self._last_step(trainer)}
            record["trainer"] = self.trainer_settings
            write_json(meta_file(final), record)  # what resume reads first: never unpickled
            usual_modes(staging)
            os.replace(staging, final)
            with staged_dir(self.output_dir / f"checkpoint-{step}") as directory:
                self.save_pretrained(pl_module, directory, state)
            self._prune()
        trainer.strategy.barrier("telechat_lab.checkpoint")
        self._last_saved = step

    def on_train_end(self, trainer, pl_module) -> None:
        self.save_final(trainer, pl_module)

    def save_final(self, trainer, pl_module) -> None:
        """The finished run's adapter (or model) in the output directory itself; not for a stopped run. Also
        called after fit: a run resumed from a checkpoint of its last step trains nothing, and Lightning then
        calls no on_train_end."""
        if self.stop_signal is None and not self.final_saved:
            state = self._gathered(trainer, pl_module)
            if trainer.is_global_zero:
                with staged_files(self.output_dir) as directory:
                    self.save_pretrained(pl_module, directory, state)
        self.final_saved = True

    @staticmethod
    def _gathered(trainer, pl_module) -> dict | None:
        """Under ZeRO-3 the whole tensors to write (all ranks gather, rank 0 keeps them); else None (the model's
        own)."""
        from .zero import gathered_state_dict, zero3_config

        if zero3_config(trainer) is None:
            return None
        return gathered_state_dict(pl_module.model, trained_only=hasattr(pl_module.model, "peft_config"))

    def save_pretrained(self, pl_module, directory: Path, state: dict | None = None) -> None:
        """A PEFT adapter naming its base by absolute path, or for full / freeze fine-tuning a HF checkpoint
        directory with TeleChat2's names; the tokenizer and config.yaml beside it. `state`: the tensors to write
        (gathered under ZeRO-3), else the model's own."""
        from telechat_lab.tokenizer import load_tokenizer, save_tokenizer

        with without_transformers_bars():  # the training bar is on the screen
            save_model(pl_module.model, directory, self.base_dir, state)
            getattr(pl_module, "finish_export", lambda _: None)(directory)  # a stage's adapter on its reference
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.base_dir)
        save_tokenizer(self._tokenizer, directory)
        (directory / "config.yaml").write_text(self.resolved_config)

    def _prune(self) -> None:
        if not self.keep:
            return
        for pattern, directory in ((STEP_FILE, self.checkpoint_dir), (HF_DIR, self.output_dir)):
            found = sorted((int(m.group(1)), p) for p in directory.iterdir() if (m := pattern.match(p.name)))
            for _, path in found[: -self.keep]:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
                if pattern is STEP_FILE:
                    meta_file(path).unlink(missing_ok=True)


def save_model(model, directory: Path, base_dir: Path, state: dict | None = None) -> None:
    """A PEFT adapter (naming its base by absolute path) or a whole TeleChat2 in Hugging Face's format; `state`:
    the tensors to write instead of the model's own (gathered from ZeRO-3 slices)."""
    kwargs = {} if state is None else {"state_dict": state}
    if hasattr(model, "peft_config"):
        for config in model.peft_config.values():
            config.base_model_name_or_path = str(base_dir)
    else:
        model.generation_config.save_pretrained(directory)
    model.save_pretrained(directory, **kwargs)


def requeue_slurm_job() -> None:
    """Under SLURM, put this job back in the queue (it resumes from the checkpoint just written). Not Lightning's
    SLURMEnvironment(auto_requeue=True): its SIGUSR1 handler saves an hpc_ckpt mid-step on each rank by itself;
    ours (on_train_start replaces it) lets the step finish, stops every rank at the same step and requeues only
    after this run's own atomic checkpoint, which resume reads."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return
    if os.environ.get("SLURM_ARRAY_JOB_ID"):
        job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    if result.returncode:
        log.error("scontrol requeue %s failed: %s", job, result.stderr.strip())
    else:
        log.warning("requeued SLURM job %s: it resumes from the checkpoint just written", job)


# ------------------------------------------------------------------------------------------------ resuming

# What DeepSpeed's own checkpoint files hold besides tensors and plain values. Its engine loads them with
# weights_only=False (deepspeed has no weights-only path), so each file is first loaded weights-only with exactly
# these allowed: a file that would import anything else is refused before DeepSpeed sees it.
DEEPSPEED_GLOBALS = (
    ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
    ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
    ("deepspeed.utils.tensor_fragment", "fragment_address"),
    ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
)


def meta_file(checkpoint: Path) -> Path:
    """The JSON beside a resumable checkpoint that records its step and run (read without loading it)."""
    return checkpoint.with_suffix(".json")


def _allowed_globals(directory: bool) -> list:
    if not directory:
        return []
    import importlib

    allowed = []
    for module, name in DEEPSPEED_GLOBALS:
        try:
            allowed.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):  # another DeepSpeed version: what it lacks cannot be in its files
            continue
    return allowed


def load_checkpoint_file(path: Path, allowed: list | None = None) -> dict:
    """A torch checkpoint file loaded weights-only: tensors and plain values (and `allowed` classes), never an
    arbitrary object, so a crafted file cannot run code. CheckpointError names what it would import."""
    import pickle

    try:
        with torch.serialization.safe_globals(allowed or []):
            return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as err:
        try:
            names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        except Exception:
            names = []
        raise CheckpointError(
            f"{path} is not a checkpoint telechat-lab wrote: loading it would import "
            f"{', '.join(names) if names else 'objects other than tensors and plain values'}, so it was not loaded "
            "(checkpoints are loaded weights-only and never run code). Move it out of the run directory; if you did "
            "not put it there, someone else can write to it"
        ) from err


def verify_checkpoint(path: Path) -> None:
    """Load each file of a checkpoint (one file, or DeepSpeed's directory of them) weights-only, as resuming will:
    CheckpointError for one that would run code, another exception for one that is damaged."""
    files = sorted(path.rglob("*.pt")) if path.is_dir() else [path]
    if path.is_dir() and not files:
        raise FileNotFoundError(f"no *.pt files in {path}")
    allowed = _allowed_globals(path.is_dir())
    for file in files:
        load_checkpoint_file(file, allowed)


def _checkpoint_meta(path: Path) -> dict:
    """A checkpoint's step and run: from the JSON written beside it, else (a checkpoint of an older version, a
    copy) from the file itself, loaded weights-only; a sharded (DeepSpeed) checkpoint's step is in its name."""
    from telechat_lab.files import read_json

    if meta_file(path).is_file():
        try:
            meta = read_json(meta_file(path), "a checkpoint's record")
            return {"step": int(meta["step"]), "run_id": meta.get("run_id"), "verified": False}
        except Exception:
            pass  # a damaged record: the checkpoint itself says
    if path.is_dir():
        match = STEP_FILE.match(path.name)
        return {"step": int(match.group(1)) if match else -1, "run_id": None, "verified": False}
    state = load_checkpoint_file(path)
    run = state.get("telechat_run") or {}
    return {"step": int(state["global_step"]), "run_id": run.get("run_id"), "verified": True}


def _skip(path: Path, err: Exception) -> None:
    log.warning(
        "skipping %s: it cannot be read (%s); falling back to an earlier checkpoint",
        path,
        str(err).splitlines()[0] if str(err) else type(err).__name__,
    )


def ended_its_run(path: Path, trainer_settings: dict) -> bool:
    """The resumable checkpoint was written at the last step of a run with these trainer settings (max_steps,
    max_epochs, ...): its record says, else (an older version's checkpoint) the file itself, loaded weights-only."""
    from telechat_lab.files import read_json

    record = None
    if meta_file(path).is_file():
        try:
            record = read_json(meta_file(path), "a checkpoint's record")
        except Exception:
            record = None
    if record is None and not path.is_dir():
        record = load_checkpoint_file(path).get("telechat_run") or {}
    return bool(record and record.get("final") and record.get("trainer") == trainer_settings)


def newest_checkpoint(checkpoint_dir: Path, run_id: str) -> Path | None:
    """The resumable checkpoint with the highest recorded step that loads weights-only; damaged ones are skipped
    with a warning naming them. A checkpoint of another run, or one that would run code when loaded, is refused."""
    if not checkpoint_dir.is_dir():
        return None
    found = []
    for path in checkpoint_dir.iterdir():
        if path.name.startswith(TEMP_PREFIX) or not path.name.endswith(".ckpt"):
            continue
        try:
            meta = _checkpoint_meta(path)
        except CheckpointError:
            raise
        except Exception as err:
            _skip(path, err)
            continue
        if meta["run_id"] not in (None, run_id):
            raise CheckpointError(
                f"{path} belongs to another run (its settings differ from "
                f"{checkpoint_dir.parent / 'config.yaml'}); move it away or resume its own run"
            )
        found.append((meta["step"], path.name, path, meta["verified"]))
    for _, _, path, verified in sorted(found, reverse=True):
        try:
            if not verified:
                verify_checkpoint(path)
        except CheckpointError:
            raise
        except Exception as err:
            _skip(path, err)
            continue
        return path
    return None
