"""Many processes (issue 21, item 5): DistributedDataParallel on CPU with the gloo backend.

Two ranks started by ``torch.multiprocessing.spawn`` train a latent spanning-tree model (an
MLP encoder of per-example features into edge logits, ``RaceDistribution``,
``estimators.t_reinforce``) whose compiled program comes from the parent process (pickled
by reference, rebuilt through the compile cache in each rank).  Each rank samples from its
own stream; DDP averages the gradients, so every rank ends with the same parameters."""
import socket
import time

import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

import structdsl  # noqa: E402
from structdsl import estimators  # noqa: E402
from structdsl.specs import spanning_tree  # noqa: E402
from structdsl.torch import RaceDistribution  # noqa: E402

N, FEATURES, BATCH, STEPS, WORLD = 5, 4, 8, 4, 2

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


class LatentTree(torch.nn.Module):
    """Features -> edge logits of a spanning tree over N nodes (the program is an attribute)."""

    def __init__(self, program):
        super().__init__()
        self.program = program
        self.encoder = torch.nn.Sequential(torch.nn.Linear(FEATURES, 16), torch.nn.Tanh(),
                                           torch.nn.Linear(16, N * N)).double()

    def forward(self, x):
        return RaceDistribution(self.program, self.encoder(x).reshape(x.shape[:-1] + (N, N)))


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def path_adjacency():
    a = torch.zeros(N, N, dtype=torch.bool)
    for u in range(N - 1):
        a[u, u + 1] = a[u + 1, u] = True
    return a


def _rank(rank, port, program, initial, out_dir):
    """One rank: its own replica of the model (spawn hands CPU tensors over in shared memory,
    so the parent's parameters are copied, not used), data shard and sampling stream; DDP
    over gloo; a few Adam steps."""
    torch.set_num_threads(1)
    model = LatentTree(program)
    model.load_state_dict(initial)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(1000 + rank)            # this rank's sampling stream (the estimators draw from it)
        x = torch.randn(BATCH, FEATURES, generator=torch.Generator().manual_seed(rank), dtype=torch.float64)
        target = path_adjacency()

        def loss(s):                              # per-sample: edges that differ from the path
            return (s.adjacency != target).sum((-1, -2)).double()

        ddp = torch.nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.Adam(ddp.parameters(), lr=0.05)
        losses = []
        for _ in range(STEPS):
            opt.zero_grad()
            surrogate = estimators.t_reinforce(ddp(x), loss, num_samples=4)
            surrogate.backward()                  # DDP all-reduces (averages) the gradients
            opt.step()
            losses.append(float(surrogate.detach()))
        torch.save({"params": [p.detach() for p in model.parameters()], "losses": losses,
                    "program": (type(model.program).__name__, model.program.backend),
                    "same_program": model.program is structdsl.compile(spanning_tree, backend="torch")},
                   f"{out_dir}/rank{rank}.pt")
        # Let gloo's worker threads finish before the DDP reducer (and with it the process
        # group) is freed: one of them destroys its last work item's thread-local state, which
        # needs the GIL, while the reducer's destructor joins it holding the GIL (a deadlock
        # seen once in the suite, 2026-12-04). The barrier completes the work, the sleep hands
        # them the GIL, and `del` frees the reducer here, not in the frame's teardown.
        dist.barrier()
        time.sleep(0.2)
        del ddp, opt
    finally:
        dist.destroy_process_group()


def test_two_ranks_train_to_identical_parameters(tmp_path):
    structdsl.cache_clear()
    program = structdsl.compile(spanning_tree, backend="torch")     # compiled here, in the parent
    model = LatentTree(program)
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    mp.spawn(_rank, args=(free_port(), program, initial, str(tmp_path)), nprocs=WORLD, join=True)
    a, b = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD))
    assert a["program"] == b["program"] == ("Program", "torch")
    assert a["same_program"] and b["same_program"]            # the unpickled program is the cached one
    before = list(initial.values())
    assert len(a["params"]) == len(b["params"]) == len(before) == 4
    for p, q in zip(a["params"], b["params"]):
        assert torch.equal(p, q)                               # every rank holds the same parameters
    assert all(not torch.equal(p, p0) for p, p0 in zip(a["params"], before))   # and they were trained
    assert a["losses"] != b["losses"]                          # own data and sampling stream per rank
