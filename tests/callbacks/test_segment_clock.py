"""SegmentClock: milliseconds per step by segment with validation runs left out, and the validation runs' time."""
import pytest

from recon.callbacks.mesh_export import SegmentClock


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_segments_leave_validation_out_and_count_syncs():
    clock, syncs = FakeClock(), []
    seg = SegmentClock(10, sync=lambda: syncs.append(clock.now), clock=clock)
    seg.start(0)
    for step in range(1, 26):
        clock.now += 0.02  # 20 ms a step
        seg.step_end(step, last=step == 25)
        if step == 15:  # a validation run of 0.5 s after step 15
            seg.validation_start()
            clock.now += 0.5
            seg.validation_end()
    out = seg.summary()
    assert [s["steps"] for s in out["segments"]] == [[0, 10], [10, 20], [20, 25]]
    for s in out["segments"]:
        assert s["ms_per_step"] == pytest.approx(20.0)
    assert out["segments"][1]["validation_seconds"] == pytest.approx(0.5) and out["segments"][0]["validation_seconds"] == 0
    assert out["validation"] == {"runs": 1, "seconds": pytest.approx(0.5)}
    assert len(syncs) == 1 + 3 + 2  # the start, each segment's end, the validation run's two ends


def test_resumed_fit_starts_at_its_step_and_bad_length_is_refused():
    clock = FakeClock()
    seg = SegmentClock(5, clock=clock)
    seg.step_end(5)  # before start(): nothing recorded
    seg.start(7)  # resumed at step 7
    for step in range(8, 16):
        clock.now += 0.01
        seg.step_end(step)
    assert [s["steps"] for s in seg.summary()["segments"]] == [[7, 10], [10, 15]]
    seg.validation_end()  # without a start: ignored
    assert seg.summary()["validation"] == {"runs": 0, "seconds": 0.0}
    with pytest.raises(ValueError, match="segment_steps"):
        SegmentClock(0)
