#!/usr/bin/env python3
"""Write the tiny golden family checkpoints as GGUF files the way llama.cpp's
`convert_hf_to_gguf.py` writes them, for tests/gguf_families.rs.

    pip install gguf numpy safetensors      # gguf-py, the converter's own writer
    python tests/data/gguf/make_family_gguf.py GOLDEN_FAMILIES_DIR OUT_DIR

GOLDEN_FAMILIES_DIR holds `<family>/base/{config.json,model.safetensors}` (the shared golden
data, `families/`). What the converter does, per family, and what this script reproduces:

- metadata: `TextModel.set_gguf_parameters` (block_count, context_length, embedding_length,
  feed_forward_length, head_count(_kv), rope.freq_base, layer_norm_rms_eps, key/value_length
  when config.json has `head_dim`) plus each model class's additions: Llama/Mistral add
  vocab_size and rope.dimension_count; Gemma 2 writes its own list (no rope.freq_base) with
  both soft-cappings and sliding_window; Gemma 3 adds sliding_window and the global RoPE base;
  Phi-3 adds rope.dimension_count, rope.scaling.original_context_length and sliding_window
  (0 when config.json has none).
- tensors: names from gguf-py's `TensorNameMap`; Llama (and Mistral, which the converter writes
  as `llama`) permutes the rows of q/k for llama.cpp's interleaved RoPE; Gemma 2 and 3 store
  every `*norm.weight` as 1 + w (their RMSNorm multiplies by 1 + w); Gemma 2 drops lm_head.
  Phi-3's fused qkv_proj / gate_up_proj are written unchanged as attn_qkv / ffn_up.
- all tensors f32 (`--outtype f32`), so logits can be compared to 1e-4.

Two things differ from a converter run, on purpose:
- the tokenizer: the checkpoints have none, so every file gets the same minimal byte-level BPE
  vocabulary (`gpt2`: 3 control tokens, the 256 byte tokens, unused padding to the model's
  512 rows, no merges), which qscript's GGUF tokenizer reads;
- Gemma 3's layer pattern: llama.cpp assumes a period of 6 (five sliding layers, then one
  global) unless `gemma3.attention.sliding_window_pattern` says otherwise; the converter never
  writes that key, but this 3-layer checkpoint's `layer_types` is (sliding, sliding, full), so
  the file carries the period 3 that llama.cpp reads.
"""
import json
import sys
from pathlib import Path

import numpy as np
from gguf import GGUFWriter, LlamaFileType, MODEL_ARCH, MODEL_ARCH_NAMES, TokenType, get_tensor_name_map
from safetensors.numpy import load_file

# golden folder -> llama.cpp architecture
ARCHS = {
    "qwen2": MODEL_ARCH.QWEN2,
    "qwen3": MODEL_ARCH.QWEN3,
    "gemma2": MODEL_ARCH.GEMMA2,
    "gemma3": MODEL_ARCH.GEMMA3,
    "phi3": MODEL_ARCH.PHI3,
    "mistral": MODEL_ARCH.LLAMA,
}


def rope(cfg, layer_type="full_attention"):
    """The RoPE parameters of one layer type (transformers 5 `rope_parameters`, or older keys)."""
    p = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    p = p.get(layer_type, p)
    theta = p.get("rope_theta", cfg.get("rope_theta"))
    return p, theta


def text_model_params(w, cfg):
    """`TextModel.set_gguf_parameters`."""
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    _, theta = rope(cfg)
    if theta is not None:
        w.add_rope_freq_base(theta)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    if cfg.get("head_dim") is not None:
        w.add_key_length(cfg["head_dim"])
        w.add_value_length(cfg["head_dim"])


def params(w, family, cfg):
    heads, hidden = cfg["num_attention_heads"], cfg["hidden_size"]
    if family in ("qwen2", "qwen3"):
        text_model_params(w, cfg)
    elif family == "mistral":
        text_model_params(w, cfg)
        w.add_vocab_size(cfg["vocab_size"])
        w.add_rope_dimension_count(cfg.get("head_dim") or hidden // heads)
    elif family == "gemma2":
        w.add_context_length(cfg["max_position_embeddings"])
        w.add_embedding_length(hidden)
        w.add_block_count(cfg["num_hidden_layers"])
        w.add_feed_forward_length(cfg["intermediate_size"])
        w.add_head_count(heads)
        w.add_head_count_kv(cfg["num_key_value_heads"])
        w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
        w.add_key_length(cfg["head_dim"])
        w.add_value_length(cfg["head_dim"])
        w.add_attn_logit_softcapping(cfg["attn_logit_softcapping"])
        w.add_final_logit_softcapping(cfg["final_logit_softcapping"])
        w.add_sliding_window(cfg["sliding_window"])
    elif family == "gemma3":
        text_model_params(w, cfg)  # the class then rewrites some of these with defaults
        if cfg.get("final_logit_softcapping"):
            w.add_final_logit_softcapping(cfg["final_logit_softcapping"])
        w.add_sliding_window(cfg["sliding_window"])
        # Not the converter (see the module docstring): the checkpoint's own layer pattern.
        types = cfg["layer_types"]
        period = types.index("full_attention") + 1
        assert all((t == "sliding_attention") == (i % period < period - 1) for i, t in enumerate(types)), types
        w.add_sliding_window_pattern(period)
    elif family == "phi3":
        p, theta = rope(cfg)
        rot = p.get("partial_rotary_factor", 1.0)
        w.add_context_length(cfg["max_position_embeddings"])
        w.add_rope_scaling_orig_ctx_len(p.get("original_max_position_embeddings", cfg.get("original_max_position_embeddings")))
        w.add_embedding_length(hidden)
        w.add_feed_forward_length(cfg["intermediate_size"])
        w.add_block_count(cfg["num_hidden_layers"])
        w.add_head_count(heads)
        w.add_head_count_kv(cfg["num_key_value_heads"])
        w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
        w.add_rope_dimension_count(int(rot * hidden) // heads)
        w.add_rope_freq_base(theta)
        w.add_sliding_window(cfg.get("sliding_window") or 0)
    else:
        raise ValueError(family)
    w.add_file_type(LlamaFileType.ALL_F32)


def llama_permute(t, n_head):
    """The converter's q/k row order for llama.cpp's interleaved RoPE."""
    return t.reshape(n_head, 2, t.shape[0] // n_head // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)


def tensors(family, arch, cfg, weights):
    names = get_tensor_name_map(arch, cfg["num_hidden_layers"])
    for key in sorted(weights):
        t = weights[key].astype(np.float32)
        if family == "gemma2" and key == "lm_head.weight":
            continue
        if family == "mistral" and key.endswith(("q_proj.weight", "q_proj.bias")):
            t = llama_permute(t, cfg["num_attention_heads"])
        if family == "mistral" and key.endswith(("k_proj.weight", "k_proj.bias")):
            t = llama_permute(t, cfg["num_key_value_heads"])
        if family in ("gemma2", "gemma3") and key.endswith("norm.weight"):
            t = t + 1
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ValueError(f"{family}: no GGUF name for {key}")
        yield name, np.ascontiguousarray(t)


def vocab(w, cfg):
    """A minimal byte-level BPE vocabulary of the model's size (no merges)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    byte_tokens = [chr(c) for _, c in sorted(zip(bs, cs))]
    specials = ["<pad>", "<s>", "</s>"]
    size = cfg["vocab_size"]
    tokens = specials + byte_tokens
    tokens += [f"[PAD{i}]" for i in range(len(tokens), size)]
    types = [TokenType.CONTROL] * 3 + [TokenType.NORMAL] * 256 + [TokenType.UNUSED] * (size - 259)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges([])
    w.add_bos_token_id(cfg["bos_token_id"])
    w.add_eos_token_id(cfg["eos_token_id"])
    w.add_pad_token_id(cfg["pad_token_id"])
    w.add_add_bos_token(False)


def convert(family, src: Path, out: Path):
    cfg = json.loads((src / "config.json").read_text())
    weights = load_file(src / "model.safetensors")
    arch = ARCHS[family]
    w = GGUFWriter(out, MODEL_ARCH_NAMES[arch])
    w.add_name(f"tiny-{family}")
    params(w, family, cfg)
    vocab(w, cfg)
    for name, t in tensors(family, arch, cfg, weights):
        w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def main():
    golden, out = Path(sys.argv[1]), Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    for family in ARCHS:
        path = out / f"{family}.gguf"
        convert(family, golden / family / "base", path)
        print(f"{path}: {path.stat().st_size} bytes")


if __name__ == "__main__":
    main()
