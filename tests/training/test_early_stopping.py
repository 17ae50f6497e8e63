"""Early stopping on scripted metric sequences, and its JSON round trip."""

import json

import pytest

from flaxcnn import default_config
from flaxcnn.training.early_stopping import EarlyStopping


def stop_epoch(stopper, values, first_epoch=1):
    """The epoch after which `stopper` says stop, or None; updates it on the way."""
    for epoch, value in enumerate(values, first_epoch):
        stopper.update(epoch, value)
        if stopper.should_stop:
            return epoch
    return None


def test_max_mode_stops_patience_epochs_after_the_best():
    stopper = EarlyStopping(metric="accuracy", patience=2)
    assert stopper.mode == "max"
    # Best 0.95 at epoch 3; epochs 4 and 5 do not beat it (equal is no improvement).
    assert stop_epoch(stopper, [0.90, 0.93, 0.95, 0.94, 0.95, 0.99]) == 5
    assert stopper.best_epoch == 3 and stopper.best_value == 0.95


def test_min_mode_stops_patience_epochs_after_the_best():
    stopper = EarlyStopping(metric="loss", patience=3)
    assert stopper.mode == "min"
    assert stop_epoch(stopper, [1.0, 0.5, 0.4, 0.45, 0.3, 0.31, 0.32, 0.30, 0.1]) == 8
    assert stopper.best_epoch == 5 and stopper.best_value == 0.3


def test_update_reports_improvements():
    stopper = EarlyStopping(metric="loss", patience=5)
    assert [stopper.update(e, v) for e, v in enumerate([2.0, 1.0, 1.5, 0.9, 0.9])] == [
        True,
        True,
        False,
        True,
        False,
    ]


def test_min_delta_must_be_exceeded():
    stopper = EarlyStopping(metric="accuracy", patience=2, min_delta=0.01)
    # +0.005 and +0.01 are not improvements over 0.90; +0.02 is, from the best (0.90).
    assert stop_epoch(stopper, [0.90, 0.905, 0.91]) == 3
    assert stopper.best_epoch == 1
    stopper = EarlyStopping(metric="accuracy", patience=2, min_delta=0.01)
    assert stop_epoch(stopper, [0.90, 0.905, 0.92, 0.925, 0.929]) == 5
    assert stopper.best_epoch == 3 and stopper.best_value == 0.92


def test_patience_zero_never_stops():
    stopper = EarlyStopping(metric="loss")
    assert not stopper.enabled
    assert stop_epoch(stopper, [1.0] + [2.0] * 20) is None
    assert stopper.best_epoch == 1


def test_nan_never_improves():
    stopper = EarlyStopping(metric="loss", patience=2)
    assert not stopper.update(1, float("nan"))
    assert stopper.best_epoch is None and not stopper.should_stop
    assert stop_epoch(stopper, [1.0, float("nan"), float("nan")], first_epoch=2) == 4


def test_explicit_mode_and_inferred_modes():
    assert EarlyStopping(metric="val_error").mode == "min"
    assert EarlyStopping(metric="top5_acc").mode == "max"
    assert EarlyStopping(metric="score", mode="max").mode == "max"
    with pytest.raises(ValueError, match="set early_stopping.mode"):
        EarlyStopping(metric="score")


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"mode": "up"}, "early_stopping.mode must be one of"),
        ({"patience": -1}, "early_stopping.patience must be an integer >= 0"),
        ({"patience": 1.5}, "early_stopping.patience must be an integer >= 0"),
        ({"min_delta": -0.1}, "early_stopping.min_delta must be >= 0"),
    ],
)
def test_bad_settings_raise_value_error(settings, message):
    with pytest.raises(ValueError, match=message):
        EarlyStopping(**settings)


def test_round_trips_through_json():
    stopper = EarlyStopping(metric="loss", patience=2, min_delta=0.001)
    stop_epoch(stopper, [0.5, 0.4, 0.41])
    restored = EarlyStopping.from_dict(json.loads(json.dumps(stopper.to_dict())))
    assert restored == stopper
    assert (restored.best_epoch, restored.best_value) == (2, 0.4)
    assert not restored.should_stop
    # Both continue identically.
    assert stopper.update(4, 0.45) == restored.update(4, 0.45) is False
    assert stopper.should_stop and restored.should_stop


def test_replaying_epochs_replaces_what_followed():
    stopper = EarlyStopping(metric="accuracy", patience=2)
    stop_epoch(stopper, [0.9, 0.8, 0.7])
    assert stopper.should_stop
    # A run resumed from the checkpoint after epoch 1 redoes epoch 2 onwards.
    assert stopper.update(2, 0.95)
    assert stopper.history == [(1, 0.9), (2, 0.95)] and not stopper.should_stop
    stopper.truncate_after(1)
    assert stopper.history == [(1, 0.9)] and stopper.best_epoch == 1


def test_from_config_reads_the_settings_and_continues_a_history():
    config = default_config.get_config()
    stopper = EarlyStopping.from_config(config)
    assert (stopper.metric, stopper.mode, stopper.patience, stopper.min_delta) == (
        "accuracy",
        "max",
        0,
        0.0,
    )
    config.early_stopping.update(metric="loss", patience=1)
    saved = EarlyStopping(metric="loss", patience=4, history=[(1, 0.5), (2, 0.6)]).to_dict()
    stopper = EarlyStopping.from_config(config, history=saved["history"])
    assert stopper.patience == 1 and stopper.should_stop and stopper.best_epoch == 1
