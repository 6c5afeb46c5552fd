//! Strict config maps. Every map a recipe passes (`load_model(id, #{...})`,
//! `model.generate(p, #{...})`, later `LoraConfig(#{...})`, ...) has one [`Schema`] here, used
//! both at run time and by `qscript check`, which validates literal maps in the AST without
//! running anything. Unknown keys name the nearest valid key; wrong types name the expected one.

use rhai::{Dynamic, Map};

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Ty {
    Int,
    /// A number: an integer literal is accepted where a float is expected.
    Float,
    Bool,
    Str,
    /// One of these strings.
    OneOf(&'static [&'static str]),
    /// A string or an array of strings.
    StrOrList,
    Array,
    Map,
    /// A map checked by its own schema (`gradient_checkpointing_kwargs`).
    MapOf(&'static Schema),
    /// Anything (validated by the function itself).
    Any,
}

impl Ty {
    pub fn describe(&self) -> String {
        match self {
            Ty::Int => "an integer".into(),
            Ty::Float => "a number".into(),
            Ty::Bool => "true or false".into(),
            Ty::Str => "a string".into(),
            Ty::OneOf(v) => format!("one of {}", v.iter().map(|s| format!("\"{s}\"")).collect::<Vec<_>>().join(", ")),
            Ty::StrOrList => "a string or an array of strings".into(),
            Ty::Array => "an array".into(),
            Ty::Map | Ty::MapOf(_) => "a map".into(),
            Ty::Any => "any value".into(),
        }
    }

    /// Check a runtime value.
    fn accepts(&self, v: &Dynamic) -> bool {
        match self {
            Ty::Int => v.is_int(),
            Ty::Float => v.is_float() || v.is_int(),
            Ty::Bool => v.is_bool(),
            Ty::Str => v.is_string(),
            Ty::OneOf(opts) => v.clone().into_string().is_ok_and(|s| opts.contains(&s.as_str())),
            Ty::StrOrList => {
                v.is_string() || v.clone().try_cast::<rhai::Array>().is_some_and(|a| a.iter().all(|x| x.is_string()))
            }
            Ty::Array => v.is_array(),
            Ty::Map | Ty::MapOf(_) => v.is_map(),
            Ty::Any => true,
        }
    }
}

/// What a literal in the AST is, for `qscript check` (None: not a literal, not checkable).
#[derive(Debug, Clone, PartialEq)]
pub enum Literal {
    Int,
    Float,
    Bool,
    Str(String),
    Array(Vec<Literal>),
    Map,
    Unit,
}

impl Ty {
    fn accepts_literal(&self, lit: &Literal) -> bool {
        match (self, lit) {
            (Ty::Any, _) => true,
            (Ty::Int, Literal::Int) => true,
            (Ty::Float, Literal::Int | Literal::Float) => true,
            (Ty::Bool, Literal::Bool) => true,
            (Ty::Str, Literal::Str(_)) => true,
            (Ty::OneOf(opts), Literal::Str(s)) => opts.contains(&s.as_str()),
            (Ty::StrOrList, Literal::Str(_)) => true,
            (Ty::StrOrList, Literal::Array(items)) => items.iter().all(|i| matches!(i, Literal::Str(_))),
            (Ty::Array, Literal::Array(_)) => true,
            (Ty::Map | Ty::MapOf(_), Literal::Map) => true,
            _ => false,
        }
    }
}

fn type_name(v: &Dynamic) -> String {
    if v.is_string() {
        format!("the string \"{}\"", v.clone().into_string().unwrap_or_default())
    } else if v.is_int() {
        format!("the integer {v}")
    } else if v.is_float() {
        format!("the number {v}")
    } else if v.is_bool() {
        format!("{v}")
    } else {
        match v.type_name() {
            "array" => "an array".into(),
            "map" => "a map".into(),
            "()" => "()".into(),
            t => format!("a value of type {t}"),
        }
    }
}

fn literal_name(l: &Literal) -> String {
    match l {
        Literal::Int => "an integer".into(),
        Literal::Float => "a float".into(),
        Literal::Bool => "a boolean".into(),
        Literal::Str(s) => format!("the string \"{s}\""),
        Literal::Array(_) => "an array".into(),
        Literal::Map => "a map".into(),
        Literal::Unit => "()".into(),
    }
}

#[derive(Debug, PartialEq)]
pub struct Key {
    pub name: &'static str,
    pub ty: Ty,
    pub doc: &'static str,
}

#[derive(Debug, PartialEq)]
pub struct Schema {
    /// How errors name the map: `load_model options`, `LoraConfig`, ...
    pub name: &'static str,
    pub keys: &'static [Key],
}

const fn key(name: &'static str, ty: Ty, doc: &'static str) -> Key {
    Key { name, ty, doc }
}

impl Schema {
    fn find(&self, k: &str) -> Result<&Key, String> {
        self.keys.iter().find(|x| x.name == k).ok_or_else(|| {
            let hint = crate::util::nearest(k, self.keys.iter().map(|x| x.name))
                .map(|n| format!("; did you mean `{n}`?"))
                .unwrap_or_else(|| format!(" (valid keys: {})", self.keys.iter().map(|x| x.name).collect::<Vec<_>>().join(", ")));
            format!("{}: unknown key `{k}`{hint}", self.name)
        })
    }

    /// Validate a runtime map; returns typed accessors.
    pub fn check<'a>(&'static self, map: &'a Map) -> Result<Cfg<'a>, String> {
        for (k, v) in map {
            let key = self.find(k)?;
            if !key.ty.accepts(v) {
                return Err(format!("{}: `{k}` must be {}, got {}", self.name, key.ty.describe(), type_name(v)));
            }
            if let (Ty::MapOf(inner), Some(m)) = (key.ty, v.read_lock::<Map>()) {
                inner.check(&m).map_err(|e| format!("{}: {e}", self.name))?;
            }
        }
        Ok(Cfg { map })
    }

    /// The schema of key `k`'s map value, if it has one (`qscript check` looks inside).
    pub fn nested(&self, k: &str) -> Option<&'static Schema> {
        match self.keys.iter().find(|x| x.name == k)?.ty {
            Ty::MapOf(inner) => Some(inner),
            _ => None,
        }
    }

    /// Validate one literal key/value from the AST (`qscript check`).
    pub fn check_literal(&self, k: &str, v: Option<&Literal>) -> Result<(), String> {
        let key = self.find(k)?;
        match v {
            Some(lit) if !key.ty.accepts_literal(lit) => {
                Err(format!("{}: `{k}` must be {}, got {}", self.name, key.ty.describe(), literal_name(lit)))
            }
            _ => Ok(()),
        }
    }
}

/// A validated map with typed getters (types were checked by [`Schema::check`]).
pub struct Cfg<'a> {
    map: &'a Map,
}

impl Cfg<'_> {
    pub fn has(&self, k: &str) -> bool {
        self.map.contains_key(k)
    }
    pub fn int(&self, k: &str) -> Option<i64> {
        self.map.get(k).and_then(|v| v.as_int().ok())
    }
    pub fn float(&self, k: &str) -> Option<f64> {
        self.map.get(k).and_then(|v| v.as_float().ok().or_else(|| v.as_int().ok().map(|i| i as f64)))
    }
    pub fn bool(&self, k: &str) -> Option<bool> {
        self.map.get(k).and_then(|v| v.as_bool().ok())
    }
    pub fn str(&self, k: &str) -> Option<String> {
        self.map.get(k).and_then(|v| v.clone().into_string().ok())
    }
    pub fn str_list(&self, k: &str) -> Option<Vec<String>> {
        let v = self.map.get(k)?;
        if let Ok(s) = v.clone().into_string() {
            return Some(vec![s]);
        }
        v.clone().try_cast::<rhai::Array>().map(|a| a.into_iter().filter_map(|x| x.into_string().ok()).collect())
    }
    pub fn get(&self, k: &str) -> Option<&Dynamic> {
        self.map.get(k)
    }
    /// A non-negative integer.
    pub fn usize(&self, k: &str) -> Result<Option<usize>, String> {
        match self.int(k) {
            Some(i) if i < 0 => Err(format!("`{k}` must not be negative, got {i}")),
            Some(i) => Ok(Some(i as usize)),
            None => Ok(None),
        }
    }
}

pub static LOAD_MODEL: Schema = Schema {
    name: "load_model options",
    keys: &[
        key("dtype", Ty::OneOf(DTYPES_AUTO), "compute dtype of the weights (default \"auto\": bfloat16 on a GPU, float32 on the CPU)"),
        key("torch_dtype", Ty::OneOf(DTYPES_AUTO), "transformers' name for `dtype`"),
        key("device", Ty::Str, "\"auto\" (default: the GPU when built with `--features cuda` and one is present, else the CPU), \"cpu\", \"cuda\" or \"cuda:N\"; `qscript --device` overrides it"),
        key("device_map", Ty::Any, "transformers' spelling: \"auto\", \"cpu\", \"cuda:N\" or a GPU index (the whole model goes to one device)"),
        key("revision", Ty::Str, "hub revision (branch, tag or commit)"),
        key("quantization_config", Ty::Any, "BitsAndBytesConfig(#{ load_in_4bit: true, ... }) (or its map): decoder linears in 4 bits"),
        key("tokenizer", Ty::Str, "use this model's (id or path) tokenizer instead; `load_model(\"random:llama-3.2-3b\", #{tokenizer: ID})` benchmarks a real shape with random weights"),
    ],
};

pub static GENERATE: Schema = Schema {
    name: "generation options",
    keys: &[
        key("max_new_tokens", Ty::Int, "most tokens to generate (default 256)"),
        key("do_sample", Ty::Bool, "sample (true) or greedy (false); default: sample when temperature > 0"),
        key("temperature", Ty::Float, "0 = greedy; default from generation_config.json"),
        key("top_k", Ty::Int, "keep the k most likely tokens"),
        key("top_p", Ty::Float, "nucleus sampling: keep the smallest set with this much probability"),
        key("min_p", Ty::Float, "drop tokens below min_p × the top probability"),
        key("repetition_penalty", Ty::Float, "> 1 discourages repeating tokens (HF semantics)"),
        key("seed", Ty::Int, "RNG seed for sampling (default 0)"),
        key("stop", Ty::StrOrList, "stop strings; the text is cut before the first one"),
        key("stream", Ty::Bool, "print tokens as they are generated (default false)"),
        key("add_special_tokens", Ty::Bool, "generate(): tokenize the prompt with special tokens (default true)"),
        key("system", Ty::Str, "chat(): a system message put before the conversation"),
    ],
};

pub static CHAT_TEMPLATE: Schema = Schema {
    name: "apply_chat_template options",
    keys: &[
        key("add_generation_prompt", Ty::Bool, "end with the assistant header (default false)"),
        key("tokenize", Ty::Bool, "return token ids (default true, as transformers) instead of text"),
        key("tools", Ty::Array, "tool definitions passed to the template"),
        key("date_string", Ty::Str, "template variable used by Llama-3.1 templates"),
    ],
};

pub static SET_CHAT_TEMPLATE: Schema = Schema {
    name: "set_chat_template options",
    keys: &[
        key("bos_token", Ty::Str, "the template's `bos_token`"),
        key("eos_token", Ty::Str, "the template's `eos_token` (also ends generation)"),
    ],
};

pub static SAVE_GGUF: Schema = Schema {
    name: "save_gguf options",
    keys: &[
        key("quantization", Ty::OneOf(&["f32", "f16", "bf16", "q8_0", "q4_k_m", "q5_k_m", "q6_k"]), "GGUF file type (default f16); q4_k_m / q5_k_m are llama.cpp's mixes"),
        key("verify", Ty::Bool, "load the file back and compare logits and greedy text with the model (default true)"),
        key("prompts", Ty::StrOrList, "prompts to verify on (default: three questions through the chat template)"),
        key("modelfile", Ty::Bool, "write an Ollama Modelfile beside the file (default true)"),
    ],
};

pub static SAVE_GGUF_ADAPTER: Schema = Schema {
    name: "save_gguf_adapter options",
    keys: &[key("base_gguf", Ty::Str, "the base model's GGUF file: an Ollama Modelfile (FROM it, ADAPTER this) is written beside the adapter")],
};

pub static TOKENIZE: Schema = Schema {
    name: "tokenize options",
    keys: &[key("add_special_tokens", Ty::Bool, "apply the tokenizer's post-processor, e.g. a BOS (default true)")],
};

pub static DECODE: Schema = Schema {
    name: "decode options",
    keys: &[key("skip_special_tokens", Ty::Bool, "drop special tokens from the text (default false)")],
};

pub static LOAD_DATASET: Schema = Schema {
    name: "load_dataset options",
    keys: &[
        key("format", Ty::OneOf(crate::data::load::Format::NAMES), "record format (default: detected per file from its first record)"),
        key("on_error", Ty::OneOf(&["raise", "skip"]), "bad records: stop with an error (default) or skip, count and report them"),
        key("split", Ty::Str, "for a JSON object holding several arrays of records: the key to read, e.g. \"train\""),
        key("columns", Ty::Map, "the dataset's own field names: #{ prompt: \"question\", completion: \"answer\" } reads `question` as `prompt`"),
    ],
};

pub static TRAIN_TEST_SPLIT: Schema = Schema {
    name: "train_test_split options",
    keys: &[
        key("seed", Ty::Int, "shuffle seed (default 42)"),
        key("shuffle", Ty::Bool, "shuffle before splitting (default true)"),
    ],
};

pub static DATA_TOKENIZE: Schema = Schema {
    name: "tokenization options",
    keys: &[
        key("max_seq_length", Ty::Int, "longest example in tokens (default 1024)"),
        key("train_on_inputs", Ty::Bool, "train on every token, prompts included (default false: assistant turns only)"),
        key("truncation", Ty::OneOf(&["truncate", "drop"]), "longer examples: keep their start (default) or drop them"),
    ],
};

pub static DATA_STATS: Schema = Schema {
    name: "stats options",
    keys: &[
        key("max_seq_length", Ty::Int, "count examples longer than this (default 1024)"),
        key("train_on_inputs", Ty::Bool, "count every token as trained"),
    ],
};

pub static DATA_PREVIEW: Schema = Schema {
    name: "preview options",
    keys: &[
        key("train_on_inputs", Ty::Bool, "highlight every token as trained"),
        key("max_seq_length", Ty::Int, "show the example truncated to this length"),
        key("color", Ty::Bool, "ANSI colours (default: when stdout is a terminal) instead of [[ ]] markers"),
    ],
};

pub static DATA_BATCHES: Schema = Schema {
    name: "batch options",
    keys: &[
        key("batch_size", Ty::Int, "rows per batch (default 8)"),
        key("seed", Ty::Int, "shuffle seed (default 42); epoch e uses seed + e"),
        key("shuffle", Ty::Bool, "shuffle every epoch (default true)"),
        key("packing", Ty::Bool, "pack several examples into each row of max_seq_length tokens (default false)"),
        key("max_seq_length", Ty::Int, "packed row length (default: the tokenization's max_seq_length)"),
        key("group_by_length", Ty::Bool, "batch examples of similar length together (default false)"),
        key("drop_last", Ty::Bool, "drop the last incomplete batch (default false)"),
        key("epoch", Ty::Int, "which epoch's order to return (default 0)"),
    ],
};

pub static LORA_CONFIG: Schema = Schema {
    name: "LoraConfig",
    keys: &[
        key("r", Ty::Int, "adapter rank (default 8)"),
        key("lora_alpha", Ty::Float, "scaling numerator: scaling = lora_alpha / r (default 8)"),
        key("lora_dropout", Ty::Float, "dropout on the adapter input during training (default 0)"),
        key("target_modules", Ty::Any, "module names, a regex string, or \"all-linear\""),
        key("bias", Ty::OneOf(&["none", "all", "lora_only"]), "only \"none\" is supported"),
        key("use_rslora", Ty::Bool, "scale by lora_alpha / sqrt(r)"),
        key("init_lora_weights", Ty::Any, "true (kaiming A, zero B), \"gaussian\", or false (random B, for tests)"),
        key("rank_pattern", Ty::Map, "per-module rank overrides: #{ \"down_proj\": 4 }"),
        key("alpha_pattern", Ty::Map, "per-module alpha overrides"),
        key("task_type", Ty::Str, "e.g. \"CAUSAL_LM\" (recorded in adapter_config.json)"),
    ],
};

/// A dtype, or "auto": the device's (bfloat16 on a GPU, float32 on the CPU).
const DTYPES_AUTO: &[&str] = &["float32", "fp32", "f32", "bfloat16", "bf16", "float16", "fp16", "f16", "auto"];

pub static BNB_CONFIG: Schema = Schema {
    name: "BitsAndBytesConfig",
    keys: &[
        key("load_in_4bit", Ty::Bool, "quantize the decoder linears to 4 bits (required: true)"),
        key("load_in_8bit", Ty::Bool, "8-bit LLM.int8() is not supported"),
        key("bnb_4bit_quant_type", Ty::OneOf(&["nf4", "fp4"]), "4-bit data type (default \"fp4\", as transformers; QLoRA uses \"nf4\")"),
        key("bnb_4bit_use_double_quant", Ty::Bool, "quantize the absmax statistics too (default false)"),
        key("bnb_4bit_compute_dtype", Ty::OneOf(DTYPES_AUTO), "dtype the 4-bit weights are dequantized to for matmuls (default \"auto\": bfloat16 on a GPU, float32 on the CPU)"),
        key("bnb_4bit_quant_storage", Ty::OneOf(&["uint8", "float32", "bfloat16", "float16"]), "dtype the packed weights are saved as (default uint8)"),
        key("llm_int8_skip_modules", Ty::StrOrList, "modules kept unquantized: names (\"down_proj\"), paths or prefixes (\"model.layers.0\")"),
    ],
};

/// The keys of `TrainingArguments` and of trl's `SFTConfig` (the same map under its trl name).
pub static TRAINING_ARGS: Schema = Schema { name: "TrainingArguments", keys: TRAINING_ARGS_KEYS };
pub static SFT_CONFIG: Schema = Schema { name: "SFTConfig", keys: TRAINING_ARGS_KEYS };

const TRAINING_ARGS_KEYS: &[Key] = &[
        key("output_dir", Ty::Str, "where checkpoints, metrics.jsonl, loss.png go (required)"),
        key("num_train_epochs", Ty::Float, "epochs (default 3)"),
        key("max_steps", Ty::Int, "optimizer steps; > 0 overrides num_train_epochs (default -1)"),
        key("per_device_train_batch_size", Ty::Int, "rows per micro-batch (default 8)"),
        key("per_device_eval_batch_size", Ty::Int, "rows per eval batch (default 8)"),
        key("gradient_accumulation_steps", Ty::Int, "micro-batches per optimizer step (default 1)"),
        key("learning_rate", Ty::Float, "peak learning rate (default 2e-5)"),
        key("lr_scheduler_type", Ty::OneOf(&["linear", "cosine", "constant", "constant_with_warmup"]), "schedule (default linear)"),
        key("warmup_steps", Ty::Int, "linear warmup steps (default 0)"),
        key("warmup_ratio", Ty::Float, "warmup as a fraction of all steps (default 0)"),
        key("weight_decay", Ty::Float, "AdamW decoupled weight decay (default 0)"),
        key("adam_beta1", Ty::Float, "default 0.9"),
        key("adam_beta2", Ty::Float, "default 0.999"),
        key("adam_epsilon", Ty::Float, "default 1e-8"),
        key("max_grad_norm", Ty::Float, "global-norm clipping; 0 disables (default 1.0)"),
        key("logging_steps", Ty::Int, "log every N steps (default 10)"),
        key("eval_strategy", Ty::OneOf(&["no", "steps", "epoch"]), "when to evaluate (default no)"),
        key("eval_steps", Ty::Int, "evaluate every N steps (default logging_steps)"),
        key("save_strategy", Ty::OneOf(&["no", "steps", "epoch"]), "when to save a checkpoint (default steps)"),
        key("save_steps", Ty::Int, "save every N steps (default 500)"),
        key("save_total_limit", Ty::Int, "keep at most N checkpoints (the best is kept too)"),
        key("seed", Ty::Int, "data order and dropout seed (default 42)"),
        key("max_seq_length", Ty::Int, "truncate examples to this many tokens (default 1024)"),
        key("packing", Ty::Bool, "pack examples into full rows (default false)"),
        key("group_by_length", Ty::Bool, "batch examples of similar length (default false)"),
        key("gradient_checkpointing", Ty::Bool, "recompute each layer in backward (default false)"),
        key("gradient_checkpointing_kwargs", Ty::MapOf(&GRADIENT_CHECKPOINTING_KWARGS), "#{ offload: false } keeps the checkpointed layer inputs on the GPU (default: in pinned host memory, as Unsloth)"),
        key("train_on_inputs", Ty::Bool, "train on prompt tokens too (default false: assistant turns only)"),
        key("resume_from_checkpoint", Ty::Any, "true (latest checkpoint in output_dir) or a checkpoint path"),
        key("on_nan", Ty::OneOf(&["stop", "skip"]), "a NaN/Inf loss or gradient stops training (default) or skips the step"),
        key("overwrite_output_dir", Ty::Bool, "start over in an output_dir that holds a run, removing its files (default false: refuse)"),
        key("load_best_model_at_end", Ty::Bool, "at the end, load the checkpoint with the best metric_for_best_model (needs save_strategy = eval_strategy)"),
        key("metric_for_best_model", Ty::OneOf(&["loss", "eval_loss", "perplexity", "eval_perplexity"]), "the metric of the best checkpoint (default eval_loss)"),
        key("greater_is_better", Ty::Bool, "a larger metric_for_best_model is better (default false)"),
        key("early_stopping_patience", Ty::Int, "stop after N evaluations without improvement (transformers' EarlyStoppingCallback)"),
        key("early_stopping_threshold", Ty::Float, "the improvement that counts for early stopping (default 0)"),
        key("ddp_timeout", Ty::Float, "seconds a data-parallel rank waits for the others before it fails naming them (default 1800)"),
        // The names a ported transformers / trl notebook carries (train/args.rs says what each does here).
        key("max_length", Ty::Int, "trl's spelling of `max_seq_length`"),
        key("dataset_text_field", Ty::Str, "trl: the field that holds a text record's text (default \"text\")"),
        key("evaluation_strategy", Ty::OneOf(&["no", "steps", "epoch"]), "transformers' former name of `eval_strategy`"),
        key("bf16", Ty::Bool, "train in bfloat16 (the model's compute dtype must be bf16: load_model dtype / bnb_4bit_compute_dtype)"),
        key("fp16", Ty::Bool, "float16 mixed precision: needs a GPU (runs as bf16 there); an error on the CPU"),
        key("optim", Ty::OneOf(crate::train::args::Optim::NAMES), "optimizer: AdamW; bitsandbytes' 8-bit names run 32-bit AdamW (a note says what 8 bits would save)"),
        key("report_to", Ty::StrOrList, "\"none\", \"jsonl\" (metrics.jsonl, always written), \"tensorboard\" (event files under logging_dir), \"all\""),
        key("logging_dir", Ty::Str, "TensorBoard's folder (default output_dir/runs/DATE_HOST, as transformers)"),
        key("save_only_model", Ty::Bool, "checkpoints hold the adapter only, no optimizer state: smaller, but they cannot be resumed (default false)"),
];

/// `TrainingArguments`' `gradient_checkpointing_kwargs` (transformers passes its own to
/// `torch.utils.checkpoint`).
pub static GRADIENT_CHECKPOINTING_KWARGS: Schema = Schema {
    name: "gradient_checkpointing_kwargs",
    keys: &[
        key("offload", Ty::Bool, "on a GPU, keep each checkpointed layer input in pinned host memory until its recompute (default true; the CPU has nothing to offload)"),
        key("use_reentrant", Ty::Bool, "torch's checkpoint flavour, carried by ported notebooks; no effect here (one recompute, same gradients either way)"),
    ],
};

pub static TRAIN: Schema = Schema {
    name: "train",
    keys: &[key("resume_from_checkpoint", Ty::Any, "true (latest checkpoint in output_dir) or a checkpoint path")],
};

pub static SFT_TRAINER: Schema = Schema {
    name: "SFTTrainer options",
    keys: &[
        key("eval_dataset", Ty::Any, "a Dataset for evaluation"),
        key("callbacks", Ty::Map, "#{ on_log: |m| ..., on_evaluate: |m| ..., on_save: |path| ..., on_step_end: |state| ... }"),
    ],
};

/// Which schema validates the map argument of which function (for `qscript check`).
pub fn schema_for_call(fn_name: &str) -> Option<&'static Schema> {
    Some(match fn_name {
        "load_model" => &LOAD_MODEL,
        "LoraConfig" => &LORA_CONFIG,
        "TrainingArguments" => &TRAINING_ARGS,
        "SFTConfig" => &SFT_CONFIG,
        "SFTTrainer" => &SFT_TRAINER,
        "train" => &TRAIN,
        "generate" | "chat" => &GENERATE,
        "apply_chat_template" => &CHAT_TEMPLATE,
        "set_chat_template" => &SET_CHAT_TEMPLATE,
        "tokenize" | "encode" => &TOKENIZE,
        "save_gguf" => &SAVE_GGUF,
        "save_gguf_adapter" => &SAVE_GGUF_ADAPTER,
        "decode" => &DECODE,
        "load_dataset" => &LOAD_DATASET,
        "train_test_split" => &TRAIN_TEST_SPLIT,
        "tokenized" => &DATA_TOKENIZE,
        "stats" => &DATA_STATS,
        "preview" => &DATA_PREVIEW,
        "batches" => &DATA_BATCHES,
        "BitsAndBytesConfig" => &BNB_CONFIG,
        _ => return None,
    })
}

/// The transformers / trl names a ported notebook carries, onto [`TrainingArguments`]
/// (`train_api::training_arguments` fills the rest): `max_length` (trl's `max_seq_length`),
/// `evaluation_strategy` (the former `eval_strategy`), `dataset_text_field`, `bf16` / `fp16`,
/// `optim`, `report_to`, `logging_dir`, `save_only_model`.
pub fn notebook_names(cfg: &Cfg, a: &mut crate::train::TrainingArguments) -> anyhow::Result<()> {
    use crate::train::args::{Optim, ReportTo, Strategy};
    if let Some(n) = cfg.usize("max_length").map_err(|e| anyhow::anyhow!("TrainingArguments: {e}"))? {
        if cfg.has("max_seq_length") && a.max_seq_length != n {
            anyhow::bail!("TrainingArguments: `max_length` ({n}) and `max_seq_length` ({}) are the same setting; give one", a.max_seq_length);
        }
        a.max_seq_length = n;
    }
    if let Some(s) = cfg.str("evaluation_strategy") {
        if cfg.has("eval_strategy") && cfg.str("eval_strategy") != Some(s.clone()) {
            anyhow::bail!("TrainingArguments: `evaluation_strategy` is the former name of `eval_strategy`; give one");
        }
        a.eval_strategy = Strategy::parse(&s)?;
    }
    if let Some(f) = cfg.str("dataset_text_field") {
        a.dataset_text_field = f;
    }
    a.bf16 = cfg.bool("bf16").unwrap_or(false);
    a.fp16 = cfg.bool("fp16").unwrap_or(false);
    if let Some(o) = cfg.str("optim") {
        a.optim = Optim::parse(&o)?;
    }
    if let Some(r) = cfg.str_list("report_to") {
        a.report_to = ReportTo::parse(&r)?;
    }
    a.logging_dir = cfg.str("logging_dir").map(std::path::PathBuf::from);
    a.save_only_model = cfg.bool("save_only_model").unwrap_or(false);
    Ok(())
}
