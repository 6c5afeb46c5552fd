//! Chat templates must render exactly as transformers' `apply_chat_template` (jinja2 with
//! trim_blocks / lstrip_blocks, its own tojson, raise_exception). Expected strings outside the
//! golden file were checked against jinja2 configured like transformers.

use qscript::data::chat_template::ChatTemplate;
use serde_json::{json, Map, Value};

const GOLDEN: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/templates/renders.json");

fn golden() -> Value {
    serde_json::from_str(&std::fs::read_to_string(GOLDEN).expect("golden renders.json")).unwrap()
}

fn golden_template(name: &str) -> ChatTemplate {
    let g = golden();
    let t = &g["templates"][name];
    ChatTemplate::new(t["chat_template"].as_str().unwrap(), t["bos_token"].as_str().unwrap(), t["eos_token"].as_str().unwrap()).unwrap()
}

fn extra(v: Value) -> Map<String, Value> {
    v.as_object().unwrap().clone()
}

fn render(src: &str, messages: Value, ex: Value) -> anyhow::Result<String> {
    let t = ChatTemplate::new(src, "<s>", "</s>")?;
    t.render(messages.as_array().unwrap(), false, &extra(ex))
}

#[test]
fn golden_renders() {
    let g = golden();
    let mut templates = std::collections::HashMap::new();
    for (name, t) in g["templates"].as_object().unwrap() {
        let tpl = ChatTemplate::new(t["chat_template"].as_str().unwrap(), t["bos_token"].as_str().unwrap(), t["eos_token"].as_str().unwrap()).unwrap();
        templates.insert(name.clone(), tpl);
    }
    let cases = g["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 72);
    for (i, case) in cases.iter().enumerate() {
        let tpl = &templates[case["template"].as_str().unwrap()];
        let out = tpl.render(case["messages"].as_array().unwrap(), case["add_generation_prompt"].as_bool().unwrap(), &Map::new()).unwrap();
        assert_eq!(out, case["rendered"].as_str().unwrap(), "case {i} ({})", case["template"]);
    }
}

/// The Qwen2.5, Qwen3, Mistral, Gemma 3, Phi-3 and Phi-4 templates as the models ship them,
/// 24 conversations each, byte-identical to transformers' renders.
#[test]
fn golden_family_renders() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/templates/families.json");
    let g: Value = serde_json::from_str(&std::fs::read_to_string(path).expect("golden families.json")).unwrap();
    let mut templates = std::collections::HashMap::new();
    for (name, t) in g["templates"].as_object().unwrap() {
        let tpl = ChatTemplate::new(t["chat_template"].as_str().unwrap(), t["bos_token"].as_str().unwrap(), t["eos_token"].as_str().unwrap()).unwrap();
        templates.insert(name.clone(), tpl);
    }
    let cases = g["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 144);
    let mut per_template = std::collections::BTreeMap::new();
    for (i, case) in cases.iter().enumerate() {
        let name = case["template"].as_str().unwrap();
        let out = templates[name].render(case["messages"].as_array().unwrap(), case["add_generation_prompt"].as_bool().unwrap(), &Map::new());
        assert_eq!(out.unwrap(), case["rendered"].as_str().unwrap(), "case {i} ({name})");
        *per_template.entry(name).or_insert(0) += 1;
    }
    assert_eq!(per_template.into_iter().collect::<Vec<_>>(), [("gemma3", 24), ("mistral", 24), ("phi3", 24), ("phi4", 24), ("qwen2.5", 24), ("qwen3", 24)]);
}

#[test]
fn tojson_matches_python_json_dumps() {
    let data = json!({"b": [1, 2.5, {"ü": "naïve <&'>"}], "a": null, "t": true, "e": [], "o": {}, "s": "line\nq\"\\\u{1}"});
    let ex = extra(json!({ "data": data }));
    let t = ChatTemplate::new("{{ data | tojson }}|{{ data | tojson(indent=4) }}", "", "").unwrap();
    let out = t.render(&[], false, &ex).unwrap();
    let plain = r#"{"b": [1, 2.5, {"ü": "naïve <&'>"}], "a": null, "t": true, "e": [], "o": {}, "s": "line\nq\"\\\u0001"}"#;
    let indented = r#"{
    "b": [
        1,
        2.5,
        {
            "ü": "naïve <&'>"
        }
    ],
    "a": null,
    "t": true,
    "e": [],
    "o": {},
    "s": "line\nq\"\\\u0001"
}"#;
    assert_eq!(out, format!("{plain}|{indented}"));

    // The other json.dumps keywords transformers' tojson accepts.
    let t = ChatTemplate::new(
        "{{ data | tojson(ensure_ascii=true) }}|{{ data | tojson(sort_keys=true, separators=[',', ':']) }}|{{ 1e-05 | tojson }} {{ 1e16 | tojson }} {{ 3.0 | tojson }}",
        "",
        "",
    )
    .unwrap();
    let ex = extra(json!({ "data": {"z": "é😀", "a": [1, 2]} }));
    assert_eq!(
        t.render(&[], false, &ex).unwrap(),
        r#"{"z": "\u00e9\ud83d\ude00", "a": [1, 2]}|{"a":[1,2],"z":"é😀"}|1e-05 1e+16 3.0"#
    );
}

#[test]
fn raise_exception_message_surfaces() {
    // Llama-3.1 with tools but no user message to carry them.
    let tpl = golden_template("llama3.1");
    let ex = extra(json!({"tools": [{"type": "function", "function": {"name": "f"}}]}));
    let err = tpl.render(&[json!({"role": "system", "content": "sys"})], true, &ex).unwrap_err().to_string();
    assert!(err.contains("Cannot put tools in the first user message when there's no first user message!"), "{err}");

    // Two tool calls in one message.
    let msgs = [json!({"role": "user", "content": "x"}), json!({"role": "assistant", "tool_calls": [1, 2]})];
    let err = tpl.render(&msgs, false, &Map::new()).unwrap_err().to_string();
    assert!(err.contains("This model only supports single tool-calls at once!"), "{err}");

    let err = render("a{{ raise_exception('custom: ' + messages[0].content) }}", json!([{"content": "boom"}]), json!({})).unwrap_err().to_string();
    assert!(err.contains("custom: boom"), "{err}");
}

#[test]
fn syntax_error_names_the_line() {
    let err = ChatTemplate::new("{% for m in messages %}\n{{ m.content }}\n{% if x %}\n{% endfor %}", "", "").err().expect("must fail").to_string();
    assert!(err.contains("syntax error") && err.contains("line 4"), "{err}");
    let err = ChatTemplate::new("ok\n{{ foo( }}", "", "").err().expect("must fail").to_string();
    assert!(err.contains("line 2") && err.contains("{{ foo( }}"), "{err}");
}

const BOT: &str = "<|begin_of_text|>";
const SYS_HEAD: &str = "<|start_header_id|>system<|end_header_id|>\n\n";
const DATES: &str = "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n";

#[test]
fn llama31_tool_call_and_tool_results() {
    let tpl = golden_template("llama3.1");
    let msgs = [
        json!({"role": "system", "content": "  You are helpful.  "}),
        json!({"role": "user", "content": "Weather in Zürich?"}),
        json!({"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich", "days": 2}}}]}),
        // A string tool result is "iterable" in jinja2, so it goes through tojson (quoted).
        json!({"role": "tool", "content": "sunny, 21°C"}),
        json!({"role": "tool", "content": {"temp": 21.5, "sky": "sunny"}}),
    ];
    let out = tpl.render(&msgs, true, &Map::new()).unwrap();
    let expected = [
        BOT,
        SYS_HEAD,
        DATES,
        "You are helpful.<|eot_id|>",
        "<|start_header_id|>user<|end_header_id|>\n\nWeather in Zürich?<|eot_id|>",
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
        r#"{"name": "get_weather", "parameters": {"city": "Zürich", "days": 2}}<|eot_id|>"#,
        "<|start_header_id|>ipython<|end_header_id|>\n\n\"sunny, 21°C\"<|eot_id|>",
        "<|start_header_id|>ipython<|end_header_id|>\n\n{\"temp\": 21.5, \"sky\": \"sunny\"}<|eot_id|>",
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
    ]
    .concat();
    assert_eq!(out, expected);
}

#[test]
fn llama31_tools_in_user_message_and_builtin_tools() {
    let tpl = golden_template("llama3.1");
    let tool = json!({"type": "function", "function": {"name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}});
    let out = tpl.render(&[json!({"role": "user", "content": "Weather?"})], true, &extra(json!({"tools": [tool]}))).unwrap();
    let tool_json = "{\n    \"type\": \"function\",\n    \"function\": {\n        \"name\": \"get_weather\",\n        \"parameters\": {\n            \"type\": \"object\",\n            \"properties\": {\n                \"city\": {\n                    \"type\": \"string\"\n                }\n            },\n            \"required\": [\n                \"city\"\n            ]\n        }\n    }\n}";
    let expected = [
        BOT,
        SYS_HEAD,
        "Environment: ipython\n",
        DATES,
        "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n",
        "Given the following functions, please respond with a JSON for a function call with its proper arguments that best answers the given prompt.\n\n",
        "Respond in the format {\"name\": function name, \"parameters\": dictionary of argument name and its value}.Do not use variables.\n\n",
        tool_json,
        "\n\nWeather?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
    ]
    .concat();
    assert_eq!(out, expected);

    let msgs = [
        json!({"role": "user", "content": "hi"}),
        json!({"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "brave_search", "arguments": {"query": "rust"}}}]}),
    ];
    let out = tpl.render(&msgs, false, &extra(json!({"builtin_tools": ["brave_search", "code_interpreter"]}))).unwrap();
    let expected = [
        BOT,
        SYS_HEAD,
        "Environment: ipython\nTools: brave_search\n\n",
        DATES,
        "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>",
        "<|start_header_id|>assistant<|end_header_id|>\n\n<|python_tag|>brave_search.call(query=\"rust\")<|eom_id|>",
    ]
    .concat();
    assert_eq!(out, expected);
}

#[test]
fn python_behaviours() {
    // str methods, Python whitespace for trim/strip (0x1c is whitespace to Python), slicing,
    // loop controls, printing lists / dicts / floats / None / bools as Python does.
    let src = "{% for m in messages[1:] %}{% if loop.index > 2 %}{% break %}{% endif %}[{{ m.content.strip() }}|{{ m.content | trim }}|{{ m.content.startswith(' ') }}]{% endfor %}\n\
               {{ messages | length }} {{ [1, 'a', none, true] }} {{ {'k': 'it\\'s'} }} {{ 0.5 }} {{ 1e20 }} {{ none }} {% for k, v in x.items() %}{{ k }}={{ v }},{% endfor %}";
    let msgs = json!([{"content": "skip"}, {"content": " a\u{1c}"}, {"content": "\tb "}, {"content": "c"}]);
    let out = render(src, msgs, json!({"x": {"b": 1, "a": 2}})).unwrap();
    assert_eq!(out, "[a|a|True][b|b|False]4 [1, 'a', None, True] {'k': \"it's\"} 0.5 1e+20 None b=1,a=2,");
}

#[test]
fn trim_blocks_lstrip_blocks_and_trailing_newline() {
    let src = "{% for m in messages %}\n    {% if m.role == 'user' %}\nU: {{ m.content }}\n    {% else %}\nA: {{ m.content }}\n    {% endif %}\n{% endfor %}\n";
    let out = render(src, json!([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]), json!({})).unwrap();
    assert_eq!(out, "U: hi\nA: yo\n");
}

#[test]
fn generation_tags_and_variables() {
    // AssistantTracker's {% generation %} renders its body; tools/documents are defined (None).
    let src = "{{ bos_token }}{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}{{ m.content }}{{ eos_token }}{% endgeneration %}{% else %}{{ m.content }}{% endif %}{% endfor %}\
               {{ tools is defined }}{{ tools is none }}{{ documents }}{{ add_generation_prompt }}{{ custom }}";
    let out = render(src, json!([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]), json!({"custom": 7})).unwrap();
    assert_eq!(out, "<s>qa</s>TrueTrueNoneFalse7");
    assert!(render(src, json!([]), json!({"messages": []})).is_err());
    assert_eq!(render("{{ strftime_now('%Y') | length }}", json!([]), json!({})).unwrap(), "4");
}
