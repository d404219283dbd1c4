"""`callbacks=samples` (conf/callbacks/samples.yaml): the model's replies to a fixed handful of validation prompts
(the first `num_prompts` examples of the validation split, prompted as eval prompts them), generated greedily every
`every_n_val` validation runs, so that a researcher sees the replies change and not only the loss.

Each time: rows (step, example, prompt, reference, reply) appended to `samples.csv` in the run directory, the same
as a markdown table appended to `samples.md`, and, when the run logs to wandb (a WandbLogger among the trainer's
loggers), a wandb Table `samples` with every row so far. Generated on global rank 0 only (the other ranks go on);
not under DeepSpeed ZeRO-3, whose sharded weights need every rank in each forward: there it says so once and
generates nothing.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning as L

COLUMNS = ("step", "example", "prompt", "reference", "reply")


class SampleReplies(L.Callback):
    def __init__(
        self,
        output_dir: str,
        tokenizer: str | None = None,
        num_prompts: int = 4,
        every_n_val: int = 1,
        max_new_tokens: int = 64,
    ):
        self.output_dir = Path(output_dir)
        self.tokenizer_path = tokenizer
        self.num_prompts, self.every_n_val, self.max_new_tokens = num_prompts, every_n_val, max_new_tokens
        self.validations = 0
        self.rows: list[list] = []  # every row so far (the wandb Table is logged whole each time)
        self._examples = None
        self._tokenizer = None
        self._said = False

    def setup(self, trainer, pl_module, stage: str) -> None:
        """The settings checked here, not in __init__ (Hydra's instantiate would wrap the error in its own)."""
        bad = [
            f"callbacks.samples.{name}={value}: must be at least 1"
            for name, value in (
                ("num_prompts", self.num_prompts),
                ("every_n_val", self.every_n_val),
                ("max_new_tokens", self.max_new_tokens),
            )
            if value < 1
        ]
        datamodule = trainer.datamodule
        if stage == "fit" and datamodule is not None and getattr(datamodule, "val_set", False) is None:
            bad.append(
                "callbacks=samples replies to validation prompts: set data.val_size (there is no validation split)"
            )
        if bad:
            from telechat_lab.errors import ConfigError

            raise ConfigError(bad)

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        self.validations += 1
        if self.validations % self.every_n_val or not trainer.is_global_zero:
            return
        val_set = getattr(trainer.datamodule, "val_set", None) if trainer.datamodule is not None else None
        if val_set is None or not len(val_set):
            return
        from telechat_lab.training.zero import zero3_config

        if zero3_config(trainer) is not None:
            if not self._said:
                print("callbacks.samples: no samples under DeepSpeed ZeRO-3", file=sys.stderr, flush=True)
                self._said = True
            return
        with trainer.strategy.precision_plugin.forward_context():  # the dtypes of the validation's forward
            rows = self.sample(pl_module, val_set, trainer.global_step)
        self.write(rows)
        self.rows += rows
        self.log_wandb(trainer)

    def sample(self, pl_module, val_set, step: int) -> list[list]:
        from telechat_lab.resolve import tokenizer_dir
        from telechat_lab.tokenizer import EOS_ID, load_tokenizer

        from .predict import examples_of, generate_hf, text_of

        if self._examples is None:
            self._examples = examples_of(val_set.subset(list(range(min(self.num_prompts, len(val_set))))))
            self._tokenizer = load_tokenizer(tokenizer_dir(self.tokenizer_path))
        model = pl_module.model
        training = model.training
        model.eval()
        try:
            engine = SimpleNamespace(model=model, device=pl_module.device)
            generation = {"max_new_tokens": self.max_new_tokens, "do_sample": False, "repetition_penalty": 1.0}
            generated = generate_hf(engine, [ex.prompt_ids for ex in self._examples], generation)
        finally:
            model.train(training)
        tok = self._tokenizer
        return [
            [
                step,
                ex.source,
                tok.decode(ex.prompt_ids, skip_special_tokens=False),
                text_of(tok, ex.reference_ids),
                text_of(tok, ids[:-1] if ids and ids[-1] == EOS_ID else ids),
            ]
            for ex, ids in zip(self._examples, generated, strict=True)
        ]

    def write(self, rows: list[list]) -> None:
        csv_path, md_path = self.output_dir / "samples.csv", self.output_dir / "samples.md"
        new = not csv_path.is_file()
        with open(csv_path, "a", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(COLUMNS)
            writer.writerows(rows)
        cell = lambda v: str(v).replace("|", "\\|").replace("\n", "<br>")  # noqa: E731
        lines = [] if md_path.is_file() else ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
        with open(md_path, "a", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")

    def log_wandb(self, trainer) -> None:
        from lightning.pytorch.loggers import WandbLogger

        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_table(key="samples", columns=list(COLUMNS), data=[list(r) for r in self.rows])
