"""A quiet console: the third-party messages mmkd knows to be noise, filtered where they come from.

Each entry below names one message and its source; nothing else is silenced (a new warning from any library still
shows). ``mmkd --verbose ...`` (or ``MMKD_VERBOSE=1``) skips all of it. The filters are installed by the command
line before Lightning is imported, in every process (Lightning re-executes the command for each DDP rank).
"""

from __future__ import annotations

import logging
import os
import warnings

__all__ = ["VERBOSE_ENV", "quiet_third_party", "verbose"]

VERBOSE_ENV = "MMKD_VERBOSE"

# (message regex, category, module regex): warnings raised by a dependency about its own internals or about usage
# that mmkd chooses on purpose.
_WARNINGS = (
    # torchdata's StatefulDataLoader calls a torch API that torch has deprecated (torchdata's business, not ours).
    (r"'set_vital' is deprecated", UserWarning, r"torchdata\."),
    # Lightning's own pytree helper uses a torch class that torch has deprecated.
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", Warning, r"lightning\."),
    # mmkd logs every step it writes (log_every_n_steps caps the logger, not the stage length).
    (r"The number of training batches \(\d+\) is smaller than the logging interval", Warning, r"lightning\."),
    # mmkd resumes through ckpt_path with its own checkpoint callback, rebuilt for every stage.
    (r"Be aware that when using `ckpt_path`, callbacks used to create the checkpoint", Warning, r"lightning\."),
    # A stage without val_data: the StageModule's validation_step simply does not run.
    (r"You defined a `validation_step` but have no `val_dataloader`", Warning, r"lightning\."),
)

# Loggers whose INFO lines are chatter: device availability, a cloud-logger advertisement and "Trainer.fit stopped:
# max_steps reached" (Lightning's rank-zero info), the weights_only default of a checkpoint load, the process-group
# start lines, DeepSpeed's accelerator choice. Their warnings and errors still show. (Lightning sets its top-level
# logger to INFO when imported, so the levels go on these module loggers, which it leaves alone.)
_INFO_LOGGERS = (
    "lightning.pytorch.utilities.rank_zero",
    "lightning.fabric.utilities.rank_zero",
    "lightning.pytorch.trainer.connectors.checkpoint_connector",
    "lightning.fabric.utilities.distributed",
    "lightning.pytorch.strategies.deepspeed",
    "lightning.fabric.strategies.deepspeed",
    "DeepSpeed",
)


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0", "false")


def quiet_third_party() -> None:
    """Install the filters (no-op with ``MMKD_VERBOSE=1``). Call before Lightning or DeepSpeed is imported."""
    if verbose():
        return
    for message, category, module in _WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    for name in _INFO_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    # DeepSpeed warns at import that it fell back to its CPU accelerator when no CUDA device exists; naming the
    # accelerator it would pick anyway makes that an informational line (hidden above).
    if "DS_ACCELERATOR" not in os.environ:
        import torch

        if not torch.cuda.is_available():
            os.environ["DS_ACCELERATOR"] = "cpu"
    # transformers' per-file progress bars ("Loading weights", "Writing model shards") for local folders: read by
    # huggingface_hub when transformers is imported.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
