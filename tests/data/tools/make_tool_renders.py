"""Golden renders of tool conversations: transformers' own chat-template renderer
(`render_jinja_template`, as `apply_chat_template` calls it) over the Qwen2.5 and Qwen3
templates in tests/golden/templates/families.json.

    python3 tests/data/tools/make_tool_renders.py > tests/golden/templates/tools.json

Needs `transformers` (no torch). The tool schemas' keys are in the order a user writes them
(type before function, name before description before parameters), not sorted.
"""
import json, sys
from pathlib import Path
import transformers
from transformers.utils.chat_template_utils import render_jinja_template

root = Path(__file__).resolve().parents[3]
templates = json.loads((root / "tests/golden/templates/families.json").read_text())["templates"]

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City name"},
                          "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, "required": ["city"]}}}
TICKET = {"type": "function", "function": {"name": "open_ticket", "description": "Open a support ticket.",
          "parameters": {"type": "object", "properties": {"summary": {"type": "string"}, "priority": {"type": "integer"}},
                         "required": ["summary", "priority"]}}}
CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}}

conversations = [
    # A tool call, its result, the answer.
    [{"role": "user", "content": "Weather in Paris?"},
     {"role": "assistant", "content": "", "tool_calls": [CALL]},
     {"role": "tool", "content": "{\"temp\": 18}"},
     {"role": "assistant", "content": "It is 18 degrees in Paris."}],
    # With a system turn, two tools offered, a second call.
    [{"role": "system", "content": "You are a support agent."},
     {"role": "user", "content": "My login fails, open a ticket."},
     {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "open_ticket", "arguments": {"summary": "login fails", "priority": 2}}}]},
     {"role": "tool", "content": "ticket 4711"},
     {"role": "assistant", "content": "I opened ticket 4711."}],
    # Tools offered, none called.
    [{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Hi, how can I help?"}],
]

cases = []
for name in ["qwen2.5", "qwen3"]:
    for i, conv in enumerate(conversations):
        tools = [WEATHER] if i == 0 else [WEATHER, TICKET]
        out, _ = render_jinja_template(conversations=[conv], tools=tools, chat_template=templates[name]["chat_template"], add_generation_prompt=False)
        cases.append({"template": name, "messages": conv, "tools": tools, "rendered": out[0]})
json.dump({"transformers": transformers.__version__, "cases": cases}, sys.stdout, indent=1, ensure_ascii=False)
print()
