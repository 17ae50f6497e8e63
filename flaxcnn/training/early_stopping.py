"""Early stopping on a validation metric, kept as a small record the loop saves as JSON in
the workdir, so that a resumed run stops where an uninterrupted one would."""

import dataclasses
import math
from typing import Any

MODES = ("auto", "min", "max")


def infer_mode(metric: str) -> str:
    """ "min" for losses and errors, "max" for accuracies; ValueError for anything else."""
    name = metric.lower()
    if "loss" in name or "error" in name:
        return "min"
    if "acc" in name:
        return "max"
    raise ValueError(
        f"cannot tell whether early_stopping.metric {metric!r} should rise or fall; "
        "set early_stopping.mode to 'min' or 'max'"
    )


@dataclasses.dataclass
class EarlyStopping:
    """Stops after `patience` epochs without an improvement of more than `min_delta` in the
    validation `metric` (patience 0: never stops).

    The record is the (epoch, value) history; the best value and whether to stop follow from
    it. Updating an epoch at or before the last one recorded replaces it and what followed,
    so a run resumed from an earlier checkpoint replays those epochs consistently.
    """

    metric: str = "accuracy"
    mode: str = "auto"  # "min", "max", or "auto": inferred from the metric's name.
    patience: int = 0
    min_delta: float = 0.0
    history: list[tuple[int, float]] = dataclasses.field(default_factory=list)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"early_stopping.mode must be one of {MODES}, got {self.mode!r}")
        if self.mode == "auto":
            self.mode = infer_mode(self.metric)
        if not (isinstance(self.patience, int) and self.patience >= 0):
            raise ValueError(
                f"early_stopping.patience must be an integer >= 0, got {self.patience}"
            )
        if not self.min_delta >= 0:
            raise ValueError(f"early_stopping.min_delta must be >= 0, got {self.min_delta}")
        self.history = [(int(epoch), float(value)) for epoch, value in self.history]

    @classmethod
    def from_config(cls, config: Any, history: list = ()) -> "EarlyStopping":
        """From `config.early_stopping` (metric, patience, min_delta and optionally mode),
        continuing `history` (a saved record's, for a resumed run)."""
        settings = config.early_stopping
        return cls(
            metric=settings.metric,
            mode=settings.get("mode", "auto"),
            patience=int(settings.patience),
            min_delta=float(settings.min_delta),
            history=list(history),
        )

    @property
    def enabled(self) -> bool:
        return self.patience > 0

    def _improves(self, value: float, best: float | None) -> bool:
        if math.isnan(value):
            return False
        if best is None:
            return True
        if self.mode == "min":
            return value < best - self.min_delta
        return value > best + self.min_delta

    def _best(self, history: list[tuple[int, float]]) -> tuple[int | None, float | None]:
        best_epoch, best_value = None, None
        for epoch, value in history:
            if self._improves(value, best_value):
                best_epoch, best_value = epoch, value
        return best_epoch, best_value

    def update(self, epoch: int, value: float) -> bool:
        """Records the metric's `value` after `epoch`; True when it is a new best."""
        previous = [(e, v) for e, v in self.history if e < epoch]
        improved = self._improves(float(value), self._best(previous)[1])
        self.history = [*previous, (int(epoch), float(value))]
        return improved

    def truncate_after(self, epoch: int) -> None:
        """Forgets the epochs after `epoch`: those a run resumed from there will redo."""
        self.history = [(e, v) for e, v in self.history if e <= epoch]

    @property
    def best_epoch(self) -> int | None:
        """The epoch of the best value so far (None before a first finite value)."""
        return self._best(self.history)[0]

    @property
    def best_value(self) -> float | None:
        return self._best(self.history)[1]

    @property
    def should_stop(self) -> bool:
        """Whether `patience` epochs have passed since the best one without an improvement."""
        best_epoch = self.best_epoch
        if not self.enabled or best_epoch is None:
            return False
        return self.history[-1][0] - best_epoch >= self.patience

    def to_dict(self) -> dict:
        """A JSON-serialisable dict that `from_dict` turns back into an equal record."""
        return {
            "metric": self.metric,
            "mode": self.mode,
            "patience": self.patience,
            "min_delta": self.min_delta,
            "history": [[epoch, value] for epoch, value in self.history],
        }

    @classmethod
    def from_dict(cls, data: dict) -> "EarlyStopping":
        return cls(**data)
