"""The accelerator tests once per queue engine in the accelerator process:
"native" (the C engine, which the process must then use) and "python" (the
reference QueueEngine, still used for backends without a plain fd).
test_nvme_accelerator.py itself runs with the default choice ("auto")."""
from __future__ import annotations

import pytest

pytest.importorskip("hvkit._nvme_native")

from test_nvme_accelerator import (  # noqa: E402,F401  (collected again here)
    rig, test_intx_through_the_accelerator, test_queue_delete_and_reset_reach_the_accelerator,
    test_queue_depth_and_batching, test_read_write_through_the_accelerator,
    test_restart_keeps_acknowledged_writes, test_steady_state_needs_no_mmio_doorbells)
from test_nvme_hostile import test_random_guest_against_the_accelerator  # noqa: E402,F401


@pytest.fixture(autouse=True, params=["native", "python"])
def engine(request, monkeypatch):
    monkeypatch.setenv("HVKIT_NVME_ENGINE", request.param)
    return request.param


def test_the_process_runs_the_chosen_engine(tmp_path, engine):
    from test_nvme_accelerator import Rig
    r = Rig(tmp_path, "ioeventfd")
    try:
        assert r.acc.stats()["engine"] == engine
    finally:
        r.close()
