"""ParallelDims' process-group setup: device before group, timeouts on every group, and the
one-line report of a collective whose peer stalled or died.

The device order is checked with mocks (there is no GPU in CI), on the real code path: the mocks
only record calls, so the assertion is about what `init_process_group` does, in which order.
"""
from __future__ import annotations

from datetime import timedelta
from unittest import mock

import pytest
import torch
import torch.distributed as dist

from support.spawn import run_distributed
from ulysses_train.config.errors import ConfigError
from ulysses_train.config.schema import ParallelConfig
from ulysses_train.parallel import mesh
from ulysses_train.parallel.mesh import ParallelDims


def _cuda_dims(world_size: int = 2, rank: int = 1) -> ParallelDims:
    return ParallelDims(tp=1, sp=1, dp=world_size, world_size=world_size, rank=rank,
                        device=torch.device("cuda", rank), backend="nccl",
                        timeout=timedelta(seconds=42))


def test_cuda_device_is_set_before_the_process_group(monkeypatch):
    """Catches: the group created first (NCCL, DeviceMesh, FSDP2 and DCP then use cuda:0 on
    every rank of a node), or the device never set at all."""
    calls = mock.Mock()
    monkeypatch.setattr(torch.cuda, "set_device", calls.set_device)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "rendezvous", lambda *a, **k: iter([(calls.store, 1, 2)]))
    monkeypatch.setattr(dist, "PrefixStore", lambda prefix, store: store)
    monkeypatch.setattr(dist, "init_process_group", calls.init_process_group)
    monkeypatch.setenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")  # keep os.environ untouched
    _cuda_dims().init_process_group()
    names = [c[0] for c in calls.mock_calls]
    assert names.index("set_device") < names.index("init_process_group"), names
    calls.set_device.assert_called_once_with(torch.device("cuda", 1))
    _, kwargs = calls.init_process_group.call_args
    assert kwargs["timeout"] == timedelta(seconds=42)  # parallel.timeout_s reaches the group
    assert kwargs["device_id"] == torch.device("cuda", 1)
    calls.store.set_timeout.assert_called_once_with(timedelta(seconds=42))


def test_cuda_device_is_set_even_when_the_group_exists(monkeypatch):
    """A caller (a test harness, a notebook) may have made the group: the device still matters."""
    calls = mock.Mock()
    monkeypatch.setattr(torch.cuda, "set_device", calls.set_device)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "init_process_group", calls.init_process_group)
    _cuda_dims().init_process_group()
    calls.set_device.assert_called_once_with(torch.device("cuda", 1))
    calls.init_process_group.assert_not_called()


def test_nccl_async_error_handling_is_enabled_unless_the_user_chose():
    env = {}
    mesh.enable_nccl_async_error_handling(env)
    assert env == {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "3"}
    for name in ("TORCH_NCCL_ASYNC_ERROR_HANDLING", "NCCL_ASYNC_ERROR_HANDLING"):
        env = {name: "0"}
        mesh.enable_nccl_async_error_handling(env)
        assert env == {name: "0"}  # an explicit choice, in either spelling, wins


def test_timeout_comes_from_config_and_must_be_positive():
    dims = ParallelDims.from_config(ParallelConfig(timeout_s=7.5), world_size=1, rank=0)
    assert dims.timeout == timedelta(seconds=7.5)
    for bad in (0, -1, float("inf"), float("nan"), 1e14):  # 1e14: timedelta overflowed
        with pytest.raises(ConfigError, match="parallel.timeout_s"):
            ParallelDims.from_config(ParallelConfig(timeout_s=bad), world_size=1, rank=0)


def _group_timeouts(rank, world_size):
    """Every group the job makes, with the timeout it will wait for a peer (in seconds)."""
    dims = ParallelDims(tp=2, sp=2, dp=1, world_size=world_size, rank=rank,
                        device=torch.device("cpu"), timeout=timedelta(seconds=7))
    dims.build_mesh()
    out = {name: mesh.group_timeout(dims.group(name)).total_seconds()
           for name in ("dp", "ring", "ulysses", "sp", "tp", "dp_sp")}
    out["world"] = mesh.group_timeout().total_seconds()
    group = mesh.new_group(backend="gloo")  # what the checkpoint makes for itself
    out["new_group"] = mesh.group_timeout(group).total_seconds()
    # Gloo connects a new group pair by pair; a rank that exited straight away could close a
    # pair a peer is still connecting. A collective on it first ends the handshake everywhere.
    dist.barrier(group)
    return out


# (dp, sp, ring, tp) layouts of 4 ranks whose groups the mesh must make.
MESH_LAYOUTS = [(1, 4, 2, 1), (1, 4, 4, 1), (2, 2, 2, 1), (1, 2, 2, 2), (1, 2, 1, 2), (1, 4, 1, 1),
                (2, 2, 1, 1)]


def _mesh_rank(rank, world_size):
    """The group timeouts, and per layout this rank's (global ranks, local rank) of each view."""
    out = {"timeouts": _group_timeouts(rank, world_size)}
    for dp, sp, ring, tp in MESH_LAYOUTS:
        dims = ParallelDims(tp=tp, sp=sp, dp=dp, ring=ring, world_size=world_size, rank=rank,
                            device=torch.device("cpu"))
        dims.build_mesh()
        out[dp, sp, ring, tp] = {
            name: (dist.get_process_group_ranks(dims.group(name)), dims.local_rank(name))
            for name in ("dp", "ring", "ulysses", "sp", "tp", "dp_sp")}
    return out


@pytest.fixture(scope="module")
def mesh_ranks():
    return run_distributed(_mesh_rank, 4, timeout=60.0)


def test_every_group_waits_parallel_timeout_s(mesh_ranks):
    """Catches: mesh groups (and the checkpoint's own gloo group) left at torch's 30-minute
    default, so a stalled peer inside sp/tp/ZeRO collectives hangs the job for half an hour
    whatever parallel.timeout_s says. tp=2 x sp=2 makes real sub-groups of the world."""
    world_timeout = 60.0  # what run_distributed gives the world group
    for rank, got in enumerate(r["timeouts"] for r in mesh_ranks):
        assert got == {"dp": 7, "ring": 7, "ulysses": 7, "sp": 7, "tp": 7, "dp_sp": 7,
                       "world": world_timeout, "new_group": world_timeout}, (rank, got)


def _expected_groups(rank, dp, sp, ring, tp) -> dict:
    """From the rank formula alone: rank = ((dp_i * ring + ring_i) * U + u_i) * tp + tp_i."""
    u = sp // ring
    coords = {"dp": dp, "ring": ring, "ulysses": u, "tp": tp}
    names = list(coords)

    def of(r):
        out = {}
        for name in reversed(names):
            r, out[name] = divmod(r, coords[name])
        return out

    me = of(rank)

    def group(free):  # ranks that agree with me on every coordinate not in `free`
        members = [r for r in range(dp * sp * tp)
                   if all(of(r)[n] == me[n] for n in names if n not in free)]
        return members, members.index(rank)

    return {"dp": group({"dp"}), "ring": group({"ring"}), "ulysses": group({"ulysses"}),
            "tp": group({"tp"}), "sp": group({"ring", "ulysses"}),
            "dp_sp": group({"dp", "ring", "ulysses"})}


@pytest.mark.parametrize("layout", MESH_LAYOUTS, ids=[f"dp{a}-sp{b}-ring{c}-tp{d}"
                                                      for a, b, c, d in MESH_LAYOUTS])
def test_mesh_groups_follow_the_rank_formula(mesh_ranks, layout):
    """dp, ring, ulysses, tp outermost first: tp peers adjacent, then Ulysses peers; the sp group
    is ring x ulysses with group rank ring_i * U + ulysses_i (what SequenceLayout.rank_positions
    takes). Catches: ring and ulysses swapped (Ulysses peers strided across nodes), an sp view
    not flattened in ring-major order, ring=1 groups that differ from Ulysses alone."""
    for rank, got in enumerate(r[layout] for r in mesh_ranks):
        assert got == _expected_groups(rank, *layout), (rank, layout)
    dp, sp, ring, tp = layout
    if ring == 1:  # exactly the ("dp", "sp", "tp") groups of Ulysses alone: sp = ulysses
        for rank, got in enumerate(r[layout] for r in mesh_ranks):
            assert got["sp"] == got["ulysses"] and got["ring"] == ([rank], 0)
            assert got["sp"][0] == [(rank // (sp * tp)) * sp * tp + i * tp + rank % tp
                                    for i in range(sp)]


def _traceback_from(fn):
    try:
        fn()
    except Exception as exc:
        return exc
    raise AssertionError("expected an exception")


def _gloo_timeout():
    raise RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 5000ms for "
                       "recv operation to complete")


def test_report_of_a_timed_out_collective_is_one_line():
    exc = _traceback_from(_gloo_timeout)
    line = mesh.describe_collective_failure(exc, rank=0, world_size=2, timeout_s=5)
    assert "\n" not in line and line.startswith("error: parallel.timeout_s: ")
    assert "waited 5 s for rank 1" in line and "stalled or died" in line
    line = mesh.describe_collective_failure(exc, rank=3, world_size=8, timeout_s=5)
    assert "on rank 3" in line and "a peer rank" in line  # cannot tell which of 7 peers


class _TimesOutInBackward(torch.autograd.Function):
    """Stands in for DDP's Reducer: a collective failing inside autograd's engine, with no
    Python frame of torch.distributed in the traceback."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        _gloo_timeout()


def test_a_collective_failing_in_backward_is_named_as_ddp_all_reduce():
    """Catches the CI case: DDP's gradient all-reduce timed out and the line named our caller
    ("collective train_step") instead of a collective."""
    x = torch.ones(2, requires_grad=True)
    exc = _traceback_from(lambda: _TimesOutInBackward.apply(x).sum().backward())
    line = mesh.describe_collective_failure(exc, rank=0, world_size=2, timeout_s=5)
    assert line.startswith("error: parallel.timeout_s: collective all_reduce (DDP gradients, "
                           "during backward) on rank 0 waited 5 s"), line


def test_report_of_a_lost_peer_reads_the_cause_chain():
    def save():
        try:
            raise RuntimeError("[gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:63197: "
                               "Connection reset by peer.")
        except RuntimeError as exc:  # DCP wraps collective errors like this
            raise ValueError("checkpoint save failed") from exc

    line = mesh.describe_collective_failure(_traceback_from(save), 1, 2, 600)
    assert "lost its connection to rank 0 (connection reset by peer)" in line, line


def test_other_errors_are_not_reported_as_collective_failures():
    for exc in (RuntimeError("CUDA out of memory"), ValueError("Timed out"),  # not a backend error
                KeyError("x")):
        assert mesh.describe_collective_failure(exc, 0, 2, 5) is None


def test_nccl_without_a_gpu_is_one_config_error():
    """parallel.backend=nccl on a CPU machine was a torch ValueError (and a torchrun traceback)
    from init_process_group; now the layout refuses it, naming the key."""
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: nccl is valid here")
    with pytest.raises(ConfigError) as info:
        ParallelDims.from_config(ParallelConfig(backend="nccl"), 1, 0)
    assert info.value.key == "parallel.backend" and "gloo" in info.value.message
    assert ParallelDims.from_config(ParallelConfig(backend="auto"), 1, 0).backend == "gloo"


def test_layout_line_names_ring_head_groups_and_shard_group_only_when_used():
    dims = ParallelDims(tp=1, sp=4, dp=2, world_size=8, rank=0, device=torch.device("cpu"), ring=2)
    assert dims.describe(3, 4).startswith("dp=2 sp=4 ring=2 ulysses_chunks=4 tp=1 zero=3")
    assert "ulysses_chunks" not in dims.describe(3)  # G = 1: the line as before
