"""Issue 7 (b): --streaming on local files read as a stream, under torchrun with 2 ranks.

The WikiText-2 files from ../shared when they are there (generated WikiText-style files otherwise): the ranks
see disjoint data; the run trains, evaluates exactly, checkpoints, and resumes where the stream was, so no
training example is seen twice within the epoch. Examples are recorded by tests/faulty_train.py.
"""

import json
import math
import os
from collections import Counter

import pytest
from helpers import make_text_file, read_json, run_train, tiny_args

BATCH, SEQ = 8, 64


def records(prefix: str, rank: int) -> list[dict]:
    path = f"{prefix}.rank{rank}"
    if not os.path.exists(path):
        return []
    with open(path) as fh:
        return [json.loads(line) for line in fh]


def stream_args(tmp_path, tiny_config_dir, tokenizer_path, wikitext_dir, out, **kw) -> list[str]:
    opts = dict(
        dataset_dir=wikitext_dir,
        streaming="true",
        max_seq_length=SEQ,
        per_device_train_batch_size=BATCH,
        max_eval_samples=48,
        eval_steps=4,
        shuffle_buffer_size=300,
        seed=5,
    )
    return tiny_args(tiny_config_dir, tokenizer_path, out, str(tmp_path / "cache"), **{**opts, **kw})


def test_streaming_disjoint_exact_eval_and_resume_without_repeats(
    tmp_path, tiny_config_dir, tokenizer_path, wikitext_dir
):
    out, rec = str(tmp_path / "run"), str(tmp_path / "seen")
    args = stream_args(tmp_path, tiny_config_dir, tokenizer_path, wikitext_dir, out, max_train_steps=10)
    # First attempt: SIGTERM to rank 1 after step 6; the ranks agree, save step-6 (with the stream position)
    # and exit 143.
    r = run_train(args, nproc=2, fault={"kind": "sigterm", "rank": 1, "step": 6, "record": rec})
    assert r.returncode != 0 and "checkpoint saved" in r.output, r.output[-3000:]
    assert os.path.isdir(os.path.join(out, "checkpoints", "step-6"))
    first = [records(rec, k) for k in (0, 1)]
    assert [len(x) for x in first] == [6, 6]
    state = read_json(os.path.join(out, "checkpoints", "step-6", "trainer_state.json"))
    assert [s["num_workers"] for s in state["extra"]["data_states"]] == [1, 1]
    # Second attempt: the same command resumes from step 6 and finishes at 10.
    r = run_train(args, nproc=2, fault={"record": rec})
    assert r.returncode == 0, r.output[-3000:]
    assert "resuming from" in r.output and "continues from its saved position" in r.output
    both = [records(rec, k) for k in (0, 1)]
    assert [len(x) for x in both] == [10, 10]

    hashes = {k: [h for b in both[k] for h in b["hash"]] for k in (0, 1)}
    # Disjoint ranks, and no example trained on twice in the epoch across the resume.
    assert not set(hashes[0]) & set(hashes[1])
    for k in (0, 1):
        repeated = [h for h, n in Counter(hashes[k]).items() if n > 1]
        assert not repeated, f"rank {k} saw {len(repeated)} examples twice"
        assert all(b["epoch"] == 0 for b in both[k])
    # Indices: unique over the ranks, and the resumed run continues the count where the first stopped.
    indices = [i for k in (0, 1) for b in both[k] for i in b["index"]]
    assert sorted(indices) == list(range(2 * 10 * BATCH))
    assert [b["index"][0] for b in both[1]] == [(s * BATCH) * 2 + 1 for s in range(10)]

    history = read_json(os.path.join(out, "training_history.json"))
    evals = {e["step"]: e["eval"] for e in history if "eval" in e}
    assert sorted(evals) == [0, 4, 8, 10]
    assert evals[10]["loss"] < evals[0]["loss"]  # it trains

    # Exact evaluation: the streamed run's step-0 evaluation equals a plain one-process evaluation of the same
    # validation file with the same initial model.
    plain = str(tmp_path / "plain")
    r = run_train(
        tiny_args(
            tiny_config_dir,
            tokenizer_path,
            plain,
            str(tmp_path / "cache"),
            dataset_dir=wikitext_dir,
            max_seq_length=SEQ,
            max_eval_samples=48,
            seed=5,
            do_train="false",
            per_device_eval_batch_size=5,
        ),
        nproc=0,
    )
    assert r.returncode == 0, r.output[-3000:]
    ref = read_json(os.path.join(plain, "eval_results.json"))
    assert ref["masked_tokens"] == evals[0]["masked_tokens"] > 0
    assert math.isclose(ref["loss"], evals[0]["loss"], rel_tol=0, abs_tol=1e-6)


def test_streaming_epochs_end_together_and_reshuffle(tmp_path, tiny_config_dir, tokenizer_path):
    """A stream shorter than the run: every rank starts each new epoch at the same step (no hang), and each
    epoch reads every example once in a new order."""
    data = tmp_path / "small"
    data.mkdir()
    make_text_file(str(data / "wiki.train.raw"), n_lines=500, seed=6)
    make_text_file(str(data / "wiki.valid.raw"), n_lines=80, seed=7)
    out, rec = str(tmp_path / "run"), str(tmp_path / "seen")
    r = run_train(
        stream_args(
            tmp_path,
            tiny_config_dir,
            tokenizer_path,
            str(data),
            out,
            max_train_steps=30,
            eval_steps=30,
            shuffle_buffer_size=50,
        ),
        nproc=2,
        fault={"record": rec},
    )
    assert r.returncode == 0, r.output[-3000:]
    seen = [records(rec, k) for k in (0, 1)]
    epochs = [sorted({b["epoch"] for b in s}) for s in seen]
    assert epochs[0] == epochs[1] and len(epochs[0]) >= 3
    for e in epochs[0]:
        per_rank = [[h for b in s if b["epoch"] == e for h in b["hash"]] for s in seen]
        assert len(per_rank[0]) == len(per_rank[1])  # the same steps in every epoch on both ranks
        assert len(set(per_rank[0])) == len(per_rank[0]) and not set(per_rank[0]) & set(per_rank[1])
    first, second = ([h for b in seen[0] if b["epoch"] == e for h in b["hash"]] for e in epochs[0][:2])
    # A new shuffle each epoch: texts come in another order, so they pack into other examples.
    assert len(first) == len(second) and not set(first) & set(second)

    # A run saved exactly at the end of an epoch's stream resumes into the next epoch (nothing is left of the
    # old one when it restarts, which is not an empty stream).
    per_epoch = len([b for b in seen[0] if b["epoch"] == 0])
    out2, rec2 = str(tmp_path / "run2"), str(tmp_path / "seen2")
    args = stream_args(
        tmp_path, tiny_config_dir, tokenizer_path, str(data), out2, eval_steps=100, shuffle_buffer_size=50
    )
    r = run_train(args + ["--max_train_steps", str(per_epoch)], nproc=2, fault={"record": rec2})
    assert r.returncode == 0, r.output[-3000:]
    r = run_train(args + ["--max_train_steps", str(per_epoch + 2)], nproc=2, fault={"record": rec2})
    assert r.returncode == 0 and "resuming from" in r.output, r.output[-3000:]
    assert [b["epoch"] for b in records(rec2, 0)] == [0] * per_epoch + [1, 1]


def test_streaming_workers_do_not_hang_when_tokenizer_parallelism_is_asked_for(
    tmp_path, tiny_config_dir, tokenizer_path, wikitext_dir
):
    """TOKENIZERS_PARALLELISM=true: a tokenizer thread pool used before the loader workers fork deadlocks
    them (this hung every time before the fix). The run must finish."""
    out = str(tmp_path / "run")
    r = run_train(
        stream_args(
            tmp_path,
            tiny_config_dir,
            tokenizer_path,
            wikitext_dir,
            out,
            max_train_steps=3,
            max_eval_samples=16,
            max_seq_length=32,
        ),
        nproc=0,
        timeout=120,
        extra_env={"TOKENIZERS_PARALLELISM": "true"},
    )
    assert r.returncode == 0, r.output[-3000:]
    assert "finished at step 3" in r.output


@pytest.mark.parametrize("streaming", [False, True], ids=["cached", "streamed"])
@pytest.mark.parametrize("broken", ["train", "validation"])
def test_a_malformed_json_line_is_named_the_same_way_on_both_paths(
    streaming, broken, tmp_path, tiny_config_dir, tokenizer_path, capfd
):
    """A JSON Lines file with a broken row: one line naming the file and the row's line, on the cached path
    and on the streamed one (where it is met in a loader worker, or while the validation split is read)."""
    import train_ddp

    good = "".join(json.dumps({"text": f"the cat sat on the mat number {i} ."}) + "\n" for i in range(300))
    files = {}
    for split in ("train", "validation"):
        lines = good.splitlines(keepends=True)
        if split == broken:
            lines[2] = '{"text": "a row cut short\n'
        (tmp_path / f"{split}.jsonl").write_text("".join(lines))
        files[split] = str(tmp_path / f"{split}.jsonl")
    args = tiny_args(
        tiny_config_dir,
        tokenizer_path,
        str(tmp_path / "out"),
        str(tmp_path / "cache"),
        train_file=files["train"],
        validation_file=files["validation"],
        max_train_steps=2,
    )
    code = train_ddp.main(args + (["--streaming"] if streaming else []))
    out, err = capfd.readouterr()
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in out + err, out[-2000:] + err[-3000:]
    assert f"'{files[broken]}' line 3 is not valid JSON" in errors[0], errors[0]


def test_a_stream_that_breaks_in_a_loader_worker_names_the_json_line(tmp_path):
    """Past the first rows (which open_split reads), a broken row is met by a loader worker: PackedBatches
    names its line as the cached path does; any other failure keeps its own type."""
    from mlm.common.cli import LocalUserError
    from mlm.data.streaming import PackedBatches

    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "fine"}\n' * 5 + '{"text": "cut\n')

    class Broken:
        def __iter__(self):
            yield {"input_ids": [5, 6]}
            raise ValueError("JSON parse error: Missing a closing quotation mark in string. in row 5")

        def state_dict(self):
            return {}

    with pytest.raises(LocalUserError, match=r"train.jsonl' line 6 is not valid JSON"):
        list(PackedBatches(Broken(), 4, 8, 101, 102, files=[str(path)]))
    with pytest.raises(ValueError, match="JSON parse error"):  # no local JSON file to name: as it was
        list(PackedBatches(Broken(), 4, 8, 101, 102))
