"""The registry and its state machine, without an event loop."""

from datetime import UTC, datetime, timedelta

import pytest

from cylindria.core.records import JobState, isoformat
from cylindria.core.registry import Registry
from cylindria.core.workflow import plan_nodes
from cylindria.errors import JobConflict


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def reg(clock: Clock) -> Registry:
    return Registry(clock=clock)


def begin(reg: Registry, job_id: str = "j1", pid: str = "p1", nodes=("1", "2", "3"),
          fp: str = "fp") -> object:
    job = reg.begin(job_id, 0, pid, fp, nodes)
    reg.confirm(job)
    return job


def test_new_job_is_queued_with_iso_timestamps(reg):
    job = begin(reg)
    assert job.state is JobState.QUEUED and job.detail == "Queued on ComfyUI."
    assert isoformat(job.submitted_at) == "2026-01-02T03:04:05.000Z"
    assert job.progress == 0.0
    assert job.prompt_id == "p1"
    assert job.started_at is None and job.finished_at is None


def test_full_lifecycle_reaches_exactly_one_at_completion(reg, clock):
    job = begin(reg)
    clock.advance(1)
    reg.on_start("p1")
    assert job.state is JobState.RUNNING and job.started_at == clock.now
    reg.on_cached("p1", [])
    reg.on_executing("p1", "1")
    reg.on_executing("p1", "2")
    assert job.progress == pytest.approx(1 / 3, abs=1e-3)
    reg.on_progress("p1", "2", 5, 10)
    assert job.progress == pytest.approx(1.5 / 3, abs=1e-3)
    assert job.node_progress == {"node": "2", "value": 5, "max": 10}
    reg.on_executing("p1", "3")
    reg.on_executed("p1", "3", {"images": [{"filename": "a.png"}]})
    assert job.progress < 1.0
    clock.advance(2)
    reg.on_success("p1")
    assert job.state is JobState.COMPLETED
    assert job.progress == 1.0
    assert job.finished_at == clock.now
    assert job.output_map() == {"3": {"images": [{"filename": "a.png"}]}}
    assert job.queue_position is None and job.current_node is None


def test_cached_nodes_count_as_done_and_full_cache_marks_reuse(reg):
    job = begin(reg)
    reg.on_cached("p1", ["1", "2"])
    assert job.progress == pytest.approx(2 / 3, abs=1e-3)
    reg.on_executed("p1", "3", {"images": [{"filename": "new.png"}]})
    assert not job.outputs_reused
    job2 = begin(reg, "j2", "p2")
    reg.on_cached("p2", ["1", "2", "3"])
    reg.on_executed("p2", "3", {"images": [{"filename": "old.png"}]})
    assert job2.outputs_reused


def test_outputs_are_normalised_in_a_stable_order(reg):
    job = begin(reg)
    reg.on_executed("p1", "3", {"images": [{"filename": "a.png", "subfolder": "s",
                                            "type": "output"},
                                           {"filename": "b.png", "subfolder": "",
                                            "type": "temp"}],
                                "animated": [False]})
    reg.on_executed("p1", "2", {"text": ["hello"], "gifs": [{"filename": "c.gif"}]})
    reg.on_executed("p1", "1", {"audio": [{"filename": "d.flac", "subfolder": "au",
                                           "type": "output"}],
                                "videos": [{"filename": "e.mp4", "type": "output"}]})
    entries = job.output_entries()
    assert [(e["node_id"], e["kind"]) for e in entries] == [
        ("3", "image"), ("3", "image"), ("2", "text"), ("2", "gif"), ("1", "audio"),
        ("1", "video")]
    assert entries[0] == {"node_id": "3", "kind": "image", "filename": "a.png",
                          "subfolder": "s", "type": "output"}
    assert entries[2] == {"node_id": "2", "kind": "text", "text": "hello"}
    assert entries[3]["subfolder"] == "" and entries[3]["type"] == "output"
    assert entries[5]["filename"] == "e.mp4"


def test_cancel_waits_for_comfyui_and_a_late_cancel_completes(reg):
    queued, running, late = begin(reg, "q", "pq"), begin(reg, "r", "pr"), begin(reg, "l", "pl")
    for job in (queued, running, late):
        reg.request_cancel(job)
        assert job.state in (JobState.QUEUED, JobState.RUNNING)
    assert reg.confirm_removed(queued) and queued.state is JobState.CANCELLED
    reg.on_start("pr")
    reg.on_interrupted("pr", {"node_id": "3", "node_type": "KSampler"})
    assert running.state is JobState.CANCELLED and "interrupted" in running.detail
    reg.on_start("pl")
    reg.on_success("pl")
    assert late.state is JobState.COMPLETED and "too late" in late.detail
    other = begin(reg, "o", "po")
    assert not reg.confirm_removed(other) and other.state is JobState.QUEUED


def test_page_is_newest_first_with_filters_and_cursor(reg):
    jobs = [begin(reg, f"j{n}", f"p{n}") for n in range(5)]
    reg.on_success("p1")
    assert [j.job_id for j in reg.page(limit=2)] == ["j4", "j3"]
    assert [j.job_id for j in reg.page(before=jobs[3].seq, limit=2)] == ["j2", "j1"]
    assert [j.job_id for j in reg.page(states={"completed"})] == ["j1"]
    assert reg.page(gpu_id=1) == []


def test_terminal_state_never_goes_back(reg):
    job = begin(reg)
    reg.on_error("p1", {"node_id": "2", "node_type": "SaveImage", "exception_type": "Exception",
                        "exception_message": "boom\n", "traceback": ["a", "b"]})
    assert job.state is JobState.FAILED
    assert job.error["type"] == "Exception" and job.error["message"] == "boom"
    assert "node 2 (SaveImage)" in job.detail
    for late in (lambda: reg.on_start("p1"), lambda: reg.on_executing("p1", "3"),
                 lambda: reg.on_progress("p1", "3", 1, 2), lambda: reg.on_success("p1"),
                 lambda: reg.on_interrupted("p1", {})):
        late()
        assert job.state is JobState.FAILED
    assert job.progress < 1.0


def test_duplicate_events_are_harmless(reg):
    job = begin(reg)
    reg.on_start("p1")
    reg.on_start("p1")
    reg.on_success("p1")
    first_finish = job.finished_at
    reg.on_success("p1")
    assert job.state is JobState.COMPLETED and job.finished_at == first_finish


def test_events_for_unknown_prompts_are_ignored(reg):
    reg.on_start("nope")
    reg.on_executing(None, "1", gpu_id=0)
    reg.on_success("nope")
    assert len(reg) == 0


def test_reconnect_hint_without_prompt_id_goes_to_the_gpus_running_job(reg):
    job = begin(reg)
    reg.on_start("p1")
    reg.on_executing(None, "2", gpu_id=0)
    assert job.current_node == "2"


def test_set_queue_gives_positions_and_returns_vanished_jobs(reg):
    a, b, c = begin(reg, "a", "pa"), begin(reg, "b", "pb"), begin(reg, "c", "pc")
    gone = reg.set_queue(0, ["pa"], ["pc", "pb"])
    assert gone == []
    assert (a.state, a.queue_position) == (JobState.RUNNING, 0)
    assert c.queue_position == 1 and b.queue_position == 2
    assert "position 2" in b.detail
    gone = reg.set_queue(0, ["pc"], ["pb"])
    assert gone == [a]


def test_unconfirmed_submission_is_not_reported_vanished(reg):
    reg.begin("a", 0, "pa", "fp", ["1"])
    assert reg.set_queue(0, [], []) == []


def test_settle_from_history_success_error_and_interrupt(reg):
    ok, bad, intr = begin(reg, "a", "pa"), begin(reg, "b", "pb"), begin(reg, "c", "pc")
    reg.settle_from_history("pa", {
        "outputs": {"3": {"images": [{"filename": "x.png", "subfolder": "", "type": "output"}]}},
        "status": {"status_str": "success", "completed": True,
                   "messages": [["execution_start", {}], ["execution_cached", {"nodes": []}],
                                ["execution_success", {}]]}})
    assert ok.state is JobState.COMPLETED
    assert ok.output_map()["3"]["images"][0]["filename"] == "x.png"
    reg.settle_from_history("pb", {"outputs": {}, "status": {
        "status_str": "error", "completed": False,
        "messages": [["execution_start", {}],
                     ["execution_error", {"node_id": "2", "node_type": "SaveImage",
                                          "exception_type": "Exception",
                                          "exception_message": "nope\n"}]]}})
    assert bad.state is JobState.FAILED and bad.error["node_id"] == "2"
    reg.settle_from_history("pc", {"outputs": {}, "status": {
        "status_str": "error", "completed": False,
        "messages": [["execution_start", {}],
                     ["execution_interrupted", {"node_id": "3",
                                                "node_type": "SaveImageWebsocket"}]]}})
    assert intr.state is JobState.FAILED and intr.error["type"] == "interrupted"


def test_missing_job_fails_only_after_grace(reg, clock):
    job = begin(reg)
    assert not reg.note_missing(job, 5, "lost")
    clock.advance(4)
    assert not reg.note_missing(job, 5, "lost")
    assert job.state is JobState.QUEUED
    clock.advance(2)
    assert reg.note_missing(job, 5, "lost")
    assert job.state is JobState.FAILED and job.detail == "lost"


def test_reappearing_in_queue_resets_the_grace(reg, clock):
    job = begin(reg)
    reg.note_missing(job, 5, "lost")
    reg.set_queue(0, [], ["p1"])
    assert job.missing_since is None


def test_rejected_job_id_may_be_reused_but_not_a_live_one(reg):
    job = reg.begin("j", 0, "p1", "fp", ["1"])
    reg.reject(job, "bad input")
    assert job.state is JobState.REJECTED and job.detail == "bad input"
    again = reg.begin("j", 0, "p2", "fp2", ["1"])
    assert reg.get("j") is again and reg.by_prompt("p1") is None
    with pytest.raises(JobConflict):
        reg.begin("j", 0, "p3", "fp3", ["1"])


def test_plan_nodes_follows_links_back_from_outputs():
    prompt = {"1": {"class_type": "A", "inputs": {}},
              "2": {"class_type": "B", "inputs": {"x": ["1", 0]}},
              "3": {"class_type": "C", "inputs": {"y": ["2", 0], "s": "text"}},
              "9": {"class_type": "Unused", "inputs": {}}}
    assert plan_nodes(prompt, ["3"]) == {"1", "2", "3"}


def test_progress_uses_the_plan_when_known(reg):
    job = begin(reg, nodes=("1", "2", "3", "9"))
    reg.set_plan("p1", frozenset({"1", "2", "3"}))
    reg.on_executing("p1", "1")
    reg.on_executing("p1", "2")
    assert job.progress == pytest.approx(1 / 3, abs=1e-3)


def test_finished_jobs_beyond_the_memory_bound_leave_once_the_journal_has_them(clock):
    reg = Registry(clock=clock, memory_jobs=3)
    live = reg.begin("live", 0, "pl", "f", ["1"])
    done = []
    for n in range(5):
        job = reg.begin(f"done{n}", 0, f"p{n}", "f", ["1"])
        reg.reject(job, "x")
        done.append(job)
    assert len(reg) == 6 and reg.evicted_through == 0
    reg.saved([(job, job.version) for job in done[:2]])
    assert reg.get("done0") is None and reg.get("done1") is None
    assert reg.get("done2") is done[2] and reg.evicted_through == done[1].seq
    reg.saved([(job, job.version) for job in done])
    assert len(reg) == 4 and reg.get("live") is live and live.state is JobState.QUEUED
    assert [j.job_id for j in reg.page(limit=10)] == ["done4", "done3", "done2", "live"]
    assert [j.job_id for j in reg.page(limit=10, floor=reg.evicted_through)] == [
        "done4", "done3", "done2"]


def test_subscribers_see_every_change(reg):
    seen = []
    reg.subscribe(lambda job: seen.append(job.state.value))
    begin(reg)
    reg.on_start("p1")
    reg.on_success("p1")
    assert seen[0] == "queued" and seen[-1] == "completed"


def test_indexes_answer_per_gpu_and_per_state_questions(reg):
    jobs = {}
    for n in range(9):
        job = reg.begin(f"j{n}", n % 3, f"p{n}", "f", ["1"])
        reg.confirm(job)
        jobs[n] = job
    reg.on_start("p0")
    reg.on_start("p1")
    reg.on_success("p3")
    reg.on_error("p4", {"exception_message": "x"})
    assert [reg.load(g) for g in range(3)] == [2, 2, 3]
    assert reg.running_on(0) is jobs[0] and reg.running_on(2) is None
    assert reg.queued_count(0) == 1 and reg.in_flight_count() == 7
    assert reg.counts() == {"queued": 5, "running": 2, "completed": 1, "failed": 1,
                            "cancelled": 0, "rejected": 0}
    ids = lambda found: [j.job_id for j in found]  # noqa: E731
    assert ids(reg.page(gpu_id=1)) == ["j7", "j4", "j1"]
    assert ids(reg.page(states={"queued"}, gpu_id=2)) == ["j8", "j5", "j2"]
    assert ids(reg.page(states={"completed", "failed"})) == ["j4", "j3"]
    assert ids(reg.page(states={"queued", "running"}, before=jobs[5].seq, limit=3)) == [
        "j2", "j1", "j0"]
    assert ids(reg.page(limit=2, before=jobs[2].seq)) == ["j1", "j0"]


def test_a_retry_is_a_new_attempt_that_moves_in_every_index(reg, clock):
    job = begin(reg, "again", "p-first")
    reg.on_error("p-first", {"exception_message": "boom", "node_id": "2"})
    first_seq = job.seq
    other = begin(reg, "other", "p-other")
    clock.advance(5)
    reg.retry(job, gpu_id=1, prompt_id="p-second", nodes=["1", "2", "3"])
    assert job.state is JobState.QUEUED and job.attempt == 2 and job.gpu_id == 1
    assert job.seq > other.seq > first_seq
    assert reg.by_prompt("p-second") is job and reg.by_prompt("p-first") is None
    assert reg.load(0) == 1 and reg.load(1) == 1
    assert [j.job_id for j in reg.page(limit=5)] == ["again", "other"]
    assert job.error is None and job.finished_at is None and job.output_map() == {}
    (earlier,) = job.earlier_attempts
    assert earlier["prompt_id"] == "p-first" and earlier["state"] == "failed"
    assert earlier["error"]["message"] == "boom" and earlier["gpu_id"] == 0
    assert [a["attempt"] for a in job.attempts()] == [1, 2]
    reg.on_success("p-first")  # a late event of the old attempt changes nothing
    assert job.state is JobState.QUEUED
