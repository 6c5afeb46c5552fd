"""llama.cpp's ggml-vocab-phi-3.gguf (Phi-3-mini's SentencePiece vocab) -> tokenizer.json as
transformers' LlamaConverter builds it; Phi-3's added tokens 32000-32010 (special; the chat
ones rstrip=True, as microsoft/Phi-3-mini-4k-instruct's tokenizer.json)."""
import sys
from gguf import GGUFReader
from tokenizers import Tokenizer, AddedToken, normalizers, decoders, processors
from tokenizers.models import BPE
from transformers.tokenization_utils_base import generate_merges
src, out = sys.argv[1], sys.argv[2]
r = GGUFReader(src)
toks = r.fields['tokenizer.ggml.tokens'].contents()
scores = r.fields['tokenizer.ggml.scores'].contents()
vocab_scores = [(toks[i], 0.0 if i < 3 else float(scores[i])) for i in range(32000)]
vocab = {w: i for i, (w, _) in enumerate(vocab_scores)}
merges = generate_merges(vocab, vocab_scores)
tok = Tokenizer(BPE(vocab, merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True, dropout=None))
tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ["<unk>", "<s>", "</s>"]])
tok.add_special_tokens([AddedToken(toks[i], special=True, normalized=False, rstrip=(i != 32000)) for i in range(32000, 32011)])
tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
assert tok.token_to_id("<|end|>") == 32007
tok.save(out, pretty=False)
# llama.cpp's own test strings and ids for this vocabulary (no BOS)
inp = open(src + '.inp').read().split('\n__ggml_vocab_test__\n')
outs = open(src + '.out').read().split('\n')
bad = 0
for t, o in zip(inp, outs):
    want = [int(x) for x in o.split()]
    got = tok.encode(t, add_special_tokens=False).ids
    if got != want: bad += 1; print('MISMATCH', repr(t), got, want)
print('checked', min(len(inp), len(outs)), 'bad', bad)
