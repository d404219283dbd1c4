"""A Lightning callback for bench/startup.py: the wall-clock time (time.time()) at which the first training step
ends, written to the file $STARTUP_FIRST_STEP names; then the run stops."""

import os
import time

import lightning as L


class FirstStep(L.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= 1 and os.environ.get("STARTUP_FIRST_STEP"):
            with open(os.environ["STARTUP_FIRST_STEP"], "w") as f:
                f.write(repr(time.time()))
            os.environ.pop("STARTUP_FIRST_STEP")
