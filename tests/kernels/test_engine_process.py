"""What the plugin adds to vLLM's processes: the status the gateway checks, and children that
exit with their parent (run here with real processes, as vLLM starts them: multiprocessing)."""

from __future__ import annotations

import importlib
import multiprocessing
import os
import time
from pathlib import Path

import pytest

from kernels import cpu_lora_ops
from kernels.engine_process import exit_with_parent, plugin_status


def test_the_status_says_whether_every_namespace_binds_the_masked_ops(
    monkeypatch: pytest.MonkeyPatch,
):
    cpu_lora_ops.install()
    assert plugin_status()["cpu_ops_masked"] is True
    module = importlib.import_module(cpu_lora_ops.NAMESPACES[-1])
    name = next(iter(cpu_lora_ops.REPLACEMENTS))
    monkeypatch.setattr(module, name, lambda *args: None)  # e.g. vLLM's own, the plugin absent
    assert plugin_status()["cpu_ops_masked"] is False


def test_a_process_not_started_by_multiprocessing_keeps_its_own_lifetime():
    assert exit_with_parent() is False  # the gateway (here: pytest) is nobody's child


def _grandchild(pids) -> None:
    exit_with_parent(poll_s=0.05)
    pids.put(os.getpid())
    time.sleep(60)


def _child(pids) -> None:
    context = multiprocessing.get_context("spawn")
    context.Process(target=_grandchild, args=(pids,)).start()
    time.sleep(30)  # killed by the test


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"  # a zombie has exited; only its parent's reaping is left


def _grandchild_left_when_its_parent_is_killed(child_target) -> bool:
    """Start `child_target` (which starts a grandchild), SIGKILL the child (no clean-up of its
    own children, as the OOM killer does) and say whether the grandchild still runs 10 s on."""
    context = multiprocessing.get_context("spawn")
    pids = context.Queue()
    child = context.Process(target=child_target, args=(pids,))
    child.start()
    grandchild = pids.get(timeout=60)
    assert _running(grandchild)
    child.kill()
    child.join(10)
    deadline = time.monotonic() + 10
    while _running(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    return _running(grandchild)


def test_an_engine_process_exits_when_the_process_that_started_it_is_killed():
    assert not _grandchild_left_when_its_parent_is_killed(_child)


def _late_grandchild(pids) -> None:
    pids.put(os.getpid())
    parent = multiprocessing.parent_process()
    assert parent is not None
    while os.getppid() == parent.pid:  # the plugin loads only after the gateway is gone
        time.sleep(0.02)
    exit_with_parent(poll_s=0.05)
    time.sleep(60)


def _short_lived_child(pids) -> None:
    context = multiprocessing.get_context("spawn")
    context.Process(target=_late_grandchild, args=(pids,)).start()
    time.sleep(30)  # killed by the test


def test_an_engine_process_whose_parent_died_before_the_plugin_loaded_exits_too():
    # a gateway stopped while vLLM's engine process was still importing
    assert not _grandchild_left_when_its_parent_is_killed(_short_lived_child)


def _stays(queue) -> None:
    exit_with_parent(poll_s=0.05)
    time.sleep(1.0)
    queue.put("still alive")


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_an_engine_process_whose_parent_lives_keeps_running(method):
    # Under forkserver getppid is the fork server, not the parent: comparing the two killed
    # the child at once.
    context = multiprocessing.get_context(method)
    queue = context.Queue()
    child = context.Process(target=_stays, args=(queue,))
    child.start()
    child.join(10)
    assert queue.get(timeout=5) == "still alive" and child.exitcode == 0
