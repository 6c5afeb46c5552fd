#!/usr/bin/env python3
"""qscript against the Python QLoRA stack (transformers + peft + bitsandbytes), same GPU, same run.

Runs, case by case, qscript's benchmarks and ../shared/bench/hf_qlora_anchor.py (both carried to
the GPU machine), then prints a Markdown table with the ratios and writes it, with every JSON
line, to --out. Usage on the GPU machine (see bench/README.md):

    python3 bench/compare.py --qscript .gpu/qscript --anchor .gpu/hf_qlora_anchor.py \
        --cases dequant,small --out $OUT

Cases: dequant, small, 1b, 3b (Llama shapes), and one per other family: qwen2.5-3b, qwen3-4b,
gemma-3-4b, mistral-7b (4x1024 QLoRA).
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


def run(cmd, timeout):
    t = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
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
            rows.append(("NF4 dequantize 8192x3072 -> bf16 (GB/s)", r, ours[0]["gb_per_s"], None, None))
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

    f = lambda v, d=0: "-" if v is None else f"{v:,.{d}f}"
    out = [f"# qscript vs transformers + peft + bitsandbytes, {datetime.date.today()}", "",
           "| case | reference | qscript | ratio | ref GiB | qscript GiB |", "| --- | --- | --- | --- | --- | --- |"]
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


if __name__ == "__main__":
    main()
