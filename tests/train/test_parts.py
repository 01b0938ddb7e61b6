"""Pieces of the trainer that need no process group: sharding of parameters, checkpoints."""

from __future__ import annotations

import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from distml.core.errors import DistmlError
from distml.models.zoo import build_model
from distml.train import checkpoint
from distml.train.config import parse_config
from distml.train.launcher import torchrun_args
from distml.train.parameter_server import PSServer, ShardLayout


def test_parameter_shards_are_equal_contiguous_ranges_covering_every_parameter():
    params = list(build_model("mlp", width=512, depth=3).parameters())
    total = sum(p.numel() for p in params)
    whole = torch.cat([p.detach().reshape(-1) for p in params])
    for shards in (1, 2, 3, 4):
        layout = ShardLayout.balanced(params, shards)
        assert layout.bounds[0][0] == 0 and layout.bounds[-1][1] == total
        assert all(a[1] == b[0] for a, b in zip(layout.bounds, layout.bounds[1:])), "no gap, no overlap"
        assert max(layout.numels) - min(layout.numels) <= 1, "each server carries 1/S of the traffic"
        assert torch.equal(torch.cat([layout.flat(params, k) for k in range(shards)]), whole)
    with pytest.raises(ValueError, match="at least one parameter server"):
        ShardLayout.balanced(params, 0)


def test_a_shard_checkpoint_of_another_layout_is_refused_and_the_server_keeps_its_state():
    server = PSServer(0, torch.arange(6.0), [1], lr=0.1, mode="sync", optimizer="sgd")
    other = PSServer(0, torch.zeros(4), [1], lr=0.1, mode="sync", optimizer="sgd")
    with pytest.raises(DistmlError, match="holds 4 parameters, this layout gives it 6.*--ps-shards"):
        server.load_state_dict(other.state_dict())
    assert torch.equal(server.param.data, torch.arange(6.0))


def test_checkpoint_roundtrip_rng_and_latest(tmp_path):
    checkpoint.save_part(tmp_path, 10, "trainer", {"w": torch.arange(3), "rng": checkpoint.rng_state()})
    assert checkpoint.latest_step(tmp_path) is None, "a part alone is not a checkpoint until committed"
    checkpoint.commit(tmp_path, 10)
    assert checkpoint.latest_step(tmp_path) == 10
    checkpoint.load_part(tmp_path, 10, "trainer")
    saved = checkpoint.rng_state()
    a = (torch.rand(2).tolist(), np.random.rand(), random.random())
    checkpoint.set_rng_state(saved)
    assert (torch.rand(2).tolist(), np.random.rand(), random.random()) == a, "RNG state restores exactly"
    for step in (20, 30, 40):
        checkpoint.save_part(tmp_path, step, "trainer", {})
        checkpoint.commit(tmp_path, step, keep=2)
    kept = sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*"))
    assert kept == ["step-00000030", "step-00000040"]


def test_damaged_checkpoints_are_clear_errors(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "LATEST").write_text("garbage")
    with pytest.raises(DistmlError, match="should hold a step number"):
        checkpoint.latest_step(tmp_path)
    with pytest.raises(DistmlError, match="missing"):
        checkpoint.load_part(tmp_path, 5, "trainer")
    path = checkpoint.step_dir(tmp_path, 5) / "trainer.pt"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(DistmlError, match="cannot be read"):
        checkpoint.load_part(tmp_path, 5, "trainer")


def test_torchrun_arguments(tmp_path):
    single = torchrun_args(parse_config({"parallelism": {"workers": 2}}), tmp_path / "c.json")
    assert "--standalone" in single and single[single.index("--nproc-per-node") + 1] == "2"
    multi = torchrun_args(
        parse_config(
            {
                "parallelism": {"workers": 1, "nnodes": "1:2", "rdzv_endpoint": "127.0.0.1:29400"},
                "checkpoint": {"max_restarts": 3},
            }
        ),
        tmp_path / "c.json",
    )
    assert multi[multi.index("--rdzv-backend") + 1] == "c10d" and "--standalone" not in multi
    conf = multi[multi.index("--rdzv-conf") + 1].split(",")
    assert {"last_call_timeout=5", "keep_alive_interval=5", "keep_alive_max_attempt=3"} <= set(conf), conf
    tuned = torchrun_args(
        parse_config(
            {
                "parallelism": {
                    "nnodes": "1:2",
                    "rdzv_endpoint": "h:1",
                    "rdzv_last_call_timeout": 1,
                    "rdzv_keep_alive": 2,
                }
            }
        ),
        tmp_path / "c.json",
    )
    conf = tuned[tuned.index("--rdzv-conf") + 1].split(",")
    assert {"last_call_timeout=1", "keep_alive_interval=2"} <= set(conf), conf
    assert multi[multi.index("--max-restarts") + 1] == "3"
    ps = torchrun_args(
        parse_config({"parallelism": {"workers": 2, "strategy": "parameter-server", "ps_shards": 3}}), tmp_path / "c"
    )
    assert ps[ps.index("--nproc-per-node") + 1] == "5", "servers run beside the workers"
    from distml.train import worker

    # the workers are forked from a forkserver that imported the worker's code, and run it as a script
    assert single[-5:] == ["--start-method", "forkserver", "--run-path", worker.__file__, str(tmp_path / "c.json")]
    assert multi[-5:-2] == ["--start-method", "forkserver", "--run-path"]


def test_learning_rate_rule_and_run_id():
    config = parse_config({"data": {"batch_size": 64}})
    assert config.learning_rate(1) == pytest.approx(1e-3)
    assert config.learning_rate(4) == pytest.approx(2e-3), "square-root scaling with the global batch"
    assert parse_config({"optimizer": {"lr": 0.01}}).learning_rate(8) == 0.01
    one, four = ({"parallelism": {"workers": n}} for n in (1, 4))
    assert parse_config(one).resolved_run_id() == parse_config(four).resolved_run_id()
    seed1, seed2 = ({"training": {"seed": n}} for n in (1, 2))
    assert parse_config(seed1).resolved_run_id() != parse_config(seed2).resolved_run_id()


@pytest.mark.parametrize("staleness", [0, 1, 3])
def test_async_gate_bounds_the_staleness_of_every_gradient(staleness):
    """Worker 1 pushes whenever it holds parameters, worker 2 only when worker 1 is held back: the
    gradients of worker 1 are computed on parameters missing at most `staleness` of worker 2's
    steps, the bound is reached, and nobody's own last update is ever missing."""
    from distml.train.parameter_server import StalenessGate

    workers, done_at = [1, 2], 12
    gate = StalenessGate(workers, staleness)
    gate.start(dict.fromkeys(workers, 0), done_at)
    holds = dict.fromkeys(workers, True)  # has the parameters to compute its next gradient on
    clock = dict.fromkeys(workers, 0)
    records = []
    while any(clock[w] < done_at for w in workers):
        src = next(w for w in workers if holds[w] and clock[w] < done_at)  # there is always one
        clock[src] += 1
        holds[src] = False
        based_on, ready = gate.push(src, clock[src])
        records.append((src, clock[src], based_on))
        for rank in ready:
            holds[rank] = True
    assert sorted(gate.release_all() + [w for w in workers if holds[w]]) == workers
    assert len(records) == len(workers) * done_at
    assert all(based_on[src] == step - 1 for src, step, based_on in records), "own last update included"
    stale = [step - 1 - min(based_on.values()) for _, step, based_on in records]
    assert max(stale) == staleness, stale


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's mallopt")
def test_workers_keep_freed_step_buffers_in_the_heap_unless_the_user_set_malloc(monkeypatch):
    from distml.train.worker import tune_malloc

    script = "from distml.train.worker import tune_malloc; print(tune_malloc())"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    ran = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert ran.stdout.strip() == "True", "glibc accepted both thresholds"
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert tune_malloc() is False, "the user's own malloc setting is left alone"
