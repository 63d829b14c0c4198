"""Where a run stands (Position) and the running sums of the current epoch (EpochMeter).

Both go into every checkpoint, so a run stopped inside an epoch resumes at the same step with the
same sums: the epoch's row in history.csv is then the one an uninterrupted run would write.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch


class EpochMeter:
    """Sums over the training steps of one epoch, kept on the device: an update is a few kernel
    launches and no host sync; the sums are read (a sync) only at checks and at the epoch's end.
    A NaN or inf anywhere stays in the sum, so one check finds any non-finite step since the last."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self._no_reg = torch.zeros((), device=self.device)  # vanilla runs: allocated once
        self.reset()

    def reset(self) -> None:
        self.losses = torch.zeros(3, dtype=torch.float64, device=self.device)  # (loss, ce, reg) x n
        self.correct = torch.zeros((), dtype=torch.int64, device=self.device)
        self.seen = 0

    @torch.no_grad()
    def update(self, loss: torch.Tensor, ce: torch.Tensor, reg: torch.Tensor | None,
               logits: torch.Tensor, labels: torch.Tensor) -> None:
        n = labels.shape[0]
        reg = reg if reg is not None else self._no_reg
        self.last = torch.stack((loss, ce, reg))  # the step's own losses, for the per-step log
        self.losses.add_(self.last, alpha=n)
        self.correct += (logits.argmax(1) == labels).sum()
        self.seen += n

    def finite(self) -> torch.Tensor:
        """A 0-dim bool tensor on the device (reading it is the caller's sync)."""
        return torch.isfinite(self.losses).all()

    def summary(self) -> dict:
        """Mean losses and training accuracy (percent) over the samples seen so far."""
        count = max(self.seen, 1)
        loss, ce, reg = self.losses.tolist()
        return {"train_loss": loss / count, "ce_loss": ce / count, "reg_loss": reg / count,
                "train_acc": 100.0 * int(self.correct) / count}

    def state_dict(self) -> dict:
        return {"losses": self.losses.cpu(), "correct": self.correct.cpu(), "seen": self.seen}

    def load_state_dict(self, state: dict) -> None:
        """Load sums that nsr/train/state_checks.py check_meter has checked."""
        self.losses = state["losses"].to(self.device, torch.float64)
        self.correct = state["correct"].to(self.device, torch.int64)
        self.seen = state["seen"]


@dataclass
class Position:
    """Where training stands. `step` is the next step inside `epoch` (0-based); `history` holds
    one row per finished epoch; the best_* and test_* fields are those of the best validation."""
    epoch: int = 0
    step: int = 0
    global_step: int = 0
    history: list = field(default_factory=list)
    best_val_acc: float = -1.0
    best_epoch: int = -1
    test_acc: float | None = None
    test_top5_acc: float | None = None
    train_time_s: float = 0.0          # training steps of finished epochs (no evaluation)
    eval_time_s: float = 0.0           # validation and test
    epoch_time_s: float = 0.0          # training time of the current epoch so far

    def state_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_state(cls, state: dict) -> "Position":
        """Rebuild from a checkpoint's position, whose fields nsr/train/state_checks.py
        check_position_fields has checked."""
        return cls(**{name: state[name] for name in cls.__dataclass_fields__ if name in state})
