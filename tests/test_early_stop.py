"""Early stopping by asynchronous successive halving (stereo/train/early_stop.py): the rule, its ledger under
concurrent runs and restarts, and the config checks. The trainer and sweep side run in tests/test_sweep.py."""

from __future__ import annotations

import json
import math
import threading

import pytest

from stereo.config import ConfigError, load_config
from stereo.train.early_stop import decide


def test_each_run_continues_only_within_the_best_1_over_eta_so_far(tmp_path):
    # n recorded (itself included) -> the best max(1, n // 2) continue
    rungs = [decide(tmp_path, run, 500, value, eta=2, direction="min")
             for run, value in (("a", 1.0), ("b", 2.0), ("c", 0.5), ("d", 1.5), ("e", 0.7))]
    assert [(r.rank, r.of, r.keep, r.stop) for r in rungs] == [
        (1, 1, 1, False),  # the first: nothing to compare with
        (2, 2, 1, True),
        (1, 3, 1, False),
        (3, 4, 2, True),  # 0.5 1.0 [1.5] 2.0
        (2, 5, 2, False)]  # 0.5 [0.7] 1.0 1.5 2.0
    assert "val/epe/pooled 1.5 ranks 3 of the 4 runs at step 500 so far (the best 2 continue)" in \
        rungs[3].describe("val/epe/pooled")
    assert sorted(p.name for p in (tmp_path / "00000500").glob("*.json")) == [f"{r}.json" for r in "abcde"]


def test_max_direction_ties_and_non_finite_results(tmp_path):
    assert not decide(tmp_path, "a", 10, 0.8, eta=2, direction="max").stop
    assert decide(tmp_path, "b", 10, 0.7, eta=2, direction="max").stop  # lower is worse here
    assert not decide(tmp_path / "tie", "a", 10, 1.0, eta=2, direction="min").stop
    assert decide(tmp_path / "tie", "b", 10, 1.0, eta=2, direction="min").stop  # the earlier of equal results first
    diverged = decide(tmp_path / "nan", "a", 10, math.nan, eta=2, direction="min")
    assert diverged.stop and diverged.value is None  # even alone at the rung
    assert json.loads((tmp_path / "nan" / "00000010" / "a.json").read_text())["value"] is None  # strict JSON
    assert not decide(tmp_path / "nan", "b", 10, 5.0, eta=2, direction="min").stop  # a finite one beats it


def test_a_restarted_run_gets_its_recorded_answer(tmp_path):
    decide(tmp_path, "a", 10, 1.0, eta=2, direction="min")
    first = decide(tmp_path, "b", 10, 2.0, eta=2, direction="min")
    decide(tmp_path, "c", 10, 3.0, eta=2, direction="min")
    again = decide(tmp_path, "b", 10, 0.1, eta=2, direction="min")  # validated again after a restart
    assert again == first and again.stop


def test_runs_reaching_a_rung_at_once_each_get_a_place(tmp_path):
    results = {}

    def reach(index: int) -> None:
        results[index] = decide(tmp_path, f"r{index}", 100, float(index), eta=3, direction="min")

    threads = [threading.Thread(target=reach, args=(i,)) for i in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(r.of for r in results.values()) == list(range(1, 13))  # one at a time, none lost
    records = [json.loads(p.read_text()) for p in (tmp_path / "00000100").glob("*.json")]
    assert sorted(r["arrival"] for r in records) == list(range(12))


@pytest.mark.parametrize("overrides, key, expected", [
    (["early_stop.ledger=/tmp/l", "early_stop.rungs=[5]"], "early_stop.rungs", "multiples of train.val_every"),
    (["early_stop.ledger=/tmp/l", "early_stop.rungs=[300]"], "early_stop.rungs", "below train.steps=300"),
    (["early_stop.ledger=/tmp/l"], "early_stop.rungs", "at least one step"),
    (["early_stop.rungs=[100, 50]"], "early_stop.rungs", "increasing"),
    (["early_stop.eta=1"], "early_stop.eta", ">= 2"),
    (["early_stop.metric=loss"], "early_stop.metric", "a validation metric"),
    (["early_stop.ledger=/tmp/l", "early_stop.rungs=[100]", "data.val=[]"], "early_stop.ledger", "validates"),
])
def test_bad_early_stop_settings_name_the_key(overrides, key, expected):
    with pytest.raises(ConfigError) as info:
        load_config("tiny", ["train.val_every=50", *overrides])  # tiny: 300 steps
    assert info.value.key == key and expected in str(info.value)


def test_every_rank_stops_at_the_rung_of_a_run_that_is_behind(tmp_path, demo_shards):
    """World size 2 through torchrun: rank 0 validates and decides, the other rank gets the answer; the run
    checkpoints at the rung and ends as a finished run (exit 0)."""
    from stereo.train.checkpoint import complete_steps
    from tests.test_train import losses, run

    ledger = tmp_path / "ledger"
    decide(ledger, "earlier", 2, -1.0, eta=2, direction="min")  # better than any EPE
    run_dir = tmp_path / "run"
    code, log = run(run_dir, 2, ("train.steps=4", "train.val_every=2", "data.val_samples=1",
                                 "data.val=[{name: demo_val, shards: shards/demo/val}]", f"early_stop.ledger={ledger}",
                                 "early_stop.rungs=[2]"))
    assert code == 0, log[-3000:]
    assert "stopped early at step 2: val/epe/pooled" in log and "ranks 2 of the 2 runs" in log
    assert complete_steps(run_dir / "checkpoints") == [2] and sorted(losses(run_dir)) == [1, 2]
    assert json.loads((ledger / "00000002" / "run.json").read_text())["stop"]


def test_a_metric_validation_does_not_log_stops_the_run_before_it_trains(tmp_path, demo_shards):
    from tests.test_train import losses, run

    run_dir = tmp_path / "run"
    code, log = run(run_dir, 1, ("train.steps=4", "train.val_every=2", "data.val_samples=1",
                                 "data.val=[{name: demo_val, shards: shards/demo/val}]",
                                 f"early_stop.ledger={tmp_path / 'ledger'}", "early_stop.rungs=[2]",
                                 "early_stop.metric=val/epe_pooled"))
    assert code != 0 and "(config error, exit code 2)" in log, log[-3000:]  # torchrun itself exits 1
    assert "early_stop.metric: a metric validation logs (" in log and "got 'val/epe_pooled'" in log
    assert losses(run_dir) == {}  # the check ran at the validation before training


def test_a_damaged_ledger_entry_is_named_and_left_out(tmp_path, capsys):
    """The ledger is read back by every trial at every rung: an empty or garbled entry (a crash, a stray write)
    must not stop the trials with a traceback."""
    assert not decide(tmp_path, "a", 10, 1.0, eta=2, direction="min").stop
    (tmp_path / "00000010" / "b.json").write_bytes(b"")
    (tmp_path / "00000010" / "c.json").write_bytes(b"\xff{")
    rung = decide(tmp_path, "c", 10, 0.5, eta=2, direction="min")  # its own damaged record: decided again
    assert (rung.rank, rung.of, rung.stop) == (1, 2, False)
    err = capsys.readouterr().err
    assert f"{tmp_path}/00000010/b.json: damaged early-stopping record, left out" in err
    assert decide(tmp_path, "c", 10, 9.0, eta=2, direction="min") == rung  # now recorded: its answer again
