"""Logger factories that need a decision at run time."""

from __future__ import annotations

import netrc
import os

from lightning.pytorch.loggers import WandbLogger


def wandb_account_configured() -> bool:
    """True when wandb has credentials: WANDB_API_KEY, or an api.wandb.ai entry from `wandb login`."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def wandb_logger(offline: bool | None = None, **kwargs) -> WandbLogger:
    """A WandbLogger that runs offline unless an account is configured (or `offline` says otherwise)."""
    if offline is None:
        offline = os.environ.get("WANDB_MODE") == "offline" or not wandb_account_configured()
    return WandbLogger(offline=offline, **kwargs)
