"""lab.serving without a model: a click's comparison started once whoever asks first, followed from its first event
by a page that comes late, its refusal handed to whoever follows, and a closed follower stopping the loop."""
import threading
import time

from lab.errors import LabError
from lab.serving.background import Background
from lab.serving.comparisons import Comparisons
from lab.serving.line import Cancel


def counting(n, cancel=None, gap_s=0.0):
    for i in range(n):
        if cancel is not None and cancel.is_set():
            return
        time.sleep(gap_s)
        yield i


def test_a_follower_that_comes_after_the_loop_ended_still_sees_every_event_in_order():
    run = Background(counting(5))
    assert run.wait(5)
    assert [e for e in run.follow(tick_s=0.01) if e is not None] == [0, 1, 2, 3, 4]


def test_two_followers_each_see_everything_and_the_hook_runs_once_per_event_in_the_loop_thread():
    seen_by_hook = []
    run = Background(counting(20, gap_s=0.002), on_event=lambda e: seen_by_hook.append(
        (e, threading.current_thread().name)))
    first = [e for e in run.follow(tick_s=0.01) if e is not None]
    second = [e for e in run.follow(tick_s=0.01) if e is not None]
    assert first == second == list(range(20))
    assert [e for e, _ in seen_by_hook] == list(range(20)) and {t for _, t in seen_by_hook} == {"run loop"}


def test_closing_a_follower_cancels_the_loop_and_waits_for_it():
    cancel = Cancel()
    run = Background(counting(10_000, cancel, gap_s=0.001), cancel=cancel)
    follower = run.follow(tick_s=0.01)
    next(e for e in follower if e is not None)
    follower.close()
    assert cancel.is_set() and run.finished


def test_a_click_and_the_page_event_are_one_comparison_started_once():
    comparisons, starts = Comparisons(), []

    def plan(c):
        starts.append(c.id)
        c.run = Background(counting(3))

    clicked = comparisons.begin("abc", "page-1", plan, "click", t_click_s=12.5)
    event = comparisons.get("abc", wait_s=1.0) or comparisons.begin("abc", "page-1", plan, "event")
    assert event is clicked and clicked.wait_planned() is None and starts == ["abc"]
    assert clicked.started_by == "click" and clicked.t_click_s == 12.5
    assert [e for e in event.run.follow(tick_s=0.01) if e is not None] == [0, 1, 2]
    assert comparisons.stop("page-1") == 0       # finished and never stopped: Stop has nothing to say it stopped


def test_stop_over_the_socket_then_the_page_event_both_say_it_stopped():
    comparisons = Comparisons()

    def plan(c):
        c.run = Background(counting(100_000, c.cancel, gap_s=0.001), cancel=c.cancel)

    c = comparisons.begin("s", "page-2", plan, "click")
    assert c.wait_planned(5) is None
    assert comparisons.stop("page-2") == 1 and c.cancel.is_set()     # the socket's stop
    [e for e in c.run.follow(tick_s=0.01)]                           # the run loop ends at its next frame
    assert c.finished
    assert comparisons.stop("page-2") == 1     # Gradio's Stop event, after the run ended: it was stopped just now
    assert comparisons.stop("page-3") == 0 and comparisons.stop("") == 0
    assert comparisons.stop("page-2", within_s=0.0) == 0


def test_the_event_waits_for_a_click_that_arrives_a_moment_later():
    comparisons = Comparisons()
    threading.Timer(0.1, lambda: comparisons.begin("late", "p", lambda c: None, "click")).start()
    assert comparisons.get("late", wait_s=2.0) is not None
    assert comparisons.get("never", wait_s=0.05) is None


def test_a_refused_plan_is_handed_to_whoever_follows_with_its_field():
    comparisons = Comparisons()

    def refuse(c):
        raise LabError("text", "is empty; type a sentence to synthesize")

    c = comparisons.begin("x", "p", refuse, "click")
    error = c.wait_planned(5)
    assert error is not None and error.where == "text" and c.run is None and c.finished


def test_finished_comparisons_are_dropped_after_their_keep_time():
    comparisons = Comparisons(keep_s=0.05)
    done = comparisons.begin("old", "p", lambda c: setattr(c, "run", Background(counting(1))), "click")
    done.wait_planned(5)
    done.run.wait(5)
    time.sleep(0.1)
    comparisons.begin("new", "p", lambda c: None, "click")     # a begin drops what is past its keep time
    assert comparisons.get("old") is None and comparisons.get("new") is not None
