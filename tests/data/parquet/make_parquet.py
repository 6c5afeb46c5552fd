"""Parquet fixtures for tests/notebook.rs, written by pyarrow as `datasets` writes a split
(`Dataset.to_parquet`: pyarrow, snappy; nested lists of structs for `messages`).

    python3 tests/data/parquet/make_parquet.py

chat.parquet   messages list<struct<role, content, tool_calls>> (nulls where a field is absent,
               as pyarrow fills a struct column), id int64, source (one null); snappy
qa.parquet     question / answer strings (for `columns:`), gzip, two row groups
zstd.parquet   one text column, zstd (polars' default)
brotli.parquet one text column, brotli (a codec qscript's build does not read: its error)
"""
from pathlib import Path
import pyarrow as pa
import pyarrow.parquet as pq

here = Path(__file__).resolve().parent

chat = [
    {"messages": [{"role": "system", "content": "You are a support agent."},
                  {"role": "user", "content": "How do I reset my password?"},
                  {"role": "assistant", "content": "Open Settings > Security and choose Reset."}],
     "id": 1, "source": "tickets"},
    {"messages": [{"role": "user", "content": "Open a ticket for my broken router."},
                  {"role": "assistant", "content": None,
                   "tool_calls": [{"type": "function", "function": {"name": "open_ticket", "arguments": "{\"topic\": \"router\"}"}}]},
                  {"role": "tool", "content": "ticket 4711"},
                  {"role": "assistant", "content": "I opened ticket 4711 for you."}],
     "id": 2, "source": None},
]
pq.write_table(pa.Table.from_pylist(chat), here / "chat.parquet", compression="snappy")

qa = [{"question": f"How do I {t}?", "answer": f"To {t}, open Settings."} for t in
      ["reset my password", "change my plan", "get a refund", "enable 2FA"]]
pq.write_table(pa.Table.from_pylist(qa), here / "qa.parquet", compression="gzip", row_group_size=2)

pq.write_table(pa.Table.from_pylist([{"text": "hello"}]), here / "zstd.parquet", compression="zstd")
pq.write_table(pa.Table.from_pylist([{"text": "hello"}]), here / "brotli.parquet", compression="brotli")
