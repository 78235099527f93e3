"""lab.serving.scheduler on a fake clock: who gets a slot in the batched step, and when. No model, no torch, no
sleeps: the scheduler's wait advances the fake clock to the next arrival or to its deadline."""
from __future__ import annotations

import threading
from dataclasses import dataclass

from lab.serving.scheduler import AdmissionPolicy, Scheduler


@dataclass(eq=False)
class FakeRequest:
    prompt_len: int = 10
    row: int = -1
    abandoned: bool = False
    cancel: threading.Event | None = None
    playing: bool = False


class FakeTime:
    """A clock, and arrivals at set times: a wait returns at its deadline or at the next arrival, as a notify
    would end it."""

    def __init__(self, arrivals: list[tuple[float, FakeRequest]] = ()):
        self.now_s = 0.0
        self.arrivals = sorted(arrivals, key=lambda a: a[0])
        self.scheduler: Scheduler | None = None

    def clock(self) -> float:
        return self.now_s

    def wait(self, condition, seconds: float) -> None:
        deadline = self.now_s + seconds
        if self.arrivals and self.arrivals[0][0] <= deadline:
            self.now_s, request = self.arrivals.pop(0)
            self.scheduler.waiting.append(request)
        else:
            self.now_s = deadline


def scheduler_with(rows: int, arrivals=(), **policy) -> tuple[Scheduler, FakeTime]:
    fake = FakeTime(list(arrivals))
    scheduler = Scheduler(rows, AdmissionPolicy(**policy), clock=fake.clock, wait=fake.wait)
    fake.scheduler = scheduler
    return scheduler, fake


def test_a_burst_at_an_idle_engine_is_admitted_at_once_and_a_late_arrival_waits():
    later = [FakeRequest() for _ in range(3)]
    straggler = FakeRequest()
    # 10 ms apart, inside a 15 ms quiet period; the straggler comes 40 ms after the last.
    scheduler, fake = scheduler_with(8, [(0.01, later[0]), (0.02, later[1]), (0.03, later[2]), (0.07, straggler)],
                                     quiet_s=0.015)
    first = FakeRequest()
    scheduler.add(first)
    cancelled, admitted = scheduler.next_frame(in_flight=False)
    assert cancelled == [] and admitted == [first, *later]
    assert [r.row for r in admitted] == [0, 1, 2, 3]
    assert fake.now_s == 0.03 + 0.015      # it waited for the quiet period after the last arrival, no longer
    assert list(scheduler.waiting) == [] and fake.arrivals == [(0.07, straggler)]


def test_gathering_ends_at_its_limit_while_arrivals_keep_coming():
    arrivals = [(0.004 * i, FakeRequest()) for i in range(1, 200)]
    scheduler, fake = scheduler_with(512, arrivals, quiet_s=0.005, gather_max_s=0.25)
    scheduler.add(FakeRequest())
    _, admitted = scheduler.next_frame(in_flight=False)
    assert fake.now_s <= 0.25 and len(admitted) == 1 + 62     # every arrival up to 0.248 s
    assert fake.arrivals[0][0] > 0.25


def test_while_streams_run_arrivals_wait_for_a_few_frames_or_a_full_batch():
    scheduler, _ = scheduler_with(16, every_frames=4, batch=3)
    running = FakeRequest(playing=True)
    scheduler.add(running)
    assert scheduler.next_frame(in_flight=False)[1] == [running]
    arrival = FakeRequest()
    scheduler.add(arrival)
    admitted_by_frame = [scheduler.next_frame(in_flight=True)[1] for _ in range(5)]
    assert admitted_by_frame == [[], [], [], [], [arrival]]    # the 5th frame boundary: 4 frames since the last
    crowd = [FakeRequest() for _ in range(3)]
    for request in crowd:
        scheduler.add(request)
    assert scheduler.next_frame(in_flight=True)[1] == crowd    # a full batch joins at the next boundary


def test_admissions_are_capped_only_while_a_stream_is_playing():
    """While a stream plays, a crowd's prefill joins a few prompts at a time (each admission delays the playing
    streams' next frame); before anyone plays, every waiting request that has a slot joins at once."""
    policy = AdmissionPolicy()
    per_prompt = policy.max_positions // 3 + 1    # two fit under the cap, three do not
    for playing, expected in ((True, 2), (False, 3)):
        scheduler, _ = scheduler_with(4)
        scheduler.slots[0] = FakeRequest(row=0, playing=playing)
        scheduler.waiting.extend(FakeRequest(prompt_len=per_prompt) for _ in range(3))
        assert len(scheduler.admissible(3)) == expected
        assert len(scheduler.waiting) == 3 - expected


def test_a_request_cancelled_while_it_waits_never_gets_a_slot():
    scheduler, _ = scheduler_with(4)
    gone, closed_page, kept = FakeRequest(cancel=threading.Event()), FakeRequest(abandoned=True), FakeRequest()
    gone.cancel.set()
    for request in (gone, closed_page, kept):
        scheduler.add(request)
    cancelled, admitted = scheduler.next_frame(in_flight=False)
    assert cancelled == [gone, closed_page] and admitted == [kept]
    assert scheduler.slots == [kept, None, None, None]


def test_more_requests_than_slots_wait_in_line_and_take_a_freed_slot():
    scheduler, _ = scheduler_with(2)
    first, second, third = FakeRequest(), FakeRequest(), FakeRequest()
    for request in (first, second, third):
        scheduler.add(request)
    assert scheduler.next_frame(in_flight=False)[1] == [first, second]
    assert [scheduler.place_in_line(r) for r in (first, second, third)] == [0, 0, 1]
    assert scheduler.release(first) and not scheduler.release(first)
    assert scheduler.next_frame(in_flight=True)[1] == [third] and third.row == 0
    assert scheduler.busy()


def test_close_wakes_a_scheduler_waiting_for_work():
    scheduler = Scheduler(2)
    answer = []
    waiter = threading.Thread(target=lambda: answer.append(scheduler.next_frame(in_flight=False)))
    waiter.start()
    scheduler.close()
    waiter.join(timeout=5)
    assert not waiter.is_alive() and answer == [None]
