#!/usr/bin/env python3
"""Writes the committed seed inputs of the fuzz targets (fuzz/corpus/<target>/seed-*), small
valid (and a few once-crashing) inputs from the repository's own files. Run from the repo root."""
import json, os, struct, glob

C = "fuzz/corpus"

def put(target, name, data):
    os.makedirs(f"{C}/{target}", exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(f"{C}/{target}/seed-{name}", "wb") as f:
        f.write(data)

# safetensors: 8-byte little-endian header length, JSON header, data.
def safetensors(tensors, meta=None):
    header, data = {}, b""
    for name, dtype, shape, raw in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    if meta:
        header["__metadata__"] = meta
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + data

f32 = lambda xs: struct.pack(f"<{len(xs)}f", *xs)
put("safetensors", "f32", safetensors([("model.norm.weight", "F32", [4], f32([1, 2, 3, 4])), ("lm_head.weight", "F32", [2, 2], f32([0.5, -1, 2, 0]))]))
put("safetensors", "bf16-u8", safetensors([("a", "BF16", [2, 2], b"\x80\x3f" * 4), ("b", "U8", [3], b"\x01\x02\x03")], {"format": "pt"}))
put("safetensors", "empty", safetensors([]))

# GGUF v3: a 1-layer, 8-wide llama with an 8-token vocabulary, f32 tensors.
def gstr(s):
    b = s.encode()
    return struct.pack("<Q", len(b)) + b

def gval(v):
    if isinstance(v, bool):
        return struct.pack("<I", 7) + struct.pack("<B", v)
    if isinstance(v, int):
        return struct.pack("<I", 4) + struct.pack("<I", v)
    if isinstance(v, float):
        return struct.pack("<I", 6) + struct.pack("<f", v)
    if isinstance(v, str):
        return struct.pack("<I", 8) + gstr(v)
    if isinstance(v, list) and all(isinstance(x, str) for x in v):
        return struct.pack("<I", 9) + struct.pack("<I", 8) + struct.pack("<Q", len(v)) + b"".join(gstr(x) for x in v)
    if isinstance(v, list):
        return struct.pack("<I", 9) + struct.pack("<I", 5) + struct.pack("<Q", len(v)) + b"".join(struct.pack("<i", x) for x in v)
    raise TypeError(v)

def gguf(meta, tensors, align=32):
    out = b"GGUF" + struct.pack("<I", 3) + struct.pack("<Q", len(tensors)) + struct.pack("<Q", len(meta))
    for k, v in meta.items():
        out += gstr(k) + (v if isinstance(v, bytes) else gval(v))
    data, infos = b"", b""
    for name, shape, raw in tensors:
        data += b"\0" * (-len(data) % align)
        infos += gstr(name) + struct.pack("<I", len(shape)) + b"".join(struct.pack("<Q", d) for d in shape) + struct.pack("<I", 0) + struct.pack("<Q", len(data))
        data += raw
    out += infos
    out += b"\0" * (-len(out) % align)
    return out + data

h, ffn, vocab = 8, 16, 8
tokens = ["<unk>", "<s>", "</s>", "a", "b", "c", "ab", "bc"]
meta = {
    "general.architecture": "llama", "llama.embedding_length": h, "llama.feed_forward_length": ffn,
    "llama.block_count": 1, "llama.attention.head_count": 2, "llama.attention.head_count_kv": 2,
    "llama.context_length": 64, "llama.attention.layer_norm_rms_epsilon": 1e-5, "llama.rope.freq_base": 10000.0,
    "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": [3, 3, 3, 1, 1, 1, 1, 1],
    "tokenizer.ggml.merges": ["a b", "b c"], "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
}
def t(name, *shape):  # GGUF dims are innermost first
    n = 1
    for d in shape:
        n *= d
    return (name, list(reversed(shape)), f32([((i * 7) % 13 - 6) / 10 for i in range(n)]))
ts = [t("token_embd.weight", vocab, h), t("output_norm.weight", h), t("blk.0.attn_norm.weight", h), t("blk.0.ffn_norm.weight", h)]
ts += [t(f"blk.0.attn_{p}.weight", h, h) for p in ["q", "k", "v", "output"]]
ts += [t("blk.0.ffn_gate.weight", ffn, h), t("blk.0.ffn_up.weight", ffn, h), t("blk.0.ffn_down.weight", h, ffn)]
put("gguf", "tiny-llama", gguf(meta, ts))
put("gguf", "alignment-0", gguf({**meta, "general.alignment": 0}, ts[:1]))
put("gguf", "block-count-1e12", gguf({**meta, "llama.block_count": b"\x0a\x00\x00\x00" + struct.pack("<Q", 10**12)}, ts[:1]))
put("gguf", "header-only", gguf({"general.architecture": "llama"}, []))

# config.json
tiny = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 49152,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 1024, "tie_word_embeddings": False,
        "bos_token_id": 1, "eos_token_id": [2, 3], "torch_dtype": "float32"}
put("configs", "tiny", json.dumps(tiny))
put("configs", "llama3-scaling", json.dumps({**tiny, "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}))
put("configs", "layers-1e12", json.dumps({**tiny, "num_hidden_layers": 10**12}))
put("configs", "positions-1e8", json.dumps({**tiny, "max_position_embeddings": 10**8}))

# adapter_config.json (peft)
peft = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "target_modules": ["q_proj", "v_proj"],
        "bias": "none", "task_type": "CAUSAL_LM", "use_rslora": False, "init_lora_weights": True,
        "rank_pattern": {"q_proj": 4}, "alpha_pattern": {"v_proj": 32}, "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct"}
put("configs", "peft", json.dumps(peft))
put("configs", "regex", json.dumps({**peft, "target_modules": ".*\\.(q|k)_proj", "rank_pattern": {}}))
put("configs", "r-1e12", json.dumps({**peft, "r": 10**12}))
put("configs", "rank-pattern-1e20", json.dumps({**peft, "rank_pattern": {"q_proj": 1e20}}))

# datasets: first byte picks jsonl (0), json (1), csv (2), tsv (3)
for f in sorted(glob.glob("tests/data/*.*")):
    ext = f.rsplit(".", 1)[1]
    kind = {"jsonl": 0, "json": 1, "csv": 2, "tsv": 3}[ext]
    data = open(f, "rb").read()[:3000]
    put("dataset", os.path.basename(f), bytes([kind]) + data)
put("dataset", "recipe-data.jsonl", b"\0" + b"".join(open("recipes/data/customer_support.jsonl", "rb").readlines()[:3]))

# chat templates: the template, NUL, a conversation as JSON
d = json.load(open("tests/golden/templates/renders.json"))
for name, src in d["templates"].items():
    conv = next(c["messages"] for c in d["cases"] if c["template"] == name)
    put("chat_template", name, src["chat_template"].encode() + b"\0" + json.dumps(conv).encode())
put("chat_template", "loop", "{% for i in range(100) %}{% for j in range(100) %}{{ i }}{% endfor %}{% endfor %}")

# recipes
for f in sorted(glob.glob("recipes/*.rhai")) + sorted(glob.glob("stdlib/*.rhai")):
    put("recipe", os.path.basename(f), open(f, "rb").read())
put("recipe", "data", 'let d = Dataset([#{text: "a"}, #{messages: [#{role: "user", content: "hi"}]}]);\nprint(d.len());\nd.to_jsonl("out/d.jsonl");\nprint(to_json(#{a: [1, 2.5, ()], b: "x"}));\n')
put("recipe", "nest", 'let a = []; for i in 0..300 { a = [a]; } print(a); to_json(a);\n')
put("recipe", "lora", 'let c = LoraConfig(#{ r: 8, rank_pattern: #{ q_proj: 4 } }); print(c);\nlet t = TrainingArguments(#{ output_dir: "runs/x", max_steps: 1 }); print(t);\n')
