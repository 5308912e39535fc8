"""Teacher tokenizers: tiktoken tables loaded offline from a `.tiktoken` file, or by name.

The aligner needs the teacher's tokens as real strings (what the teacher record holds).
For a tokenizer we run ourselves (tests, benchmarks, re-tokenising a text) we build
them here: each token's bytes go through an incremental UTF-8 decoder, so a character
split across two BPE tokens is attributed to the token that completes it and the
strings still concatenate to the decoded text exactly.
"""
from __future__ import annotations

import codecs
import os
from typing import Sequence

import tiktoken
from tiktoken.load import load_tiktoken_bpe

# The public pre-tokenisation regex of the GPT-2 / p50k family (r50k, p50k share it).
P50K_PATTERN = (r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
ENDOFTEXT = "<|endoftext|>"
P50K_EOT_ID = 50256
P50K_N_VOCAB = 50281  # 50280 ranks + <|endoftext|> (which sits inside the rank range's gap)

_DEFAULT_TABLE_DIRS = (os.environ.get("SPECIALIZE_TIKTOKEN_DIR", ""),
                       os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "tokenizers"))


def load_tiktoken_file(path: str, name: str | None = None) -> tiktoken.Encoding:
    """A p50k-style encoding from a local `.tiktoken` rank file (works offline).

    Only the GPT-2/p50k regex and `<|endoftext|>` are known here, so other tables
    (cl100k, o200k) should be loaded by name through tiktoken instead.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"teacher tokenizer table not found: {path}")
    ranks = load_tiktoken_bpe(path)
    name = name or os.path.basename(path).split(".")[0]
    n_vocab = P50K_N_VOCAB if len(ranks) == P50K_N_VOCAB - 1 else None
    eot = P50K_EOT_ID if n_vocab else len(ranks)
    return tiktoken.Encoding(name=name, pat_str=P50K_PATTERN, mergeable_ranks=ranks,
                             special_tokens={ENDOFTEXT: eot}, explicit_n_vocab=n_vocab)


def load_teacher_tokenizer(name_or_path: str = "p50k_base") -> tiktoken.Encoding:
    """A `.tiktoken` path; or a name, looked up as `<name>.tiktoken` in the shared table
    folder (offline) before asking tiktoken (which downloads the table)."""
    if name_or_path.endswith(".tiktoken") or os.path.sep in name_or_path:
        return load_tiktoken_file(name_or_path)
    for folder in _DEFAULT_TABLE_DIRS:
        candidate = os.path.join(folder, name_or_path + ".tiktoken") if folder else ""
        if candidate and os.path.isfile(candidate) and name_or_path in ("p50k_base", "r50k_base"):
            return load_tiktoken_file(candidate, name=name_or_path)
    return tiktoken.get_encoding(name_or_path)


def token_strings(enc: tiktoken.Encoding, ids: Sequence[int]) -> list[str]:
    """Real-character strings of `ids` that concatenate to `enc.decode(ids, errors="replace")`."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    out = [decoder.decode(enc.decode_single_token_bytes(i)) for i in ids]
    tail = decoder.decode(b"", final=True)
    if tail:  # an unfinished character at the very end becomes U+FFFD on the last token
        out[-1] += tail
    return out


def tokenize_text(enc: tiktoken.Encoding, text: str) -> list[str]:
    """The teacher's token strings of `text` (special-token text treated as plain text)."""
    return token_strings(enc, enc.encode_ordinary(text))
