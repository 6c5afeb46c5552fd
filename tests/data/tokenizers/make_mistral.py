"""SentencePiece BPE model (mistral-common's v3 tokenizer) -> tokenizer.json, as transformers' LlamaConverter (legacy) builds it."""
import sys, json
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as pb
from tokenizers import Tokenizer, AddedToken, normalizers, decoders, processors
from tokenizers.models import BPE
from transformers.tokenization_utils_base import generate_merges

src, out = sys.argv[1], sys.argv[2]
m = pb.ModelProto(); m.ParseFromString(open(src, 'rb').read())
sp = spm.SentencePieceProcessor(model_file=src)
vocab_scores = [(p.piece, p.score) for p in m.pieces]
for i in range(3):  # LlamaConverter: ids 0-2 scored 0
    vocab_scores[i] = (vocab_scores[i][0], 0.0)
vocab = {w: i for i, (w, _) in enumerate(vocab_scores)}
merges = generate_merges(vocab, vocab_scores)
tok = Tokenizer(BPE(vocab, merges, unk_token=m.trainer_spec.unk_piece, fuse_unk=True, byte_fallback=True, dropout=None))
tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
tok.add_special_tokens([AddedToken(p.piece, special=True, normalized=False) for p in m.pieces if p.type in (2, 3)])
bos = sp.piece_to_id('<s>')
tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
tok.save(out)
texts = ["naïve café 123 4567 tab\tend", "  leading spaces", "emoji 😀 and 中文字符 ∮", "x" * 50, "Hello,\nworld!\n\n  indented", "Hello world"]
for t in texts:
    a = tok.encode(t, add_special_tokens=False).ids; b = sp.encode(t)
    assert a == b, (t, tok.encode(t, add_special_tokens=False).tokens, sp.encode(t, out_type=str))
    assert tok.decode(a) == t or t.startswith(' '), (tok.decode(a), t)
print("ok", len(vocab), len(merges))
