//! The Ollama `Modelfile` written next to an exported GGUF (`ollama create NAME -f
//! OUT.Modelfile`): `FROM` the file (and `ADAPTER` for a LoRA file), the chat template
//! translated to Ollama's Go template for the template families Ollama knows (ChatML, Llama 3,
//! Gemma, Phi-3, Mistral `[INST]`), their stop tokens, and the model's default sampling
//! parameters (generation_config.json). A template qscript does not recognise gets no
//! `TEMPLATE`: Ollama then falls back to the GGUF's `tokenizer.chat_template` detection.

use crate::model::Model;
use std::fmt::Write as _;
use std::path::Path;

/// A chat template family: Ollama's Go template and the strings that end a turn.
struct Family {
    name: &'static str,
    /// Substrings of the Jinja template that identify it.
    markers: &'static [&'static str],
    template: &'static str,
    stops: &'static [&'static str],
}

const FAMILIES: [Family; 5] = [
    Family {
        name: "chatml",
        markers: &["<|im_start|>", "<|im_end|>"],
        template: "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n",
        stops: &["<|im_start|>", "<|im_end|>"],
    },
    Family {
        name: "llama3",
        markers: &["<|start_header_id|>", "<|eot_id|>"],
        template: "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n",
        stops: &["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
    },
    Family {
        name: "gemma",
        markers: &["<start_of_turn>", "<end_of_turn>"],
        template: "{{- range .Messages }}<start_of_turn>{{ if eq .Role \"assistant\" }}model{{ else }}{{ .Role }}{{ end }}\n{{ .Content }}<end_of_turn>\n{{ end }}<start_of_turn>model\n",
        stops: &["<end_of_turn>"],
    },
    Family {
        name: "phi3",
        markers: &["<|user|>", "<|end|>", "<|assistant|>"],
        template: "{{- range .Messages }}<|{{ .Role }}|>\n{{ .Content }}<|end|>\n{{ end }}<|assistant|>\n",
        stops: &["<|end|>", "<|user|>", "<|assistant|>"],
    },
    Family {
        name: "mistral",
        markers: &["[INST]", "[/INST]"],
        template: "{{- range .Messages }}{{ if eq .Role \"user\" }}[INST] {{ .Content }} [/INST]{{ else if eq .Role \"assistant\" }}{{ .Content }}</s>{{ end }}{{ end }}",
        stops: &["[INST]", "[/INST]"],
    },
];

fn family_of(jinja: &str) -> Option<&'static Family> {
    FAMILIES.iter().find(|f| f.markers.iter().all(|m| jinja.contains(m)))
}

/// The name of the template family Ollama will be given (`None`: not translated).
pub fn template_family(model: &Model) -> Option<&'static str> {
    model.tokenizer.as_ref()?.chat_template.as_deref().and_then(family_of).map(|f| f.name)
}

/// The Modelfile's text: `FROM from` (`ADAPTER adapter`: a LoRA GGUF applied on it), paths as
/// the Modelfile at `at` should name them.
pub fn render(model: &Model, at: &Path, from: &Path, adapter: Option<&Path>) -> String {
    let mut s = String::new();
    let name = at.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
    let _ = writeln!(s, "# Ollama Modelfile written by qscript for {}: ollama create NAME -f {name}", model.name_or_path);
    let _ = writeln!(s, "FROM {}", relative(at, from));
    if let Some(a) = adapter {
        let _ = writeln!(s, "ADAPTER {}", relative(at, a));
    }
    let tok = model.tokenizer.as_ref();
    let fam = tok.and_then(|t| t.chat_template.as_deref()).and_then(family_of);
    match fam {
        Some(f) => {
            let _ = writeln!(s, "TEMPLATE \"\"\"{}\"\"\"", f.template);
        }
        None if tok.is_some_and(|t| t.chat_template.is_some()) => {
            let _ = writeln!(s, "# TEMPLATE: the chat template is none qscript translates; Ollama reads the GGUF's tokenizer.chat_template");
        }
        None => {}
    }
    let mut stops: Vec<String> = fam.map(|f| f.stops.iter().map(|x| x.to_string()).collect()).unwrap_or_default();
    if let Some(eos) = tok.and_then(|t| t.eos_token.clone()) {
        if !stops.contains(&eos) {
            stops.push(eos);
        }
    }
    for stop in stops {
        let _ = writeln!(s, "PARAMETER stop {}", quoted(&stop));
    }
    let gc = &model.generation_config;
    for (ours, theirs) in [("temperature", "temperature"), ("top_p", "top_p"), ("top_k", "top_k"), ("repetition_penalty", "repeat_penalty")] {
        if let Some(v) = gc.get(ours).filter(|v| v.is_number()) {
            let _ = writeln!(s, "PARAMETER {theirs} {v}");
        }
    }
    let _ = writeln!(s, "PARAMETER num_ctx {}", model.config().max_position_embeddings.min(8192));
    s
}

/// `./name` for a file beside the Modelfile (Ollama resolves it there), else the absolute path.
fn relative(modelfile: &Path, file: &Path) -> String {
    let dir = |p: &Path| p.parent().map(|d| d.canonicalize().unwrap_or_else(|_| d.to_path_buf()));
    match (dir(modelfile), dir(file), file.file_name()) {
        (Some(a), Some(b), Some(n)) if a == b => format!("./{}", n.to_string_lossy()),
        _ => std::path::absolute(file).unwrap_or_else(|_| file.to_path_buf()).display().to_string(),
    }
}

/// `OUT.Modelfile` beside `OUT.gguf`.
pub fn modelfile_path(gguf: &Path) -> std::path::PathBuf {
    gguf.with_extension("Modelfile")
}

fn quoted(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_are_recognised_by_their_markers() {
        let cases = [
            ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}", Some("chatml")),
            ("<|start_header_id|>{{ role }}<|end_header_id|>\n\n{{ content }}<|eot_id|>", Some("llama3")),
            ("<start_of_turn>user\n{{ c }}<end_of_turn>", Some("gemma")),
            ("<|user|>\n{{ c }}<|end|>\n<|assistant|>", Some("phi3")),
            ("[INST] {{ c }} [/INST]", Some("mistral")),
            ("{{ messages[0].content }}", None),
        ];
        for (t, want) in cases {
            assert_eq!(family_of(t).map(|f| f.name), want, "{t}");
        }
        assert_eq!(quoted("a\"b"), "\"a\\\"b\"");
    }
}
