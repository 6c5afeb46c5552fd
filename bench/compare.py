#!/usr/bin/env python3
"""qscript against the Python QLoRA stack (transformers + peft + bitsandbytes), same GPU, same run.

Runs, case by case, qscript's benchmarks and ../shared/bench/hf_qlora_anchor.py (both carried to
the GPU machine), then prints a Markdown table with the ratios and writes it, with every JSON
line, to --out. Usage on the GPU machine (see bench/README.md):

    python3 bench/compare.py --qscript .gpu/qscript --anchor .gpu/hf_qlora_anchor.py \
        --cases dequant,small --out $OUT

Cases: dequant, small, 1b, 3b (Llama shapes), and one per other family: qwen2.5-3b, qwen3-4b,
gemma-3-4b, mistral-7b (4x1024 QLoRA). And the issue-18 cases, all four systems in one command:

    PYTHONPATH=$PWD/.gpu/peers:$PWD/.gpu/bnb python3 bench/compare.py --qscript .gpu/qscript \
        --anchor .gpu/hf_qlora_anchor.py --peer-anchor .gpu/peer_anchor.py --tokenizer .gpu/smol-tok \
        --cases peers,trainer,long --out $OUT

  peers:   Llama-3.2-3B shape 4x1024 (and + gradient checkpointing): the Python stack, HF + Liger,
           Unsloth (dropout 0), qscript `bench train` at dropout 0 and 0.1.
  trainer: the real trainer (bench/recipes/trainer.rhai: SFTTrainer, the recipe datasets packed
           4x1024) on the 3B shape, from its own metrics.jsonl, against `bench train` of the shape.
  unsloth: the first rows of `peers` only (3B 4x1024 without checkpointing; no Liger).
  long:    3B shape 1x8192, 2x4096 (checkpointing) and 1x32768 (checkpointing), qscript and the
           Python stack.
"""
import argparse, datetime, json, os, subprocess, sys, time

# case -> (anchor case name, [qscript bench commands with the same settings])
TRAIN = [
    # (label, shape, batch, seq, gradient checkpointing, quant)
    ("SmolLM2-135M, 8x512, QLoRA", "smollm2-135m", 8, 512, False, "nf4", "small"),
    ("Llama-3.2-1B, 4x1024, QLoRA", "llama-3.2-1b", 4, 1024, False, "nf4", "1b"),
    ("Llama-3.2-1B, 4x1024, QLoRA + checkpointing", "llama-3.2-1b", 4, 1024, True, "nf4", "1b"),
    ("Llama-3.2-3B, 4x1024, QLoRA", "llama-3.2-3b", 4, 1024, False, "nf4", "3b"),
    ("Llama-3.2-3B, 4x1024, QLoRA + checkpointing", "llama-3.2-3b", 4, 1024, True, "nf4", "3b"),
]
# Other families (real shapes, random weights; the anchor's FAMILY_SHAPES): one case each, named by
# its shape, run with `hf_qlora_anchor.py train SHAPE 4 1024`.
FAMILIES = ["qwen2.5-3b", "qwen3-4b", "gemma-3-4b", "mistral-7b"]
TRAIN += [(f"{s}, 4x1024, QLoRA", s, 4, 1024, False, "nf4", s) for s in FAMILIES]
GENERATE = [("4-bit greedy decode, SmolLM2-135M", "smollm2-135m", "small"), ("4-bit greedy decode, Llama-3.2-3B", "llama-3.2-3b", "3b")]


def run(cmd, timeout, env=None):
    t = time.time()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})
    except subprocess.TimeoutExpired:
        print(f"# {' '.join(cmd)}: timed out after {timeout} s", file=sys.stderr, flush=True)
        return []
    lines = [json.loads(l) for l in p.stdout.splitlines() if l.startswith("{")]
    if p.returncode != 0:
        sys.stderr.write(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stderr[-3000:]}\n")
    print(f"# {' '.join(cmd)}: {time.time() - t:.0f} s", file=sys.stderr, flush=True)
    return lines


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--qscript", required=True)
    ap.add_argument("--anchor", required=True)
    ap.add_argument("--cases", default="dequant,small,1b,3b")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--out", default=".")
    ap.add_argument("--skip-anchor", action="store_true", help="qscript only")
    ap.add_argument("--peer-anchor", help="../shared/bench/peer_anchor.py (HF + Liger, Unsloth)")
    ap.add_argument("--tokenizer", help="a folder with tokenizer.json (the trainer recipe's and Unsloth's tokenizer)")
    ap.add_argument("--recipe", default="bench/recipes/trainer.rhai")
    a = ap.parse_args()
    cases = a.cases.split(",")
    rows, raw = [], []

    def anchor(case):
        if a.skip_anchor:
            return []
        args = ["train", case, "4", "1024"] if case in FAMILIES else [case]
        got = run([sys.executable, a.anchor, *args], 1200)
        raw.extend(got)
        return got

    if "dequant" in cases:
        ref = [r for r in anchor("dequant") if r.get("case") == "dequant"]
        ours = run([a.qscript, "bench", "dequant", "--device", "cuda", "--rows", "8192", "--cols", "3072", "--iters", "200"], 600)
        raw.extend(ours)
        if ours:
            r = ref[0]["gb_per_s"] if ref else None
            # The reference times 200 calls back to back by the host; ours both ways.
            rows.append(("NF4 dequantize 8192x3072 -> bf16, 200 calls back to back (GB/s)", r, ours[0].get("gb_per_s_back_to_back"), None, None))
            rows.append(("NF4 dequantize 8192x3072 -> bf16, kernel alone by CUDA events (GB/s)", r, ours[0]["gb_per_s"], None, None))
            rows.append(("fused 4-bit GEMV 8192x3072 (GB/s, no reference)", None, ours[0]["gemv_gb_per_s"], None, None))
    for case in ["small", "1b", "3b", *FAMILIES]:
        if case not in cases:
            continue
        ref = anchor(case)
        for label, shape, b, t, gc, q, c in TRAIN:
            if c != case:
                continue
            cmd = [a.qscript, "bench", "train", "--shape", shape, "--device", "cuda", "--batch", str(b), "--seq", str(t), "--quant", q, "--steps", str(a.steps)]
            if gc:
                cmd.append("--gradient-checkpointing")
            ours = run(cmd, 900)
            raw.extend(ours)
            r = next((x for x in ref if x.get("case") == "train" and x["shape"] == shape and x["grad_ckpt"] == gc and x["quant"].startswith("nf4")), None)
            rows.append((label + " (tok/s)", r and r["tokens_per_s"], ours[0]["tokens_per_sec"] if ours else None,
                         r and r["peak_gib"], ours[0]["peak_gpu_gib"] if ours else None))
        for label, shape, c in GENERATE:
            if c != case:
                continue
            ours = run([a.qscript, "bench", "generate", "--shape", shape, "--device", "cuda", "--quant", "nf4", "--dtype", "bfloat16",
                        "--prompt-tokens", "32", "--new-tokens", "128", "--repeat", "3"], 600)
            raw.extend(ours)
            r = next((x for x in ref if x.get("case") == "generate" and x["shape"] == shape), None)
            rows.append((label + " (tok/s)", r and r["tokens_per_s"], ours[0]["decode_tok_per_s_median"] if ours else None, None, None))

    peers_cases(a, cases, rows, raw, anchor)

    f = lambda v, d=0: "-" if v is None else f"{v:,.{d}f}"
    out = [f"# qscript vs transformers + peft + bitsandbytes, {datetime.date.today()}", "",
           "Baseline: the Python stack (transformers + peft + bitsandbytes), except the trainer rows (qscript `bench train` of",
           "the same shape). Measured: qscript, or the peer the row names.", "",
           "| case | baseline | measured | ratio | baseline GiB | measured GiB |", "| --- | --- | --- | --- | --- | --- |"]
    for label, r, q, rg, qg in rows:
        ratio = f"{q / r:.2f}x" if r and q else "-"
        out.append(f"| {label} | {f(r)} | {f(q)} | {ratio} | {f(rg, 2)} | {f(qg, 2)} |")
    table = "\n".join(out)
    print(table)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "compare.md"), "w") as fh:
        fh.write(table + "\n")
    with open(os.path.join(a.out, "compare.jsonl"), "w") as fh:
        fh.writelines(json.dumps(x) + "\n" for x in raw)


SHAPE3B = "llama-3.2-3b"


def qscript_train(a, b, t, gc, dropout=0.1, shape=SHAPE3B, steps=None):
    cmd = [a.qscript, "bench", "train", "--shape", shape, "--device", "cuda", "--batch", str(b), "--seq", str(t),
           "--lora-dropout", str(dropout), "--steps", str(steps or a.steps)]
    return run(cmd + (["--gradient-checkpointing"] if gc else []), 900)


def trainer_run(a, gc, dropout):
    """The recipe through `qscript RECIPE`: the median of its log entries' windowed tokens/s after
    the first entry (which holds the warm-up), and its peak GPU memory from the summary line."""
    out = f"/tmp/qscript-trainer-{int(gc)}-{dropout}"
    cmd = [a.qscript, "-A", a.recipe, "--set", f"SHAPE={SHAPE3B}", "--set", f"OUT={out}", "--set", f"DROPOUT={dropout}",
           "--set", f"CHECKPOINTING={'true' if gc else 'false'}", "--set", "STEPS=40"]
    if a.tokenizer:
        cmd += ["--set", f"TOKENIZER={a.tokenizer}"]
    got = run(cmd, 900)
    summary = next((x for x in got if "global_step" in x), {})
    try:
        entries = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl")) if '"loss"' in l]
    except OSError:
        entries = []
    tps = sorted(e["tokens_per_sec"] for e in entries[1:] if "tokens_per_sec" in e)
    line = dict(bench="trainer", shape=SHAPE3B, gradient_checkpointing=gc, lora_dropout=dropout,
                window_tokens_per_sec=tps, tokens_per_sec=tps[len(tps) // 2] if tps else None,
                overall_tokens_per_sec=summary.get("tokens_per_sec"), peak_gpu_gib=summary.get("peak_gpu_gib"))
    return line


def peers_cases(a, cases, rows, raw, anchor):
    py = lambda script, *args, env=None, timeout=1200: run([sys.executable, script, *map(str, args)], timeout, env)
    pick = lambda got, key="tokens_per_s": (got[-1].get(key) if got else None, got[-1].get("peak_gib") if got else None)
    if "peers" in cases or "unsloth" in cases:
        # "unsloth": the short form (no Liger, no checkpointing).
        for gc in (False, True) if "peers" in cases else (False,):
            tag = "Llama-3.2-3B, 4x1024, QLoRA" + (" + checkpointing" if gc else "")
            ref = [] if a.skip_anchor else py(a.anchor, "train", SHAPE3B, 4, 1024, *(["gc"] if gc else []))
            raw.extend(ref)
            r, rg = pick([x for x in ref if x.get("case") == "train"])
            for kind, dropout in ([("liger", 0.1)] if not gc and "peers" in cases else []) + [("unsloth", 0.0)]:
                if not a.peer_anchor:
                    continue
                got = [x for x in py(a.peer_anchor, kind, SHAPE3B, int(gc), dropout) if x.get("case") == "train"]
                raw.extend(got)
                q, qg = pick(got)
                rows.append((f"{tag}: {'HF + Liger' if kind == 'liger' else 'Unsloth'} (dropout {dropout}) (tok/s)", r, q, rg, qg))
            for dropout in (0.0, 0.1):
                got = qscript_train(a, 4, 1024, gc, dropout)
                raw.extend(got)
                rows.append((f"{tag}: qscript bench train (dropout {dropout}) (tok/s)", r, got[0]["tokens_per_sec"] if got else None,
                             rg, got[0]["peak_gpu_gib"] if got else None))
    if "trainer" in cases:
        for gc, dropout in ((False, 0.0), (False, 0.1), (True, 0.0)):
            bench = qscript_train(a, 4, 1024, gc, dropout)
            raw.extend(bench)
            t = trainer_run(a, gc, dropout)
            raw.append(t)
            b = bench[0]["tokens_per_sec"] if bench else None
            rows.append((f"3B trainer recipe 4x1024{' + ckpt' if gc else ''}, dropout {dropout}, vs bench train (tok/s)",
                         b, t["tokens_per_sec"], bench[0]["peak_gpu_gib"] if bench else None, t["peak_gpu_gib"]))
    if "long" in cases:
        for b, t, gc in ((1, 8192, True), (2, 4096, True), (1, 32768, True)):
            # Fewer steps at long context (ANCHOR_STEPS: the carried copy of the anchor reads it).
            env = {"ANCHOR_STEPS": "3", "ANCHOR_WARMUP": "1"} if t > 8192 else {"ANCHOR_STEPS": "5", "ANCHOR_WARMUP": "2"}
            ref = [] if a.skip_anchor else [x for x in py(a.anchor, "train", SHAPE3B, b, t, *(["gc"] if gc else []), env=env, timeout=300)
                                             if x.get("case") == "train"]
            raw.extend(ref)
            r, rg = pick(ref)
            got = qscript_train(a, b, t, gc, 0.1, steps=4)
            raw.extend(got)
            rows.append((f"Llama-3.2-3B, {b}x{t}{' + checkpointing' if gc else ''} (tok/s)", r, got[0]["tokens_per_sec"] if got else None,
                         rg, got[0]["peak_gpu_gib"] if got else None))


if __name__ == "__main__":
    main()
