"""The workspace layout and the service record: one reader and writer of services/NAME/service.json
that tells a running gateway from a dead one and from a later process that reused its pid."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from distml.core.layout import ServiceRecord, run_dir, service_dir, workflow_dir


def test_the_folders_of_a_workspace(tmp_path):
    assert run_dir(tmp_path, "r1") == tmp_path / "runs" / "r1"
    assert workflow_dir(str(tmp_path), "w1") == tmp_path / "workflows" / "w1"
    assert service_dir(tmp_path, "svc") == tmp_path / "services" / "svc"


def test_a_record_of_this_process_round_trips_and_is_alive(tmp_path):
    record = ServiceRecord.for_this_process("svc", "http://0.0.0.0:8080", "cnn:1")
    assert record.url == "http://127.0.0.1:8080", "a wildcard address is recorded as one a client can reach"
    record.write(tmp_path)
    assert ServiceRecord.read(tmp_path, "svc") == record
    assert ServiceRecord.all(tmp_path) == [record]
    swapped = record.serving("cnn:2")
    swapped.write(tmp_path)
    assert ServiceRecord.read(tmp_path, "svc").model == "cnn:2"


def test_a_dead_gateway_or_a_reused_pid_is_not_running(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    ServiceRecord("dead", "http://127.0.0.1:1", "cnn:1", gone.pid, "12345").write(tmp_path)
    # this process's pid, but another start time: a later process that reused the recorded pid
    ServiceRecord("reused", "http://127.0.0.1:2", "cnn:1", os.getpid(), "not-my-start-time").write(tmp_path)
    live = ServiceRecord.for_this_process("live", "http://127.0.0.1:3", "cnn:1")
    live.write(tmp_path)
    assert ServiceRecord.read(tmp_path, "dead") is None and ServiceRecord.read(tmp_path, "reused") is None
    assert ServiceRecord.read(tmp_path, "dead", alive=False).pid == gone.pid, "still readable for clean-up"
    assert [r.name for r in ServiceRecord.all(tmp_path)] == ["live"]
    assert [r.name for r in ServiceRecord.all(tmp_path, alive=False)] == ["dead", "live", "reused"]


def test_forget_removes_only_its_own_record(tmp_path):
    mine = ServiceRecord.for_this_process("svc", "http://127.0.0.1:1", "cnn:1")
    mine.write(tmp_path)
    later = ServiceRecord("svc", "http://127.0.0.1:2", "cnn:1", mine.pid + 1, "other")
    assert later.forget(tmp_path) is False and ServiceRecord.read(tmp_path, "svc") == mine
    assert mine.forget(tmp_path) is True
    assert not (service_dir(tmp_path, "svc") / "service.json").exists()
    assert mine.forget(tmp_path) is False


def test_an_unreadable_record_counts_as_none(tmp_path):
    folder = service_dir(tmp_path, "svc")
    folder.mkdir(parents=True)
    for text in ("{not json", "[]", json.dumps({"url": "http://x"}), json.dumps({"url": 1, "model": "m", "pid": "x"})):
        (folder / "service.json").write_text(text)
        assert ServiceRecord.read(tmp_path, "svc", alive=False) is None, text
    assert ServiceRecord.read(tmp_path, "absent") is None
