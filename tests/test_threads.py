"""Serving threads follow the container's CPU quota (cgroup v2 or v1), not the cores the host shows."""

from __future__ import annotations

import pytest

from inference import threads


@pytest.fixture
def visible(monkeypatch):
    """Pretend this process may run on 16 CPUs, as on a large shared host, and no OMP_NUM_THREADS is set."""
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)


@pytest.mark.parametrize(
    "files, expected",
    [
        ({"cpu.max": "200000 100000\n"}, 2),  # a CPU Basic Space: 2 vCPUs on a bigger host
        ({"cpu.max": "150000 100000\n"}, 1),  # 1.5 CPUs: a second thread would only be throttled
        ({"cpu.max": "max 100000\n"}, 16),  # unlimited
        ({"cpu/cpu.cfs_quota_us": "400000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 4),  # cgroup v1
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, 16),  # v1 unlimited
        ({}, 16),  # no cgroup files
    ],
)
def test_threads_follow_the_cgroup_quota(tmp_path, visible, files, expected):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert threads.choose_threads(tmp_path)[0] == expected


def test_the_choice_is_applied_and_said(tmp_path, visible, capsys):
    (tmp_path / "cpu.max").write_text("200000 100000\n")
    before = threads.torch.get_num_threads()
    try:
        assert threads.set_threads(tmp_path) == 2 and threads.torch.get_num_threads() == 2
    finally:
        threads.torch.set_num_threads(before)
    assert "Using 2 CPU threads (cgroup CPU quota 2 of 16 visible CPUs)" in capsys.readouterr().out


def test_an_explicit_omp_num_threads_wins(tmp_path, monkeypatch):
    (tmp_path / "cpu.max").write_text("100000 100000\n")
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads.choose_threads(tmp_path) == (threads.torch.get_num_threads(), "OMP_NUM_THREADS")
