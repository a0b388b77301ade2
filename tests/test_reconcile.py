"""The one reconcile loop (reconcile.py) that the follower and `fleet sync --watch` run on."""

from __future__ import annotations

import random
import threading
import time

import pytest

from arachne_mlflow import reconcile
from arachne_mlflow.reconcile import DONE, RETRY, Outcome, PermanentError, Schedule


def _run(outcomes, schedule, **kwargs):
    """Run the loop over `outcomes` (an Outcome, or an exception to raise), then stop; the delays it chose."""
    stop, delays, errors = threading.Event(), [], []
    passes = iter(outcomes)

    def one_pass():
        outcome = next(passes, None)
        if outcome is None:
            stop.set()
            return DONE
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    reconcile.run(
        one_pass,
        schedule,
        stop,
        on_error=lambda err, delay: errors.append((err, delay)),
        on_wait=delays.append,
        **kwargs,
    )
    return delays[: len(outcomes)], errors


def test_a_pass_that_went_well_waits_the_interval():
    delays, errors = _run([DONE, DONE, DONE], Schedule(0.01))
    assert delays == [0.01, 0.01, 0.01] and errors == []


def test_transient_failures_back_off_doubling_up_to_the_caps_and_a_success_resets():
    schedule = Schedule(0.001, backoff_cap=8, max_backoff=0.006)
    delays, _ = _run([RETRY, RETRY, RETRY, RETRY, RETRY, DONE, RETRY], schedule)
    assert delays == pytest.approx([0.001, 0.002, 0.004, 0.006, 0.006, 0.001, 0.001])
    uncapped = Schedule(1.0, backoff_cap=10)
    assert [uncapped.delay(n) for n in (0, 1, 2, 3, 4, 5, 9)] == [1, 1, 2, 4, 8, 10, 10]


def test_jitter_stays_within_its_bounds_and_varies():
    schedule = Schedule(10.0, jitter=0.5, backoff_cap=10)
    rng = random.Random(7)
    waits = [schedule.delay(0, rng) for _ in range(500)]
    assert 5.0 <= min(waits) and max(waits) <= 10.0 and max(waits) - min(waits) > 4
    backed_off = [schedule.delay(3, rng) for _ in range(500)]
    assert 20.0 <= min(backed_off) and max(backed_off) <= 40.0


def test_an_unexpected_error_is_reported_and_backed_off_and_the_loop_goes_on():
    bug = RuntimeError("a bug")
    delays, errors = _run([bug, bug, DONE], Schedule(0.001, backoff_cap=4))
    assert delays == pytest.approx([0.001, 0.002, 0.001])
    assert [(err, delay) for err, delay in errors] == [(bug, pytest.approx(0.001)), (bug, pytest.approx(0.002))]


def test_a_permanent_error_ends_the_loop():
    calls = []

    def one_pass():
        calls.append(1)
        if len(calls) == 3:
            raise PermanentError("nothing to try again")
        return RETRY

    with pytest.raises(PermanentError, match="nothing to try again"):
        reconcile.run(one_pass, Schedule(0.001), threading.Event(), on_error=lambda err, delay: None)
    assert len(calls) == 3


def test_a_pass_may_name_its_own_delay_and_a_period_counts_from_the_start_of_the_pass():
    delays, _ = _run([Outcome(delay=0.003), DONE], Schedule(0.001))
    assert delays == [0.003, 0.001]
    stop, seen = threading.Event(), []

    def slow_pass():
        time.sleep(0.05)
        stop.set()
        return DONE

    reconcile.run(
        slow_pass, Schedule(0.2, from_start=True), stop, on_error=lambda err, delay: None, on_wait=seen.append
    )
    assert 0.0 <= seen[0] <= 0.155


def test_stop_cuts_a_wait_short():
    stop = threading.Event()
    thread = threading.Thread(
        target=reconcile.run, args=(lambda: DONE, Schedule(3600.0), stop), kwargs={"on_error": print}, daemon=True
    )
    thread.start()
    time.sleep(0.05)
    started = time.monotonic()
    stop.set()
    thread.join(timeout=30)
    assert not thread.is_alive() and time.monotonic() - started < 30


@pytest.mark.parametrize(
    "settings", [{"interval": 0}, {"interval": 1, "jitter": 1.5}, {"interval": 1, "backoff_cap": 0.5}]
)
def test_a_schedule_that_makes_no_sense_is_refused(settings):
    with pytest.raises(ValueError):
        Schedule(**settings)
