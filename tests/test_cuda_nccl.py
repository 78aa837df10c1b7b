"""DDP on nccl (make test-gpu): a 1-process nccl group in this process, and where 2 or more GPUs are
visible the 2-process equivalence test on nccl (tests/test_distributed.py runs it on gloo) and a
2-GPU gpu_train.py run. Skipped without CUDA (tests/conftest.py).

Run as a script under torchrun, this file is the 2-process worker:

    python -m torch.distributed.run --standalone --nproc-per-node=2 tests/test_cuda_nccl.py OUT

Each mode (plain, syncbn: batch norm over both ranks with SyncBatchNorm, accum: accumulation with
no_sync, cached: uint8 images on the GPU with batch augmentation) trains 2 epochs; rank 0 writes
OUT/<mode>.pt (the weights) and OUT/<mode>.json (backend, DDP all-reduces). train() with world 1
and no process group is the 1-process reference with the double batch."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from common.data.batch_aug import BatchAugment  # noqa: E402
from common.data.device_batches import CachedBatches  # noqa: E402
from common.data.loaders import make_loader  # noqa: E402
from common.distributed import (  # noqa: E402
    context_from_env,
    convert_sync_batchnorm,
    destroy_process_group,
    init_process_group,
    wrap_ddp,
)
from common.engine import StepConfig, TrainState, train_one_epoch  # noqa: E402
from common.models.small import SmallCNN, TinyMLP  # noqa: E402
from common.optim import Schedule  # noqa: E402
from common.precision import make_precision  # noqa: E402
from common.tasks import ClassificationTask  # noqa: E402

pytestmark = pytest.mark.cuda

MODES = {"plain": (4, 1), "syncbn": (4, 1), "accum": (2, 2), "cached": (4, 1)}  # per-rank batch, accumulation
EPOCHS, N = 2, 64
TWO_GPUS = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 visible GPUs")


def exact_math() -> None:
    """No TF32: the runs compared here differ only in how the batch is split and reduced."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


def model_for(mode: str, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(1)
    model = SmallCNN(3, width=4, dropout=0.0) if mode == "syncbn" else TinyMLP(3, pool=4, hidden=16)
    return model.to(device)


def loader_for(mode: str, batch: int, device: torch.device, rank: int, world: int):
    g = torch.Generator().manual_seed(0)
    if mode == "cached":
        images = torch.randint(0, 256, (N, 3, 10, 10), dtype=torch.uint8, generator=g).to(device)
        labels = torch.randint(0, 3, (N,), generator=g).to(device)
        augment = BatchAugment(8, (0.5,) * 3, (0.25,) * 3, kind="standard")
        return CachedBatches(images, labels, batch, augment=augment, train=True, device=device, seed=5,
                             rank=rank, world_size=world)
    data = torch.utils.data.TensorDataset(torch.randn(N, 3, 8, 8, generator=g),
                                          torch.randint(0, 3, (N,), generator=g))
    return make_loader(data, batch, train=True, num_workers=0, pin_memory=True, seed=5, rank=rank,
                       world_size=world)


def train(mode: str, batch: int, accumulate: int, device: torch.device, rank: int = 0, world: int = 1
          ) -> tuple[torch.nn.Module, int]:
    """(weights after EPOCHS epochs, DDP all-reduces). Under a process group the model is wrapped in
    DDP (with SyncBatchNorm for syncbn), as place_model does under torchrun."""
    plain = model = model_for(mode, device)
    reduces = {"n": 0}
    if dist.is_initialized():
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        if mode == "syncbn":
            plain = model = convert_sync_batchnorm(plain, device).to(device)
        model = wrap_ddp(plain, device)

        def counting(state, bucket):
            reduces["n"] += 1
            return allreduce_hook(state, bucket)

        model.register_comm_hook(None, counting)
    loader = loader_for(mode, batch, device, rank, world)
    opt = torch.optim.SGD(plain.parameters(), lr=0.1)
    schedule = Schedule(opt, "none", epochs=1, steps_per_epoch=-(-len(loader) // accumulate))
    for epoch in range(EPOCHS):
        loader.sampler.set_epoch(epoch)
        train_one_epoch(model, ClassificationTask(3), loader, opt, schedule,
                        make_precision(device, amp=False), device,
                        StepConfig(accumulate=accumulate, show_progress=False), TrainState())
    return plain, reduces["n"]


def assert_same_weights(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], mode: str) -> None:
    assert got.keys() == want.keys(), mode
    for key, value in want.items():
        if value.is_floating_point():
            torch.testing.assert_close(got[key].cpu(), value.cpu(), atol=1e-4, rtol=1e-4,
                                       msg=f"{mode}: {key} differs")
        else:
            assert torch.equal(got[key].cpu(), value.cpu()), f"{mode}: {key}"


def moved(mode: str, state: dict[str, torch.Tensor]) -> float:
    """How far training moved the weights from their start (the comparisons are not vacuous)."""
    start = model_for(mode, torch.device("cpu")).state_dict()
    return max(float((state[k].cpu() - v).abs().max()) for k, v in start.items() if v.is_floating_point())


def test_one_process_nccl_group_trains_like_no_group(tmp_path):
    """DDP over a 1-rank nccl group (the reducer, no_sync, the totals' all-reduce on nccl) gives the
    weights of the same training without a group."""
    exact_math()
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    reference = {mode: train(mode, batch, accumulate, device)[0].state_dict()
                 for mode, (batch, accumulate) in MODES.items()}
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("nccl", store=store, rank=0, world_size=1, device_id=device)
    try:
        assert dist.get_backend() == "nccl"
        for mode, (batch, accumulate) in MODES.items():
            plain, reduces = train(mode, batch, accumulate, device)
            assert reduces == EPOCHS * (N // batch) // accumulate, (mode, reduces)  # once per optimizer step
            assert_same_weights(plain.state_dict(), reference[mode], mode)
            assert moved(mode, reference[mode]) > 1e-2, mode
    finally:
        dist.destroy_process_group()


def torchrun(*args: str, nproc: int = 2, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


@TWO_GPUS
def test_two_process_nccl_ddp_equals_one_process_with_double_batch(tmp_path):
    result = torchrun(__file__, str(tmp_path))
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    exact_math()
    device = torch.device("cuda", 0)
    for mode, (batch, accumulate) in MODES.items():
        info = json.loads((tmp_path / f"{mode}.json").read_text())
        assert info["backend"] == "nccl", info
        # one gradient bucket: one all-reduce per optimizer step (no_sync skipped the other micro-steps)
        assert info["allreduces"] == EPOCHS * (N // (2 * batch)) // accumulate, (mode, info)
        ddp = torch.load(tmp_path / f"{mode}.pt", weights_only=True)
        single = train(mode, 2 * batch * accumulate, 1, device)[0].state_dict()
        assert_same_weights(ddp, single, mode)
        assert moved(mode, single) > 1e-2, mode


@TWO_GPUS
def test_gpu_train_on_two_gpus_uses_nccl(dataset, tmp_path):
    from conftest import FAST

    import gpu_train

    out = tmp_path / "o"
    assert gpu_train.main(["--data-dir", str(dataset), "--output", str(out), *FAST, "--epochs", "2",
                           "--devices", "0,1"]) == 0
    log = (out / "training.log").read_text()
    assert "distributed: 2 processes on nccl" in log and "global batch 16" in log
    assert log.count("epoch 2/2 |") == 1  # only rank 0 logs


def worker(out: Path) -> None:
    ctx = context_from_env()
    device = torch.device("cuda", ctx.local_rank)
    torch.cuda.set_device(device)
    exact_math()
    backend = init_process_group(ctx, device, 120)  # nccl on CUDA
    try:
        for mode, (batch, accumulate) in MODES.items():
            plain, reduces = train(mode, batch, accumulate, device, ctx.rank, ctx.world_size)
            if ctx.is_main:
                torch.save({k: v.cpu() for k, v in plain.state_dict().items()}, out / f"{mode}.pt")
                (out / f"{mode}.json").write_text(json.dumps({"backend": backend, "allreduces": reduces}))
    finally:
        destroy_process_group()


if __name__ == "__main__":
    worker(Path(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp()))
