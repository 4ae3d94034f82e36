"""coordinator.periodic: the loop the background watches run on."""

from __future__ import annotations

import threading

from coordinator.periodic import start_periodic


def test_a_tick_that_raises_is_logged_and_the_loop_goes_on_until_stopped():
    calls, enough, stop = [], threading.Event(), threading.Event()

    def tick():
        calls.append(len(calls))
        if len(calls) >= 3:
            enough.set()
        if len(calls) == 1:
            raise RuntimeError("a broken check")

    thread = start_periodic("test-periodic", 0.01, tick, stop)
    assert enough.wait(10), calls
    stop.set()
    thread.join(10)
    assert not thread.is_alive()
    assert thread.daemon and thread.name == "test-periodic"
    assert calls[:3] == [0, 1, 2]
