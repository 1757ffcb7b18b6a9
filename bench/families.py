"""Training throughput per model family on the CPU: our step vs the Hugging Face Trainer + its collator.

    python bench/families.py [--families bert,deberta-v3,...] [--warmup 2 --steps 6 --repeats 2]

For each family, a random masked LM of MiniLM's size (6 layers, hidden 384, 6 heads, intermediate 1536) with the
family's real vocabulary size (BERT 30522, RoBERTa 50265, XLM-R 250002, DeBERTa-v3 128100, ModernBERT 50368,
ALBERT 30522 here (30000 in albert-base, below the WordPiece data's ids), ...): the vocabulary head is where the
masked-only head saves work, so its size is kept. Both
sides train the same saved model (the same seed for the fresh weights), on the same WikiText-2 chunks of 128
tokens (MiniLM's WordPiece ids, valid in every vocabulary), batch 16, fp32, one process, every core, with
transformers' own attention choice (SDPA, eager for DeBERTa). Runs alternate ours, HF, ours, HF. Prints a
markdown table; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import common
import torch
from train_throughput import hf_dataset, load_chunks, run_hf, run_ours

from mlm.config import TrainConfig
from mlm.model.heads import head_path

SIZE = dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=6, intermediate_size=1536)


def family_config(name: str):
    import transformers as t

    if name == "bert":
        return t.BertConfig(vocab_size=30522, **SIZE)
    if name == "distilbert":
        return t.DistilBertConfig(vocab_size=30522, dim=384, n_layers=6, n_heads=6, hidden_dim=1536)
    if name == "roberta":
        return t.RobertaConfig(vocab_size=50265, max_position_embeddings=514, pad_token_id=1, **SIZE)
    if name == "xlm-roberta":
        return t.XLMRobertaConfig(vocab_size=250002, max_position_embeddings=514, pad_token_id=1, **SIZE)
    if name == "electra":
        return t.ElectraConfig(vocab_size=30522, embedding_size=128, **SIZE)
    if name == "albert":
        return t.AlbertConfig(
            vocab_size=30522, embedding_size=128, **SIZE
        )  # 30000 in albert-base; the data is WordPiece
    if name == "modernbert":
        return t.ModernBertConfig(
            vocab_size=50368,
            hidden_size=384,
            num_hidden_layers=6,
            num_attention_heads=6,
            intermediate_size=1536,
            pad_token_id=0,
            cls_token_id=101,
            sep_token_id=102,
        )
    if name == "deberta-v3":
        return t.DebertaV2Config(
            vocab_size=128100,
            max_position_embeddings=512,
            relative_attention=True,
            position_buckets=256,
            norm_rel_ebd="layer_norm",
            share_att_key=True,
            pos_att_type=["p2c", "c2p"],
            position_biased_input=False,
            type_vocab_size=0,
            layer_norm_eps=1e-7,
            **SIZE,
        )
    raise ValueError(name)


FAMILIES = ("bert", "distilbert", "roberta", "xlm-roberta", "electra", "albert", "modernbert", "deberta-v3")


def save_model(name: str, directory: str, tokenizer) -> tuple[int, str]:
    """The random model with MiniLM's tokenizer beside it; (parameters, how our step computes its logits)."""
    from transformers import AutoModelForMaskedLM

    torch.manual_seed(0)
    model = AutoModelForMaskedLM.from_config(family_config(name))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return sum(p.numel() for p in model.parameters()), head_path(model)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", default=",".join(FAMILIES))
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--train_file", default=os.path.join(common.WIKITEXT, "wiki.train.raw"))
    a = p.parse_args()
    common.quiet_transformers()
    torch.set_num_threads(os.cpu_count())
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(common.minilm_path())
    chunks = load_chunks(a.train_file, tokenizer, a.seq)
    hf_data = hf_dataset(chunks)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.families.split(","):
            model_dir = os.path.join(tmp, name)
            params, path = save_model(name, model_dir, tokenizer)
            cfg = TrainConfig(
                model_name_or_path=model_dir,
                per_device_train_batch_size=a.batch_size,
                max_seq_length=a.seq,
                precision="fp32",
                attn_implementation="auto",
            )
            ours, hf = [], []
            for _ in range(a.repeats):
                t, _ = run_ours(cfg, tokenizer, chunks, a.warmup, a.steps)
                ours.append(a.steps * a.batch_size / t)
                t, _ = run_hf(cfg, tokenizer, hf_data, a.warmup, a.steps)
                hf.append(a.steps * a.batch_size / t)
                print(f"{name}: ours {ours[-1]:.2f}, HF {hf[-1]:.2f} samples/s", flush=True)
            vocab = family_config(name).vocab_size
            rows.append(
                f"| {name} | {vocab} | {params / 1e6:.1f}M | {path} | "
                f"{common.median(ours):.2f} ({', '.join(f'{x:.2f}' for x in ours)}) | "
                f"{common.median(hf):.2f} ({', '.join(f'{x:.2f}' for x in hf)}) | "
                f"{common.median(ours) / common.median(hf):.2f}x |"
            )
    print(
        f"\n== training throughput per family: ours vs Hugging Face Trainer ==\n"
        f"machine  {common.machine()}; torch threads {torch.get_num_threads()}; {common.versions()}\n"
        f"setup    6 layers x 384 hidden, each family's vocabulary; WikiText-2 chunks of {a.seq}, batch "
        f"{a.batch_size}, fp32, 1 process; {a.warmup} warm-up + {a.steps} timed steps per run, {a.repeats} runs "
        f"per side alternated; medians (runs)\n"
    )
    print(
        "| family | vocabulary | parameters | our logits at | ours samples/s | HF samples/s | ours / HF |\n"
        "| --- | --- | --- | --- | --- | --- | --- |"
    )
    print("\n".join(rows))


if __name__ == "__main__":
    main()
