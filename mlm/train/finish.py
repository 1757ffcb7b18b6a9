"""After training: best/ evaluated on the test split exactly like validation, and its model card completed.

The test split is evaluated once, on the final best/ (not on the last step's weights), by every rank over its
own shard, so the figure is exact for any world size (invariant 3). Rank 0 reads best/ and gives its weights to
the others, so no other node needs to see the output directory.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from typing import Any, Optional

from mlm.common.distributed import broadcast_weights, main_decides
from mlm.common.files import read_json, write_json_atomic, write_text_atomic
from mlm.model.modeling import MaskedLMLoss
from mlm.report.card import CARD_FILE, coverage, model_card
from mlm.report.probe import scalars
from mlm.train.card_facts import card_facts
from mlm.train.engine import EVAL_METRICS, evaluate
from mlm.train.loop import Run
from mlm.train.writes import write_on_main

TEST_RESULTS = "test_results.json"

# (model, tokenizer) -> rows of the card's prediction table; supplied by train_ddp.py from the inference package.
Examples = Callable[[Any, Any], list[list[Any]]]


def _best_weights(best_dir: str, trust_remote_code: bool) -> dict:
    """best/'s weights as the model's own state dict (tied weights included)."""
    import torch
    from transformers import AutoModelForMaskedLM

    return AutoModelForMaskedLM.from_pretrained(
        best_dir, dtype=torch.float32, trust_remote_code=trust_remote_code
    ).state_dict()


def best_model(run: Run, on_every_rank: bool) -> Optional[MaskedLMLoss]:
    """The exported best/, read by rank 0; broadcast to the others when on_every_rank (the test split is
    evaluated by all), else on rank 0 alone (None elsewhere)."""
    best = os.path.join(run.cfg.output_dir, "best")
    weights = main_decides(run.env, lambda: _best_weights(best, run.cfg.trust_remote_code))
    if not (on_every_rank or run.env.is_main):
        return None
    model = copy.deepcopy(run.trainable.loss.model)
    if weights is not None:
        model.load_state_dict(weights)
    if on_every_rank:
        broadcast_weights(model, run.env)
    return MaskedLMLoss(model)


def test_best(run: Run, examples: Optional[Examples] = None) -> Optional[dict[str, Any]]:
    """Evaluate best/ on the test split (when there is one), write test_results.json and best/eval_results.json,
    complete best/README.md, print and log the figures. Collective: every rank calls it after fit()."""
    cfg, env, state = run.cfg, run.env, run.state
    best = os.path.join(cfg.output_dir, "best")
    testing = run.data.test_loader is not None
    if not testing and examples is None:
        return None
    loss = best_model(run, on_every_rank=testing)
    test = evaluate(loss, run.data.test_loader, env, run.masking, run.trainable.precision) if testing else None

    def write() -> None:
        saved = read_json(os.path.join(best, "eval_results.json"))
        prefix = "swa_" if saved.get("swa") else ""
        validation = {k: saved[prefix + k] for k in EVAL_METRICS if prefix + k in saved}
        if prefix + "probe" in saved:  # the probe of what best/ holds (the SWA average's own, when it is that)
            validation["probe"] = saved[prefix + "probe"]
        if test is not None:
            write_json_atomic(os.path.join(cfg.output_dir, TEST_RESULTS), {"step": saved["step"], **test})
            write_json_atomic(
                os.path.join(best, "eval_results.json"), {**saved, **{f"test_{k}": v for k, v in test.items()}}
            )
            run.tracker.log_test(state.step, test)
            run.tracker.write(
                f"test (best/ from step {saved['step']}): loss {test['loss']:.4f} perplexity "
                f"{test['perplexity']:.3f} accuracy {test['accuracy']:.4f} ({test['masked_tokens']} "
                f"masked tokens{'; ' + coverage(test) if coverage(test) else ''}) -> "
                f"{os.path.join(cfg.output_dir, TEST_RESULTS)}"
            )
        rows = examples(loss.model, run.tokenizer) if examples is not None else None
        facts = card_facts(
            run, validation, best_step=saved["step"], epoch=saved.get("epoch", 0.0), test=test, examples=rows
        )
        write_text_atomic(os.path.join(best, CARD_FILE), model_card(facts))
        if facts.probe and facts.probe.get("compared"):  # did it help the task: said last, beside the test figure
            run.tracker.write(f"your task ({facts.probe['origin']}): {facts.probe['compared']}")
            run.tracker.summary({f"base/probe_{k}": v for k, v in scalars(facts.probe["base"] or {}).items()})

    write_on_main(env, cfg.output_dir, state.step, "the test results and the model card", write)
    return test
