"""Progress as plain lines (what a fit in a log or CI shows)."""

import re

import lightning as L
from lightning.pytorch.demos.boring_classes import BoringModel

from lightning_mtp.progress import LogProgressBar


def test_a_long_validation_prints_its_batches(capsys):
    """interval=0: every validation batch is "long"; the line names the batch and the loader's batch count."""
    trainer = L.Trainer(accelerator="cpu", max_steps=2, limit_train_batches=2, limit_val_batches=3,
                        val_check_interval=2, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
                        enable_model_summary=False, callbacks=[LogProgressBar(interval=0.0)])
    trainer.fit(BoringModel())
    out = capsys.readouterr().out
    assert re.findall(r"^validating at step 2: batch (\d)/3$", out, re.MULTILINE) == ["1", "2", "3"]
