"""Issue 14 on a CPU: the GPU-only logic, with what torch reports about the GPU faked.

Each test here fails without its fix; tests/gpu/ runs the same behaviours for real where CUDA is present.
"""

from __future__ import annotations

import os
import re

import pytest
import torch
import torch.nn.functional as F
from helpers import TINY_BERT, make_text_file, read_json, run_train, start_ranks, tiny_args, wait_all
from torch.utils._python_dispatch import TorchDispatchMode

from mlm.common.distributed import DistEnv
from mlm.config import TrainConfig, UserError
from mlm.data.masking import IGNORE_INDEX, token_hashes
from mlm.model.modeling import MaskedLMLoss
from mlm.report import metrics
from mlm.train import engine

CPU = torch.device("cpu")
CUDA = torch.device("cuda", 0)  # only named: nothing runs on it


def fake_gpu(monkeypatch, capability=(7, 5), name="Tesla T4", count=1, bf16_supported=True) -> None:
    """What torch.cuda reports on a machine with `count` GPUs of this kind (is_bf16_supported answers True on a
    T4 and a P100 too: it falls back to an emulation probe)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_supported)


# ---------------------------------------------------------------------- (a) precision by capability
CARDS = [
    ((6, 0), "Tesla P100-PCIE-16GB"),
    ((7, 0), "Tesla V100-SXM2-16GB"),
    ((7, 5), "Tesla T4"),
    ((8, 0), "NVIDIA A100-SXM4-80GB"),
    ((8, 6), "NVIDIA A10"),
    ((9, 0), "NVIDIA H100 80GB HBM3"),
]


@pytest.mark.parametrize("capability,name", CARDS)
def test_precision_follows_the_compute_capability(monkeypatch, capability, name):
    fake_gpu(monkeypatch, capability, name)
    native = capability >= (8, 0)
    assert engine.resolve_precision("auto", CUDA) == ("bf16" if native else "fp16")
    assert engine.resolve_precision("fp16", CUDA) == "fp16"
    assert engine.resolve_precision("fp32", CUDA) == "fp32"
    if native:
        assert engine.resolve_precision("bf16", CUDA) == "bf16"
    else:
        with pytest.raises(UserError) as e:
            engine.resolve_precision("bf16", CUDA)
        text = str(e.value)
        assert "\n" not in text and name in text and "emulated" in text and "--precision fp16" in text
        assert f"{capability[0]}.{capability[1]}" in text


def test_auto_is_fp16_with_a_scaler_on_a_t4_although_torch_says_bf16_is_supported(monkeypatch):
    fake_gpu(monkeypatch, (7, 5), "Tesla T4", bf16_supported=True)
    precision = engine.resolve_precision("auto", CUDA)
    assert precision == "fp16" and engine.build_scaler(precision, CPU).is_enabled()


def test_cpu_precisions():
    assert engine.resolve_precision("auto", CPU) == "fp32"
    assert engine.resolve_precision("bf16", CPU) == "bf16"


# ---------------------------------------------------------------------- (b) processes vs GPUs
def test_more_processes_than_gpus_is_one_line_naming_both(monkeypatch):
    from mlm.common.distributed import check_gpu_count

    fake_gpu(monkeypatch, count=2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with pytest.raises(UserError) as e:
        check_gpu_count(0)
    assert "4 processes" in str(e.value) and "2 visible GPU" in str(e.value)
    assert "--nproc_per_node=2" in str(e.value) and "\n" not in str(e.value)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    with pytest.raises(UserError, match="CUDA_VISIBLE_DEVICES='0,1'"):
        check_gpu_count(3)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    check_gpu_count(1)  # one process per GPU: fine


def test_more_ranks_than_gpus_stops_every_rank_by_itself(tmp_path, tiny_config_dir, tokenizer_path):
    """2 gloo ranks (started as torchrun starts them) on a node that reports 1 GPU: each rank exits 2 by itself
    before any work, rank 0 with one line naming both numbers, and nothing hangs."""
    args = tiny_args(
        tiny_config_dir,
        tokenizer_path,
        str(tmp_path / "out"),
        str(tmp_path / "cache"),
        train_file=make_text_file(str(tmp_path / "t.txt"), 50),
        max_train_steps=2,
    )
    results = wait_all(start_ranks(args, nproc=2, fault={"fake_cuda": {"count": 1}}), timeout=60)
    for rank, r in enumerate(results):
        assert r.returncode == 2 and "Traceback" not in r.output, f"rank {rank} exit {r.returncode}:\n{r.output}"
    errors = [line for line in results[0].stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, results[0].output
    assert "2 processes" in errors[0] and "1 visible GPU" in errors[0] and "--nproc_per_node=1" in errors[0]
    assert not results[1].output.strip() and not os.path.exists(tmp_path / "out")


# ---------------------------------------------------------------------- (c, h9) peaks
@pytest.mark.parametrize(
    "name,peak",
    [
        ("Tesla T4", 65e12),
        ("Tesla P100-PCIE-16GB", 18.7e12),
        ("Tesla P100-SXM2-16GB", 21.2e12),
        ("Tesla V100-SXM2-32GB", 125e12),
        ("Tesla V100-PCIE-16GB", 112e12),
        ("Tesla V100S-PCIE-32GB", 130e12),
        ("NVIDIA L4", 121e12),
        ("NVIDIA L40", 181e12),
        ("NVIDIA L40S", 362e12),
        ("NVIDIA A10", 125e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA A100 80GB PCIe", 312e12),
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H100 NVL", 835e12),
        ("NVIDIA H200", 989e12),
    ],
)
def test_data_sheet_peaks_most_specific_name_wins(monkeypatch, name, peak):
    fake_gpu(monkeypatch, name=name)
    monkeypatch.setattr(metrics, "matmul_peak", lambda *a, **k: pytest.fail("a known card is not measured"))
    for precision in ("fp16", "bf16"):
        got, source = metrics.device_peak(CUDA, precision)
        assert got == peak and "data sheet" in source and name in source


@pytest.mark.parametrize("name", ["NVIDIA GeForce RTX 4090", "NVIDIA A10G", "NVIDIA B999"])
def test_an_unknown_card_falls_back_to_a_measured_matmul(monkeypatch, name):
    fake_gpu(monkeypatch, name=name)
    calls = []
    monkeypatch.setattr(metrics, "matmul_peak", lambda device, dtype, **k: calls.append(dtype) or 42e12)
    got, source = metrics.device_peak(CUDA, "bf16")
    assert got == 42e12 and calls == [torch.bfloat16] and "measured" in source and name in source


def test_reserved_memory_is_reported_beside_allocated(monkeypatch):
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 3 * 2**30)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None: 5 * 2**30)
    assert metrics.peak_memory_bytes(CUDA) == (3 * 2**30, 5 * 2**30)


# ---------------------------------------------------------------------- (d) the head without a host sync
def tiny_model(seed: int = 0, vocab: int = 120):
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(seed)
    return BertForMaskedLM(BertConfig(vocab_size=vocab, **TINY_BERT))


def boolean_index_loss(model, ids, labels):
    """The head as it was before: hidden[labels != -100], a boolean index (a host sync on CUDA)."""
    selected = labels != IGNORE_INDEX
    hidden = model.bert(input_ids=ids)[0]
    return F.cross_entropy(model.cls(hidden[selected]).float(), labels[selected], reduction="sum")


@pytest.mark.parametrize("rate", [0.15, 0.9, 0.0])  # as expected, far more masked than expected, none masked
def test_gathered_head_equals_the_boolean_index_version(rate):
    from mlm.model.modeling import masked_positions

    g = torch.Generator().manual_seed(3)
    ids = torch.randint(5, 120, (4, 16), generator=g)
    labels = torch.where(torch.rand(ids.shape, generator=g) < rate, ids, IGNORE_INDEX)
    ref_model, model = tiny_model(), tiny_model()
    ref = boolean_index_loss(ref_model, ids, labels)
    ref.backward()
    new = MaskedLMLoss(model)(ids, *masked_positions(labels))
    new.backward()
    assert torch.allclose(new, ref, atol=1e-6, rtol=0)
    if rate == 0:
        assert float(new.detach()) == 0.0
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
        a = p.grad if p.grad is not None else torch.zeros_like(p)
        b = q.grad if q.grad is not None else torch.zeros_like(q)
        assert (a - b).abs().max() <= 1e-6, name


class HostReads(TorchDispatchMode):
    """Records the operators that read a tensor's values on the host or whose output size depends on them:
    on CUDA each one waits for the GPU."""

    SYNCING = (
        "aten._local_scalar_dense",
        "aten.nonzero",
        "aten.masked_select",
        "aten.unique",
        "aten.item",
        "aten.is_nonzero",
        "aten.equal",
        "aten.repeat_interleave",
        "aten._unique",
    )

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket) if hasattr(func, "overloadpacket") else str(func)
        if name in self.SYNCING:
            self.seen.append(name)
        elif name == "aten.index" and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else ())
        ):
            self.seen.append("aten.index with a boolean mask")
        return func(*args, **(kwargs or {}))


def steady_setup(tokenizer, precision: str = "fp32"):
    cfg = TrainConfig(learning_rate=1e-3, num_warmup_steps=2, max_train_steps=10, seed=1)
    model = tiny_model(vocab=len(tokenizer))
    trainable = engine.build_trainable(cfg, model, precision, CPU, 10)
    trainable.loss.train()
    masking = engine.build_masking(cfg, tokenizer)
    g = torch.Generator().manual_seed(0)

    def batch(i: int):
        ordinary = masking.tables.ordinary_ids
        ids = ordinary[torch.randint(len(ordinary), (4, 32), generator=g)]
        ids[:, 0], ids[:, -1] = tokenizer.cls_token_id, tokenizer.sep_token_id
        return engine.prepare_batch({"input_ids": ids, "index": torch.arange(4) + 4 * i}, 0, masking, CPU)

    env = DistEnv(rank=0, local_rank=0, world_size=1, device=CPU)
    step = lambda batches: engine.train_step(trainable, batches, env)
    return model, trainable.loss, trainable.optimizer, trainable.schedule, batch, step


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_a_steady_training_step_reads_nothing_on_the_host(tokenizer, precision):
    """The CPU stand-in for torch.cuda.set_sync_debug_mode('error') (tests/gpu does the real one): no operator of
    a steady step (after the first, which creates optimizer state) reads device values on the host."""
    from mlm.train.swa import WeightAverage

    model, _, _, _, batch, step = steady_setup(tokenizer, precision)
    swa = WeightAverage(model, start_step=1)
    step([batch(0)])
    swa.update(model, 1)
    batches = [[batch(1), batch(2)], [batch(3)]]  # prepared (masked on the host) before the steps
    with HostReads() as reads:
        for i, micro in enumerate(batches):
            step(micro)
            swa.update(model, i + 2)
    assert reads.seen == [], reads.seen


def test_the_boolean_index_head_would_be_caught(tokenizer):
    """Negative control for the test above: the old head's boolean index is an operator it records."""
    model = tiny_model(vocab=len(tokenizer))
    ids = torch.randint(5, 100, (2, 8))
    labels = torch.where(torch.rand(ids.shape) < 0.5, ids, IGNORE_INDEX)
    with HostReads() as reads:
        boolean_index_loss(model, ids, labels)
    assert "aten.index with a boolean mask" in reads.seen or "aten.nonzero" in reads.seen, reads.seen


def test_hashing_copies_no_host_scalar_to_the_device(monkeypatch):
    """token_hashes mixes seed, epoch and stream on the host: no torch.tensor(python int, device=...), which on
    CUDA is a copy that waits for the stream. The values are those of a pure-Python reference."""

    def fmix(h):
        h ^= h >> 16
        h = h * 0x85EBCA6B & 0xFFFFFFFF
        h ^= h >> 13
        h = h * 0xC2B2AE35 & 0xFFFFFFFF
        return h ^ (h >> 16)

    combine = lambda h, x: fmix(h ^ ((x & 0xFFFFFFFF) * 0x9E3779B1 & 0xFFFFFFFF))

    def reference(seed, epoch, index, pos, stream):
        h = combine(combine(fmix(seed & 0xFFFFFFFF), epoch), index)
        return combine(combine(h ^ (pos * 0x27D4EB2F & 0xFFFFFFFF), pos), stream)

    real_tensor = torch.tensor
    monkeypatch.setattr(torch, "tensor", lambda *a, **k: pytest.fail("torch.tensor in token_hashes"))
    got = token_hashes(2**33 + 7, 0xFFFFFFFF, real_tensor([0, 5, 123456789]), 6, 2)
    monkeypatch.setattr(torch, "tensor", real_tensor)
    for r, index in enumerate([0, 5, 123456789]):
        assert got[r].tolist() == [reference(2**33 + 7, 0xFFFFFFFF, index, p, 2) for p in range(6)]


# ---------------------------------------------------------------------- (h7) SWA without a sync
def test_swa_update_equals_averaged_model_and_reads_nothing_on_the_host():
    from torch.optim.swa_utils import AveragedModel

    from mlm.train.swa import WeightAverage

    model = tiny_model()
    ours, theirs = WeightAverage(model, start_step=1), AveragedModel(model, use_buffers=False)
    with HostReads() as reads:
        for step in range(1, 5):
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn_like(p))
            ours.update(model, step)
            reads.seen, seen = [], reads.seen
            theirs.update_parameters(model)
            reads.seen = seen
    assert reads.seen == []
    for a, b in zip(ours.model.parameters(), theirs.module.parameters()):
        assert (a - b).abs().max() <= 1e-6
    assert ours.count == 4 and int(ours.state_dict()["n_averaged"]) == 4


# ---------------------------------------------------------------------- (h10) skipped steps and the schedule
@pytest.mark.parametrize("precision", ["fp16", "fp32"])
def test_skipped_steps_do_not_advance_the_schedule(tokenizer, monkeypatch, precision):
    """Two steps with non-finite gradients (an fp16 overflow for GradScaler, or the fused skip) then two good
    steps: the learning rate is the schedule's after two applied steps, not four."""
    model, loss_module, optimizer, schedule, batch, step = steady_setup(tokenizer, precision)
    lr_at = lambda applied: 1e-3 * min(1.0, applied / 2) * (1.0 if applied <= 2 else (10 - applied) / 8)
    assert schedule.get_last_lr()[0] == pytest.approx(lr_at(0), abs=1e-12)
    forward = MaskedLMLoss.forward
    bad = {"left": 2}

    def overflowing(self, *args, **kwargs):
        nll = forward(self, *args, **kwargs)
        if bad["left"]:
            bad["left"] -= 1
            return nll * float("inf")
        return nll

    monkeypatch.setattr(MaskedLMLoss, "forward", overflowing)
    before = [p.detach().clone() for p in model.parameters()]
    results = [step([batch(i)]) for i in range(4)]
    assert [int(r.skipped) for r in results] == [1, 1, 0, 0]
    assert schedule.get_last_lr()[0] == pytest.approx(lr_at(2), rel=1e-6)  # was lr_at(4) before the fix
    assert int(optimizer.state[next(model.parameters())]["step"]) == 2
    # The first applied step ran at the warmup's lr 0 (as the Trainer's does), the second at half the peak.
    assert any((a - b).abs().max() > 0 for a, b in zip(before, model.parameters()))


def test_schedule_state_resumes_and_reads_an_old_lambda_lr_checkpoint(tokenizer):
    _, _, optimizer, schedule, _, _ = steady_setup(tokenizer)
    for skipped in (0, 1, 0):
        schedule.step(torch.tensor(skipped))
    assert schedule.state_dict()["applied"] == 2
    lr = schedule.get_last_lr()
    _, _, optimizer2, schedule2, _, _ = steady_setup(tokenizer)
    optimizer2.load_state_dict(optimizer.state_dict())
    schedule2.load_state_dict(schedule.state_dict())
    assert schedule2.get_last_lr() == lr and optimizer2.param_groups[0]["lr"] is not None
    assert float(optimizer2.param_groups[0]["lr"]) == lr[0]  # the optimizer reads the schedule's tensor
    schedule2.load_state_dict({"last_epoch": 2, "base_lrs": [1e-3]})  # torch's LambdaLR state, older runs
    assert schedule2.get_last_lr() == lr


# ---------------------------------------------------------------------- (h2) fp16 resumed from bf16/fp32
def test_fp16_resumes_from_a_checkpoint_saved_without_a_scaler(tmp_path, tokenizer):
    from mlm.train import checkpoint

    model, _, optimizer, schedule, _, _ = steady_setup(tokenizer, "fp32")
    state = checkpoint.TrainState(world_size=1, per_device_train_batch_size=4, step=3)
    parts = {
        "optimizer": optimizer,
        "scheduler": schedule,
        "scaler": engine.build_scaler("fp32", CPU),
        "rng_states": checkpoint.RankRngs(0, [checkpoint.rng_state()]),
    }
    path = checkpoint.save_checkpoint(str(tmp_path), state, model, parts, 2)
    model2, _, optimizer2, schedule2, _, _ = steady_setup(tokenizer, "fp16")
    scaler = engine.build_scaler("fp16", CPU)
    state2 = checkpoint.TrainState(world_size=1, per_device_train_batch_size=4)
    parts2 = {"optimizer": optimizer2, "scheduler": schedule2, "scaler": scaler, "rng_states": checkpoint.RankRngs(0)}
    checkpoint.load_checkpoint(path, state2, model2, parts2, CPU)  # raised before
    assert state2.step == 3 and scaler.is_enabled()
    with pytest.raises(RuntimeError, match="empty"):  # what GradScaler itself says: the case is real
        torch.amp.GradScaler("cpu").load_state_dict({})


# ---------------------------------------------------------------------- (h3) master weights are fp32
def test_a_model_saved_in_fp16_trains_with_fp32_master_weights(tmp_path, tokenizer_path):
    from mlm.model.modeling import build_model, load_model_config, load_tokenizer

    saved = str(tmp_path / "fp16-bert")
    tiny_model(vocab=30522).half().save_pretrained(saved)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(tokenizer_path).save_pretrained(saved)
    cfg = TrainConfig(model_name_or_path=saved)
    model = build_model(cfg, load_model_config(cfg), load_tokenizer(cfg))
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    scratch = TrainConfig(config_name=saved, tokenizer_name=saved)
    model = build_model(scratch, load_model_config(scratch), load_tokenizer(scratch))
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    from mlm.inference.fill_mask import FillMask

    assert next(FillMask(saved, device="cpu").model.parameters()).dtype == torch.float32


# ---------------------------------------------------------------------- (h1) which failures are a peer's
def test_only_a_lost_connection_is_a_peer_failure():
    import torch.distributed as dist

    from mlm.common.distributed import PeerFailed, describe_failure, is_peer_failure

    shm = dist.DistBackendError(
        "NCCL error in: ProcessGroupNCCL.cpp:1970, unhandled system error (run with "
        "NCCL_DEBUG=INFO for details), NCCL version 2.21.5\nncclSystemError: System call "
        "(e.g. socket, malloc) or external library call failed or device error.\nLast "
        "error:\nError while creating shared memory segment /dev/shm/nccl-x (size 9637888)"
    )
    assert not is_peer_failure(shm)
    line = describe_failure(shm, 1)
    assert line.startswith("rank 1:") and "--shm-size" in line and "\n" not in line
    assert not is_peer_failure(RuntimeError("NCCL error: invalid usage"))
    assert not is_peer_failure(dist.DistError("something else"))
    assert not is_peer_failure(ValueError("Connection closed by peer"))  # not from a collective
    for lost in (
        PeerFailed("x"),
        RuntimeError("[../gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:1234"),
        dist.DistNetworkError("Connection reset by peer"),
        dist.DistBackendError("NCCL error: remote process exited or there was a network error, ncclRemoteError"),
    ):
        assert is_peer_failure(lost), lost
    assert describe_failure(ValueError("a bug"), 0) is None  # keeps its traceback


def test_an_nccl_failure_on_every_rank_is_reported_not_swallowed(tmp_path, tiny_config_dir, tokenizer_path):
    args = tiny_args(
        tiny_config_dir,
        tokenizer_path,
        str(tmp_path / "out"),
        str(tmp_path / "cache"),
        train_file=make_text_file(str(tmp_path / "t.txt"), 100),
        max_train_steps=4,
    )
    results = wait_all(start_ranks(args, nproc=2, fault={"kind": "raise", "step": 2, "error": "nccl_shm"}), timeout=120)
    for rank, r in enumerate(results):  # each rank says what it saw, in one line, and exits 1: none is silent
        assert r.returncode == 1, f"rank {rank} exit {r.returncode}:\n{r.output[-3000:]}"
        lines = [line for line in r.stderr.splitlines() if "the communication backend failed" in line]
        assert len(lines) == 1 and lines[0].startswith(f"error: rank {rank}:"), r.stderr[-3000:]
        assert "/dev/shm" in lines[0] and "--shm-size" in lines[0] and "Traceback" not in r.stderr


# ---------------------------------------------------------------------- (h6) waiting for a leader
def test_ranks_wait_for_the_leader_on_the_cpu_control_group(monkeypatch):
    import torch.distributed as dist

    from mlm.common import distributed

    control = object()
    calls = []

    def all_reduce(t, op=None, group=None):
        calls.append((t.device.type, group))

    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    for rank in (0, 1):  # the leader, then a rank waiting for it
        env = DistEnv(rank=rank, local_rank=rank, world_size=2, device=CUDA, control=control)
        assert distributed.main_process_first(env, lambda: "built") == "built"
        distributed.main_only(env, lambda: None)
    assert calls and all(c == ("cpu", control) for c in calls), calls


# ---------------------------------------------------------------------- (h8) one shape for torch.compile
def test_compiled_training_sees_one_shape_through_epoch_ends_and_evaluation(
    tmp_path, monkeypatch, tiny_config_dir, tokenizer_path, capfd
):
    """--torch_compile: a partial last batch each epoch and evaluation (no grad, another batch size) at the
    start and at each epoch end; the compiled training forward must see one shape only (the batch, and the masked
    positions padded to their capacity), so it compiles once."""
    import train_ddp

    shapes: list = []
    real_compile = torch.compile

    def recording(fn, **kwargs):
        compiled = real_compile(fn, backend="eager")

        def call(input_ids, positions, *args):
            shapes.append((tuple(input_ids.shape), tuple(positions.shape), torch.is_grad_enabled()))
            return compiled(input_ids, positions, *args)

        return call

    monkeypatch.setattr(torch, "compile", recording)
    train = make_text_file(str(tmp_path / "t.txt"), 70, seed=3)
    args = tiny_args(
        tiny_config_dir,
        tokenizer_path,
        str(tmp_path / "out"),
        str(tmp_path / "cache"),
        train_file=train,
        num_train_epochs=2,
        torch_compile="true",
        logging_steps=50,
    )
    for line_by_line in ("false", "true"):
        shapes.clear()
        assert train_ddp.main(args + ["--line_by_line", line_by_line, "--overwrite_output_dir", "true"]) == 0
        banner = capfd.readouterr().out
        examples = int(re.search(r"train\s+(\d+) examples", banner).group(1))
        assert examples % 4 != 0, examples  # the last batch of each epoch is partial: a real test of filling it
        history = read_json(str(tmp_path / "out" / "training_history.json"))
        assert len([h for h in history if "eval" in h]) == 3  # at the start and after each epoch
        assert len(set(shapes)) == 1 and shapes[0][0] == (4, 32) and shapes[0][2], set(shapes)
        assert len(shapes) == history[-1]["step"]


def test_compile_with_gradient_checkpointing_under_ddp_trains_like_eager(tmp_path, tiny_config_dir, tokenizer_path):
    """2 gloo ranks, --torch_compile --gradient_checkpointing (graph capture through AOTAutograd; inductor's
    code generation is left to tests/gpu) end with the weights of the eager run. The eager reference is one
    rank with accumulation 2, in this process: the same global batch (invariant 2, test_ddp.py)."""
    from helpers import train_here
    from safetensors.torch import load_file

    train = make_text_file(str(tmp_path / "t.txt"), 200, seed=4)
    outs = {}
    for mode, extra in (
        ("eager", {"gradient_accumulation_steps": 2}),
        ("compiled", {"torch_compile": "true", "gradient_checkpointing": "true"}),
    ):
        out = str(tmp_path / mode)
        args = tiny_args(
            tiny_config_dir,
            tokenizer_path,
            out,
            str(tmp_path / "cache"),
            train_file=train,
            max_train_steps=4,
            eval_on_start="false",
            **extra,
        )
        if mode == "eager":
            assert train_here(args) == 0
        else:
            r = run_train(args, nproc=2, timeout=240, fault={"compile_backend": "aot_eager"})
            assert r.returncode == 0, r.output[-3000:]
        losses = [h["loss"] for h in read_json(os.path.join(out, "training_history.json")) if "loss" in h]
        outs[mode] = (load_file(os.path.join(out, "checkpoints", "step-4", "model.safetensors")), losses)
    (eager, eager_losses), (compiled, compiled_losses) = outs["eager"], outs["compiled"]
    diff = max((eager[k] - compiled[k]).abs().max().item() for k in eager)
    assert diff <= 1e-5, diff
    assert len(eager_losses) == 4 and eager_losses[0] != eager_losses[-1]  # it trained
    assert compiled_losses == pytest.approx(eager_losses, abs=1e-5)
