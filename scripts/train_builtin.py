#!/usr/bin/env python
"""Trains the built-in MoE language models shipped in dualsparse/builtin.

    python scripts/train_builtin.py                  # tokenizer, held-out sample, both models
    python scripts/train_builtin.py --model olmoe    # one model (reuses the tokenizer)

Data: the three corpora of ../shared/data (Austen, Brown, State of the Union).
The last 5% of each corpus (cut at a paragraph boundary) is held out: it is
never trained on, the packaged evaluation sample (``heldout.txt.gz``) is cut
from it, and the held-out perplexities reported in ``TRAINING.json`` are
measured on it.

Deterministic from ``--seed`` for a given torch version and thread count
(``--threads``, default 2): the byte-level BPE tokenizer is trained on the
same text, the batches are drawn by a seeded NumPy generator, and torch's
seed fixes the initialisation.  Each model folder gets ``TRAINING.json``
with the settings, the wall time, the loss curve and the final losses.
Weights are stored in bfloat16 so that all models together stay under 20 MB.
"""
from __future__ import annotations

import argparse
import json
import math
import pathlib
import platform
import re
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dualsparse.text import paragraphs, read_text  # noqa: E402

CORPORA = ("austen", "brown", "sotu")
HELDOUT_FRACTION = 0.05
SAMPLE_CHARS = 120_000          # per corpus, in the packaged held-out sample
EOS = "<|endoftext|>"

MODELS = {
    # Mixtral-style: 8 experts, top-2, top-k weights renormalised to sum to 1.
    "mixtral": dict(arch="MixtralForCausalLM", kwargs=dict(
        hidden_size=192, intermediate_size=160, num_hidden_layers=4, num_attention_heads=6,
        num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=1024,
        tie_word_embeddings=True, router_aux_loss_coef=0.02)),
    # OLMoE-style: 32 small experts, top-4, raw softmax probabilities (no renormalisation).
    "olmoe": dict(arch="OlmoeForCausalLM", kwargs=dict(
        hidden_size=192, intermediate_size=40, num_hidden_layers=4, num_attention_heads=6,
        num_key_value_heads=6, num_experts=32, num_experts_per_tok=4, norm_topk_prob=False,
        max_position_embeddings=1024, tie_word_embeddings=True, router_aux_loss_coef=0.02)),
}


def clean_brown(text: str) -> str:
    """Undo the Brown corpus's token spacing: ``word , word`` -> ``word, word``."""
    t = text.replace("``", '"').replace("''", '"')
    t = re.sub(r" ([,.;:?!%)\]])", r"\1", t)
    t = re.sub(r"([(\[$]) ", r"\1", t)
    t = re.sub(r" (n't|'s|'re|'ve|'ll|'d|'m)\b", r"\1", t)
    t = re.sub(r'" ([^"\n]*?) "', r'"\1"', t)
    return t


def load_corpus(data_dir: pathlib.Path, name: str, limit_chars: int = 0):
    """(train paragraphs, held-out paragraphs) of one corpus."""
    text = read_text(data_dir / f"{name}.txt.gz")
    if limit_chars:
        text = text[:limit_chars]
    if name == "brown":
        # one sentence per line and no blank lines: group 8 sentences per paragraph
        lines = [ln for ln in clean_brown(text).splitlines() if ln.strip()]
        paras = [" ".join(lines[i:i + 8]) for i in range(0, len(lines), 8)]
    else:
        paras = paragraphs(text)
    total = sum(len(p) for p in paras)
    acc, cut = 0, len(paras)
    for i, p in enumerate(paras):
        acc += len(p)
        if acc >= (1.0 - HELDOUT_FRACTION) * total:
            cut = i + 1
            break
    return paras[:cut], paras[cut:]


def train_tokenizer(texts, vocab_size: int, out_dir: pathlib.Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=EOS,
                                   unk_token=None, model_max_length=1024)
    fast.save_pretrained(out_dir)
    write_tokenizer_config(out_dir)
    return fast


def write_tokenizer_config(out_dir: pathlib.Path) -> None:
    """A tokenizer_config.json that both transformers 4.x and 5.x read
    (5.x's save_pretrained names a class 4.x does not have)."""
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": EOS, "eos_token": EOS, "pad_token": EOS,
           "model_max_length": 1024, "clean_up_tokenization_spaces": False}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    for extra in ("special_tokens_map.json",):
        (out_dir / extra).unlink(missing_ok=True)


def encode_stream(tok, paras) -> np.ndarray:
    eos = tok.convert_tokens_to_ids(EOS)
    ids = []
    for chunk in range(0, len(paras), 2000):
        for enc in tok(paras[chunk:chunk + 2000], add_special_tokens=False, verbose=False)["input_ids"]:
            ids.extend(enc)
            ids.append(eos)
    return np.asarray(ids, dtype=np.int32)


def router_summary(model, ids, seq_len: int):
    """Mean top-1 share of the top-k normalised scores per layer, on held-out text."""
    import torch

    out = {}
    x = torch.as_tensor(ids[: (len(ids) // seq_len) * seq_len][: 8 * seq_len].reshape(-1, seq_len), dtype=torch.long)
    with torch.no_grad():
        res = model(input_ids=x, output_router_logits=True)
    k = model.config.num_experts_per_tok
    for i, logits in enumerate(res.router_logits):
        p = torch.softmax(logits.float(), -1)
        top = torch.topk(p, k, dim=-1).values
        s = top / top.sum(-1, keepdim=True)
        out[f"layer{i}"] = {"mean_top1_share": round(float(s[:, 0].mean()), 4),
                            "mean_lowest_share": round(float(s[:, -1].mean()), 4),
                            "quartiles_lowest_share": [round(float(q), 4) for q in
                                                       torch.quantile(s[:, -1], torch.tensor([0.25, 0.5, 0.75]))]}
    return out


def evaluate(model, ids: np.ndarray, seq_len: int, batch: int = 16) -> float:
    import torch

    n = (len(ids) - 1) // seq_len
    if n == 0:
        return float("nan")
    x = torch.as_tensor(ids[: n * seq_len + 1], dtype=torch.long)
    tot, cnt = 0.0, 0
    with torch.no_grad():
        for b in range(0, n, batch):
            rows = range(b, min(n, b + batch))
            inp = torch.stack([x[r * seq_len:(r + 1) * seq_len] for r in rows])
            tgt = torch.stack([x[r * seq_len + 1:(r + 1) * seq_len + 1] for r in rows])
            logits = model(input_ids=inp).logits.float()
            tot += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1),
                                                           reduction="sum"))
            cnt += tgt.numel()
    return tot / cnt


def train_model(name, tok, train_ids, held_ids, out_dir: pathlib.Path, args):
    import torch
    import transformers

    spec = MODELS[name]
    cls = getattr(transformers, spec["arch"])
    cfg_cls = getattr(transformers, spec["arch"].replace("ForCausalLM", "Config"))
    eos = tok.convert_tokens_to_ids(EOS)
    cfg = cfg_cls(vocab_size=len(tok), bos_token_id=eos, eos_token_id=eos, pad_token_id=eos, **spec["kwargs"])
    cfg.output_router_logits = True
    torch.manual_seed(args.seed)
    model = cls(cfg)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))
    rng = np.random.default_rng(args.seed)
    S, B = args.seq_len, args.batch
    hi = len(train_ids) - S - 1

    def lr_at(step):
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        frac = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    curve, t0, ema = [], time.perf_counter(), None
    for step in range(args.steps):
        starts = rng.integers(0, hi, size=B)
        batch = torch.as_tensor(np.stack([train_ids[s:s + S] for s in starts]), dtype=torch.long)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        out = model(input_ids=batch, labels=batch)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        lm = float(out.loss) - cfg.router_aux_loss_coef * float(out.aux_loss)
        ema = lm if ema is None else 0.98 * ema + 0.02 * lm
        if step % 50 == 0 or step == args.steps - 1:
            curve.append({"step": step, "lm_loss": round(lm, 4), "aux_loss": round(float(out.aux_loss), 4),
                          "seconds": round(time.perf_counter() - t0, 1)})
            print(f"[{name}] step {step:5d}  lm loss {lm:.3f} (ema {ema:.3f})  aux {float(out.aux_loss):.3f}  "
                  f"{time.perf_counter() - t0:.0f}s", flush=True)
    train_seconds = time.perf_counter() - t0
    model.eval()
    model.config.output_router_logits = False
    held_fp32 = {c: evaluate(model, ids, S) for c, ids in held_ids.items()}
    model = model.to(torch.bfloat16)
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    write_tokenizer_config(out_dir)
    # the stored (bf16) weights, as users load them, evaluated in float32
    reloaded = cls.from_pretrained(out_dir, **{("dtype" if transformers.__version__ >= "5" else "torch_dtype"):
                                               torch.float32})
    reloaded.eval()
    held_stored = {c: evaluate(reloaded, ids, S) for c, ids in held_ids.items()}
    unigram = {}
    counts = np.bincount(train_ids, minlength=len(tok)).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    for c, ids in held_ids.items():
        unigram[c] = float(-logp[ids].mean())
    info = {
        "model": name, "architecture": spec["arch"], "parameters": n_params,
        "config": spec["kwargs"], "vocab_size": len(tok),
        "training": {"steps": args.steps, "batch": B, "seq_len": S, "tokens_seen": args.steps * B * S,
                     "lr": args.lr, "warmup": args.warmup, "schedule": "linear warmup, cosine to 10%",
                     "weight_decay": args.weight_decay, "betas": [0.9, 0.95], "grad_clip": 1.0,
                     "seed": args.seed, "threads": args.threads, "train_tokens_available": int(len(train_ids)),
                     "wall_seconds": round(train_seconds, 1)},
        "final_train_lm_loss_ema": round(ema, 4),
        "heldout_ppl_fp32": {c: round(math.exp(v), 2) for c, v in held_fp32.items()},
        "heldout_ppl_stored_bf16": {c: round(math.exp(v), 2) for c, v in held_stored.items()},
        "heldout_ppl_unigram": {c: round(math.exp(v), 2) for c, v in unigram.items()},
        "router_normalised_scores": router_summary(reloaded, np.concatenate(list(held_ids.values())), S),
        "loss_curve": curve,
        "environment": {"torch": torch.__version__, "transformers": transformers.__version__,
                        "python": platform.python_version(), "machine": platform.machine()},
    }
    (out_dir / "TRAINING.json").write_text(json.dumps(info, indent=1) + "\n")
    print(json.dumps({k: info[k] for k in ("heldout_ppl_stored_bf16", "heldout_ppl_unigram")}, indent=1))
    return info


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--out", default=str(ROOT / "dualsparse" / "builtin"))
    ap.add_argument("--model", choices=[*MODELS, "all"], default="all")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--limit-chars", type=int, default=0,
                    help="use only the first N characters of each corpus (smoke tests; 0: all)")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    data_dir = pathlib.Path(args.data_dir)
    if not data_dir.is_dir():
        sys.exit(f"train_builtin: data folder {data_dir} not found (the corpora of ../shared/data are needed)")
    out = pathlib.Path(args.out)
    models_dir = out / "models"
    tok_dir = out / "tokenizer"
    train_paras, held_paras = [], {}
    for c in CORPORA:
        tr, he = load_corpus(data_dir, c, args.limit_chars)
        train_paras.extend(tr)
        held_paras[c] = he
    if not (tok_dir / "tokenizer.json").is_file():
        print("training the tokenizer ...", flush=True)
        train_tokenizer(train_paras, args.vocab_size, tok_dir)
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(tok_dir)
    # the packaged held-out sample: the first SAMPLE_CHARS of each held-out tail
    sample = []
    for c in CORPORA:
        n = 0
        for p in held_paras[c]:
            if n >= SAMPLE_CHARS:
                break
            sample.append(p)
            n += len(p)
    import gzip

    with gzip.GzipFile(out / "heldout.txt.gz", "wb", mtime=0) as f:
        f.write(("\n\n".join(sample) + "\n").encode("utf-8"))
    train_ids = encode_stream(tok, train_paras)
    held_ids = {c: encode_stream(tok, held_paras[c]) for c in CORPORA}
    print(f"{len(train_ids)} training tokens; held out: " + ", ".join(f"{c} {len(v)}" for c, v in held_ids.items()),
          flush=True)
    names = list(MODELS) if args.model == "all" else [args.model]
    for name in names:
        d = models_dir / name
        d.mkdir(parents=True, exist_ok=True)
        train_model(name, tok, train_ids, held_ids, d, args)
    total = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"built-in package data: {total / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
