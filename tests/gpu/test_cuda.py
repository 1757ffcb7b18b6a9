"""Issue 14 (e): the GPU path on a real GPU, one card. bench/gpu_check.sh runs this file, then the throughput table.

Every figure a test measures (loss gaps between precisions, the resume and compile differences) is printed on a
line starting with "measured:", so a run's log states the tolerance reached next to the one asserted.

MLM_GPU_TESTS_DRY_RUN=1 runs the same code on a CPU with a tiny model (no CUDA-only checks): a check of the
tests themselves before GPU time is spent on them, not a test of the GPU path.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys

import pytest
import torch
from helpers import ROOT, read_json, write_tiny_config

import train_ddp
from mlm.common.distributed import DistEnv
from mlm.config import TrainConfig
from mlm.data.cached import ChunkDataset, tokenize_texts
from mlm.data.sources import read_text_file
from mlm.model.modeling import MaskedLMLoss, build_model, load_model_config, load_tokenizer
from mlm.report import metrics
from mlm.train import engine, loop
from mlm.train.optim import build_optimizer

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda", 0) if ON_GPU else torch.device("cpu")
if ON_GPU:
    SMALL_BERT = dict(
        hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024, max_position_embeddings=512
    )
    SEQ, BATCH = 128, 16
else:  # dry run
    SMALL_BERT = dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, max_position_embeddings=512
    )
    SEQ, BATCH = 32, 4
NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
needs_gpu = pytest.mark.skipif(not ON_GPU, reason="CUDA-only check (dry run on a CPU)")


def measured(test: str, **figures) -> None:
    print(
        f"measured: {test}: "
        + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in figures.items()),
        flush=True,
    )


def low_precision() -> str:
    """What --precision auto picks here: bf16 from compute capability 8.0, else fp16 (fp32 in a dry run)."""
    return engine.resolve_precision("auto", DEVICE) if ON_GPU else "bf16"


@pytest.fixture(scope="module")
def configs(tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("configs")
    return {
        "dropout": write_tiny_config(str(d / "dropout"), **SMALL_BERT),
        "no_dropout": write_tiny_config(str(d / "no_dropout"), **SMALL_BERT, **NO_DROPOUT),
    }


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("data-cache"))


def train_args(config_dir: str, tokenizer: str, wikitext: str, out: str, cache: str, **kw) -> list[str]:
    opts = {
        "config_name": config_dir,
        "tokenizer_name": tokenizer,
        "dataset_dir": wikitext,
        "output_dir": out,
        "data_cache_dir": cache,
        "max_seq_length": SEQ,
        "per_device_train_batch_size": BATCH,
        "per_device_eval_batch_size": 32,
        "max_train_samples": 64 * BATCH,
        "max_eval_samples": 128,
        "report_to": "none",
        "logging_steps": 1,
        "learning_rate": 5e-4,
        "warmup_ratio": 0.0,
        "eval_on_start": "false",
        **kw,
    }
    return [a for k, v in opts.items() for a in (f"--{k}", str(v))]


def train(args: list[str]) -> int:
    """train_ddp.py in this process (a world of one on cuda:0): no start-up cost per run."""
    if ON_GPU:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return train_ddp.main(args)


def weights(out: str, step: int) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(os.path.join(out, "checkpoints", f"step-{step}", "model.safetensors"))


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def train_entries(out: str) -> list[dict]:
    return [h for h in read_json(os.path.join(out, "training_history.json")) if "loss" in h]


# ---------------------------------------------------------------------- precision and peak of this card
@needs_gpu
def test_this_card_gets_its_precision_and_its_peak():
    capability, name = torch.cuda.get_device_capability(0), torch.cuda.get_device_name(0)
    precision = engine.resolve_precision("auto", DEVICE)
    assert precision == ("bf16" if capability >= (8, 0) else "fp16")
    peak, source = metrics.device_peak(DEVICE, precision)
    measured(
        "card",
        name=name,
        capability=f"{capability[0]}.{capability[1]}",
        auto=precision,
        peak_tflops=peak / 1e12,
        source=source,
    )
    assert peak > 1e12


# ---------------------------------------------------------------------- fp16 and bf16 follow fp32
def step_losses(precision: str, config_dir: str, tokenizer_dir: str, wikitext: str, steps: int = 30):
    """Per-step training loss of `steps` optimizer steps of our step (prepare_batch + train_step) in one precision,
    from the same initial weights on the same batches; and how many steps were skipped."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # the reference is true fp32
    cfg = TrainConfig(config_name=config_dir, tokenizer_name=tokenizer_dir, learning_rate=5e-4, num_warmup_steps=0)
    tokenizer = load_tokenizer(cfg)
    model = build_model(cfg, load_model_config(cfg), tokenizer).to(DEVICE)  # seeded: the same in every precision
    trainable = engine.build_trainable(cfg, model, precision, DEVICE, steps)
    trainable.loss.train()
    masking = engine.build_masking(cfg, tokenizer)
    texts = read_text_file(os.path.join(wikitext, "wiki.train.raw"))[:4000]
    chunks = ChunkDataset(tokenize_texts(tokenizer, texts), SEQ, tokenizer.cls_token_id, tokenizer.sep_token_id)
    env = DistEnv(rank=0, local_rank=0, world_size=1, device=DEVICE)
    losses, skipped = [], 0
    for step in range(steps):
        raw = chunks.__getitems__(list(range(step * BATCH, (step + 1) * BATCH)))
        batch = engine.prepare_batch(raw, 0, masking, DEVICE)
        r = engine.train_step(trainable, [batch], env)
        losses.append(float(r.loss_sum) / r.masked_tokens)
        skipped += int(r.skipped)
    return losses, skipped


def test_fp16_and_bf16_follow_the_fp32_loss(configs, gpu_tokenizer, gpu_wikitext):
    """30 steps from the same weights on the same batches: the low-precision losses stay within 3% of fp32's
    at every step after the first 5 (and within 1.5% on average over the last 10)."""
    reference, _ = step_losses("fp32", configs["no_dropout"], gpu_tokenizer, gpu_wikitext)
    assert reference[-1] < reference[0] - (0.5 if ON_GPU else 0.05), reference  # it learns: a real comparison
    precisions = ["fp16", "bf16"] if not ON_GPU or torch.cuda.get_device_capability(0) >= (8, 0) else ["fp16"]
    for precision in precisions:
        losses, skipped = step_losses(precision, configs["no_dropout"], gpu_tokenizer, gpu_wikitext)
        gaps = [abs(a - b) / b for a, b in zip(losses, reference)]
        late = sum(gaps[-10:]) / 10
        measured(
            f"{precision} vs fp32 loss",
            max_relative_gap_after_step_5=max(gaps[5:]),
            mean_gap_last_10=late,
            skipped_steps=skipped,
            fp32_first=reference[0],
            fp32_last=reference[-1],
            last=losses[-1],
        )
        assert max(gaps[5:]) <= 0.03 and late <= 0.015, (precision, gaps)
        assert skipped <= 3


# ---------------------------------------------------------------------- skipped steps
def test_an_injected_fp16_overflow_is_skipped_and_counted(
    configs, gpu_tokenizer, gpu_wikitext, cache_dir, tmp_path, monkeypatch
):
    """fp16 + GradScaler: a loss of inf at step 3 is skipped by the scaler and counted in skipped_steps; the
    history also carries a sane MFU and peak memory (item e, last point)."""
    forward, calls = MaskedLMLoss.forward, {"n": 0}

    def overflow_at_3(self, *args, **kwargs):
        calls["n"] += 1
        nll = forward(self, *args, **kwargs)
        return nll * float("inf") if calls["n"] == 3 else nll

    monkeypatch.setattr(MaskedLMLoss, "forward", overflow_at_3)
    out = str(tmp_path / "fp16")
    precision = "fp16" if ON_GPU else "bf16"  # fp16 needs CUDA (the dry run takes the fused skip instead)
    assert (
        train(
            train_args(
                configs["no_dropout"],
                gpu_tokenizer,
                gpu_wikitext,
                out,
                cache_dir,
                precision=precision,
                max_train_steps=8,
            )
        )
        == 0
    )
    entries = train_entries(out)
    by_step = {e["step"]: e for e in entries}
    assert by_step[3]["skipped_steps"] == 1 and math.isfinite(by_step[4]["loss"]), by_step[3]
    measured("fp16 overflow", skipped_per_step=[e["skipped_steps"] for e in entries])
    last = entries[-1]
    measured(
        "history",
        mfu=last["mfu"],
        peak_memory_gib=last["peak_memory_gib"],
        peak_memory_reserved_gib=last["peak_memory_reserved_gib"],
    )
    assert 0 < last["mfu"] < 1 and last["peak_memory_gib"] > 0
    assert last["peak_memory_reserved_gib"] >= last["peak_memory_gib"]


def test_the_fused_adamw_skip_in_bf16_changes_nothing(configs, gpu_tokenizer):
    from mlm.train.engine import skip_nonfinite_step

    cfg = TrainConfig(config_name=configs["no_dropout"], tokenizer_name=gpu_tokenizer)
    model = build_model(cfg, load_model_config(cfg), load_tokenizer(cfg)).to(DEVICE)
    optimizer = build_optimizer(cfg, model, DEVICE)
    assert optimizer.defaults["fused"]
    ids = torch.randint(1000, 2000, (BATCH, SEQ), device=DEVICE)

    def step(poison: bool) -> None:
        with engine.autocast("bf16", DEVICE):
            loss = model(input_ids=ids, labels=ids).loss
        (loss * (float("nan") if poison else 1.0)).backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        skip_nonfinite_step(optimizer, ~torch.isfinite(norm))
        optimizer.zero_grad(set_to_none=True)

    step(False)
    before = [p.detach().clone() for p in model.parameters()]
    steps = [optimizer.state[p]["step"].clone() for p in model.parameters()]
    step(True)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert all(torch.equal(s, optimizer.state[p]["step"]) for s, p in zip(steps, model.parameters()))
    step(False)
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


# ---------------------------------------------------------------------- exact resume with dropout on
@pytest.fixture(scope="module")
def uninterrupted(configs, gpu_tokenizer, gpu_wikitext, cache_dir, tmp_path_factory) -> tuple[str, list[str]]:
    out = str(tmp_path_factory.mktemp("uninterrupted") / "run")
    args = train_args(
        configs["dropout"],
        gpu_tokenizer,
        gpu_wikitext,
        out,
        cache_dir,
        max_train_steps=8,
        save_steps=4,
        save_total_limit=5,
    )
    assert train(args) == 0
    return out, args


def test_stop_and_resume_with_dropout_ends_with_the_uninterrupted_weights(uninterrupted, tmp_path, monkeypatch):
    reference_out, args = uninterrupted
    out = str(tmp_path / "stopped")
    args = [out if a == reference_out else a for a in args]
    step, done = loop.train_step, {"n": 0}

    def sigterm_after_4(*a, **k):
        result = step(*a, **k)
        done["n"] += 1
        if done["n"] == 4:
            os.kill(os.getpid(), signal.SIGTERM)  # as Kaggle's or SLURM's end of a session
        return result

    with monkeypatch.context() as m:
        m.setattr(loop, "train_step", sigterm_after_4)
        assert train(args) == 143
    assert os.path.isdir(os.path.join(out, "checkpoints", "step-4"))
    assert train(args) == 0  # the same command resumes
    diff = max_diff(weights(reference_out, 8), weights(out, 8))
    moved = max_diff(weights(reference_out, 4), weights(reference_out, 8))
    measured("resume with dropout", max_abs_weight_diff=diff, weights_moved_steps_4_to_8=moved)
    # CPU resumes are bit-exact; on a GPU the attention backward accumulates with atomics (not deterministic).
    assert moved > 1e-4 and diff <= 1e-4


# ---------------------------------------------------------------------- torch.compile
def compile_on_the_cpu(monkeypatch) -> None:
    """The dry run checks the wiring, not inductor's code generation (nor CUDA graphs)."""
    if not ON_GPU:
        real = torch.compile

        def on_cpu(fn, **kwargs):
            kwargs.pop("mode", None)
            return real(fn, **{**kwargs, "backend": "aot_eager"})

        monkeypatch.setattr(torch, "compile", on_cpu)


@pytest.mark.parametrize("compile_mode", ["default", "reduce-overhead"])
def test_torch_compile_trains_and_its_best_matches_eager(
    configs, gpu_tokenizer, gpu_wikitext, cache_dir, tmp_path, monkeypatch, compile_mode
):
    """Compiled (default) and compiled and captured as CUDA graphs (reduce-overhead) against eager."""
    compile_on_the_cpu(monkeypatch)
    results = {}
    compiled_args = {"torch_compile": "true", "torch_compile_mode": compile_mode}
    for mode, extra in (("eager", {}), ("compiled", compiled_args)):
        out = str(tmp_path / mode)
        assert (
            train(
                train_args(
                    configs["no_dropout"], gpu_tokenizer, gpu_wikitext, out, cache_dir, max_train_steps=12, **extra
                )
            )
            == 0
        )
        best = read_json(os.path.join(out, "best", "eval_results.json"))
        results[mode] = (weights(out, 12), best, train_entries(out))
    (eager, eager_best, eager_hist), (compiled, compiled_best, compiled_hist) = results["eager"], results["compiled"]
    # Fused kernels round differently, and AdamW turns a tiny gradient difference on a parameter with a tiny
    # gradient into a whole step: the weights are compared on average, the losses and perplexity closely.
    diff = max_diff(eager, compiled)
    mean_diff = sum((eager[k].float() - compiled[k].float()).abs().sum().item() for k in eager) / sum(
        v.numel() for v in eager.values()
    )
    ppl_gap = abs(compiled_best["perplexity"] - eager_best["perplexity"]) / eager_best["perplexity"]
    loss_gap = max(abs(a["loss"] - b["loss"]) / a["loss"] for a, b in zip(eager_hist, compiled_hist))
    speed = compiled_hist[-1]["samples_per_s"] / eager_hist[-1]["samples_per_s"]
    measured(
        f"torch.compile ({compile_mode}) vs eager",
        max_abs_weight_diff=diff,
        mean_abs_weight_diff=mean_diff,
        max_relative_loss_gap=loss_gap,
        best_perplexity_relative_gap=ppl_gap,
        eager_perplexity=eager_best["perplexity"],
        samples_per_s_ratio_last_log=speed,
    )
    assert len(compiled_hist) == len(eager_hist) == 12
    assert ppl_gap <= 0.01 and loss_gap <= 0.01 and mean_diff <= 5e-5


def test_under_capture_an_overflow_is_skipped_and_a_sigterm_resume_is_exact(
    configs, gpu_tokenizer, gpu_wikitext, cache_dir, tmp_path, monkeypatch
):
    """What holds eagerly holds with the step captured as CUDA graphs (--torch_compile_mode reduce-overhead): an
    injected non-finite loss at step 3 is skipped (GradScaler in fp16, the fused skip in bf16) without a host
    sync, and a run stopped by SIGTERM at a step boundary resumes to the uninterrupted run's weights."""
    compile_on_the_cpu(monkeypatch)
    forward, calls = MaskedLMLoss.forward, {"n": 0}

    def overflow_at_3(self, *args, **kwargs):
        calls["n"] += 1
        nll = forward(self, *args, **kwargs)
        return nll * float("inf") if calls["n"] == 3 else nll

    captured = {"torch_compile": "true", "torch_compile_mode": "reduce-overhead", "precision": low_precision()}
    flags = [a for k, v in captured.items() for a in (f"--{k}", v)]
    out = str(tmp_path / "overflow")
    with monkeypatch.context() as m:
        m.setattr(MaskedLMLoss, "forward", overflow_at_3)
        args = train_args(configs["no_dropout"], gpu_tokenizer, gpu_wikitext, out, cache_dir, max_train_steps=6)
        assert train(args + flags) == 0
    by_step = {e["step"]: e for e in train_entries(out)}
    assert by_step[3]["skipped_steps"] == 1 and math.isfinite(by_step[4]["loss"]), by_step[3]

    whole, stopped = str(tmp_path / "whole"), str(tmp_path / "stopped")
    flags += ["--save_steps", "4", "--save_total_limit", "5"]
    base = train_args(configs["no_dropout"], gpu_tokenizer, gpu_wikitext, whole, cache_dir, max_train_steps=8)
    assert train(base + flags) == 0
    step, done = loop.train_step, {"n": 0}

    def sigterm_after_4(*a, **k):
        result = step(*a, **k)
        done["n"] += 1
        if done["n"] == 4:
            os.kill(os.getpid(), signal.SIGTERM)
        return result

    args = [stopped if a == whole else a for a in base] + flags
    with monkeypatch.context() as m:
        m.setattr(loop, "train_step", sigterm_after_4)
        assert train(args) == 143
    assert train(args) == 0
    diff = max_diff(weights(whole, 8), weights(stopped, 8))
    measured("capture: SIGTERM resume", max_abs_weight_diff=diff)
    assert diff <= 1e-4


# ---------------------------------------------------------------------- predict.py on CUDA
def predictions(model_dir: str, device: str) -> list[dict]:
    p = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "predict.py"),
            "--model",
            model_dir,
            "--json",
            "--device",
            device,
            "--top_k",
            "5",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    return [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]


@needs_gpu
def test_predict_on_cuda_gives_the_cpu_top_k(uninterrupted):
    best = os.path.join(uninterrupted[0], "best")
    cpu, cuda = predictions(best, "cpu"), predictions(best, "cuda")
    assert len(cpu) == len(cuda) == 8
    worst = 0.0
    for a, b in zip(cpu, cuda):
        for ma, mb in zip(a["masks"], b["masks"]):
            assert [c["token_id"] for c in ma["candidates"]] == [c["token_id"] for c in mb["candidates"]]
            worst = max(worst, *(abs(x["score"] - y["score"]) for x, y in zip(ma["candidates"], mb["candidates"])))
        assert [f["token_ids"] for f in a["fills"]] == [f["token_ids"] for f in b["fills"]]
    measured("predict cuda vs cpu", max_score_diff=worst)
    assert worst <= 1e-4


# ---------------------------------------------------------------------- no host sync in steady steps
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_steady_training_steps_never_sync(
    configs, gpu_tokenizer, gpu_wikitext, cache_dir, tmp_path, monkeypatch, precision
):
    """torch.cuda.set_sync_debug_mode('error') from step 6 to step 14 of the real loop (train_ddp.py, SWA on):
    the loader, the masking, the step, the schedule, the meters, SWA and the stop check never wait for the GPU.
    Logging (step 16, the last) and evaluation sync, by design."""
    if precision == "bf16" and ON_GPU and torch.cuda.get_device_capability(0) < (8, 0):
        pytest.skip("no native bf16 on this card")
    if precision == "fp16" and not ON_GPU:
        pytest.skip("fp16 training needs CUDA")
    step, done = loop.train_step, {"n": 0}
    set_mode = torch.cuda.set_sync_debug_mode if ON_GPU else (lambda mode: None)

    def guarded(*a, **k):
        done["n"] += 1
        if done["n"] == 6:
            set_mode("error")
        try:
            return step(*a, **k)
        finally:
            if done["n"] == 14:
                set_mode(0)

    monkeypatch.setattr(loop, "train_step", guarded)
    try:
        out = str(tmp_path / precision)
        code = train(
            train_args(
                configs["dropout"],
                gpu_tokenizer,
                gpu_wikitext,
                out,
                cache_dir,
                precision=precision,
                max_train_steps=16,
                logging_steps=16,
                swa_start_step=2,
            )
        )
    finally:
        set_mode(0)
    assert code == 0 and done["n"] == 16
    measured(f"sync check {precision}", steps_checked="6-14", result="no synchronizing CUDA call")
