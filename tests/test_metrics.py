import json

import numpy as np
import pytest

from lab.measure import history
from lab.measure.metrics import AUDIBLE_DBFS, PHASES, Timeline, audible_index, figures, summarize, underruns


def timeline(stamps: dict, chunks: list[tuple[float, float]]) -> Timeline:
    t = Timeline()
    t.events = [("request", 0.0)] + [(k, v) for k, v in stamps.items()]
    t.chunks = chunks
    return t


def test_ttfb_phases_rtf_on_a_hand_built_timeline():
    t = timeline({"session": 0.010, "prefill": 0.050, "generator": 0.051, "first_frame": 0.080, "first_decode": 0.095},
                 [(0.100, 0.16), (0.200, 0.32), (0.400, 0.64)])
    f = figures(t)
    assert f["ttfb_ms"] == pytest.approx(100.0)
    assert f["phases_ms"] == pytest.approx({"session": 10, "prefill": 40, "generator": 1, "first_frame": 29,
                                            "first_decode": 20})
    assert sum(f["phases_ms"].values()) == pytest.approx(f["ttfb_ms"])
    assert f["audio_s"] == pytest.approx(1.12)
    assert f["rtf"] == pytest.approx(0.400 / 1.12)
    assert f["steady_rtf"] == pytest.approx((0.400 - 0.100) / (1.12 - 0.16))
    assert f["underruns"] == 0 and f["stall_s"] == 0


def test_missing_phase_stamps_count_as_zero_and_phases_still_sum():
    f = figures(timeline({"prefill": 0.030}, [(0.050, 0.5)]))
    assert set(f["phases_ms"]) == set(PHASES)
    assert f["phases_ms"]["session"] == 0 and f["phases_ms"]["prefill"] == pytest.approx(30)
    assert sum(f["phases_ms"].values()) == pytest.approx(f["ttfb_ms"])


def test_underruns_counts_late_chunks_and_stall_seconds():
    # Player starts at 1.0 with 0.2 s of audio; the second chunk is due at 1.2 but comes at 1.5 (0.3 s stall),
    # then plays 0.2 s until 1.7; the third comes at 1.6, in time.
    assert underruns([(1.0, 0.2), (1.5, 0.2), (1.6, 0.5)]) == (1, pytest.approx(0.3))
    # RTF below 1 overall, yet a stall: the last chunk is late after a tiny first chunk.
    late, stall = underruns([(0.1, 0.08), (0.3, 2.0)])
    assert late == 1 and stall == pytest.approx(0.12)


def test_summary_uses_min_max_for_few_runs_and_p10_p90_for_many_with_tails():
    few = summarize([3.0, 1.0, 2.0])
    assert (few["median"], few["lo"], few["hi"], few["n"]) == (2.0, 1.0, 3.0, 3)
    many = summarize([float(i) for i in range(101)])
    assert many["median"] == 50.0 and many["lo"] == pytest.approx(10.0) and many["hi"] == pytest.approx(90.0)
    assert many["p90"] == pytest.approx(90.0) and many["p99"] == pytest.approx(99.0)


def test_first_audible_is_the_first_10ms_window_at_minus_50_dbfs_and_its_chunk_stamp():
    rate = 24000
    quiet = np.full(rate // 10, 10 ** ((AUDIBLE_DBFS - 6) / 20), np.float32)      # 100 ms at -56 dBFS: silence
    loud = np.full(rate // 10, 10 ** ((AUDIBLE_DBFS + 6) / 20), np.float32)       # 100 ms at -44 dBFS
    assert audible_index(quiet, rate) == -1 and audible_index(loud, rate) == 0
    assert audible_index(np.concatenate([quiet, loud]), rate) == len(quiet)
    t = timeline({}, [])
    for stamp, samples in ((0.05, quiet), (0.15, np.concatenate([quiet, loud]))):
        t.chunks.append((stamp, len(samples) / rate))
        t.listen(samples, rate)
    f = figures(t)
    assert f["ttfb_ms"] == pytest.approx(50.0) and f["first_audible_ms"] == pytest.approx(150.0)
    assert f["first_audible_s"] == pytest.approx(0.2)       # 100 ms in the first chunk + 100 ms in the second
    silent = timeline({}, [(0.05, 0.1)])
    silent.listen(quiet, rate)
    assert figures(silent)["first_audible_ms"] is None


def test_history_survives_a_writer_killed_mid_line(tmp_path):
    path = str(tmp_path / "history.jsonl")
    history.append(path, {"run": 1})
    with open(path, "ab") as f:
        f.write(b'{"run": 2, "ttfb_ms": 12')        # what a kill mid-write leaves
    assert history.read(path) == [{"run": 1}]
    history.append(path, {"run": 3})
    assert history.read(path) == [{"run": 1}, {"run": 3}]
    lines = open(path).read().splitlines()
    assert json.loads(lines[-1]) == {"run": 3}
