"""Block sizes of Ray Data datasets (`in_blocks_of`), with every CPU held by others."""

import threading
import time

import pytest
import ray.data

pytestmark = pytest.mark.usefixtures("ray_local")


def test_in_blocks_of_cuts_blocks_with_less_than_a_cpu_free():
    """A stage's input is cut into engine-batch blocks even while engine actors or a Serve replica hold the CPUs
    (Dataset.repartition's whole-CPU tasks would wait forever there)."""
    from leaml_ray.data.blocks import in_blocks_of

    @ray.remote
    class Holder:
        def ready(self) -> bool:
            return True

    def free() -> float:
        return ray.available_resources().get("CPU", 0.0)

    seen = [free()]
    while len(seen) < 3 or len(set(seen[-3:])) > 1:  # the last test's actors give their CPUs back a bit later
        time.sleep(0.5)
        seen.append(free())
        assert len(seen) < 60, f"CPUs never settled: {seen}"
    holders = []
    try:
        while free() >= 1:
            assert len(holders) < 5, f"cannot hold the CPUs: {free()} free"
            holders.append(Holder.options(num_cpus=free() - 0.5).remote())
            ray.get(holders[-1].ready.remote(), timeout=60)
        rows = [{"k": k} for k in range(12)]
        done = {}
        cut = lambda: done.update(out=in_blocks_of(ray.data.from_items(rows, override_num_blocks=1), 4).materialize())  # noqa: E731
        worker = threading.Thread(target=cut, daemon=True)
        worker.start()
        worker.join(120)  # a whole-CPU task never gets scheduled: fail instead of hanging the suite
        assert "out" in done, "in_blocks_of did not finish with less than a CPU free"
        out = done["out"]
        assert out.num_blocks() == 3
        assert sorted(r["k"] for r in out.take_all()) == list(range(12))
    finally:
        for holder in holders:
            ray.kill(holder)
