"""A CLIP tokenizer over a small closed vocabulary: the words of a data set's captions, built offline.

    tokenizer = word_tokenizer("runs/x/tokenizer", caption_words(["a handwritten seven", "a handwritten two"]))
    tokenizer.tokenize("a handwritten seven")   # ['a</w>', 'handwritten</w>', 'seven</w>']

The folder it writes is an ordinary transformers `CLIPTokenizer` folder (vocab.json, merges.txt,
tokenizer_config.json, special_tokens_map.json), so diffusers' pipelines and `diffax.pipelines.load` read it
like Stable Diffusion's. Nothing is downloaded: a model trained from nothing on captions of a few dozen words
needs no 49408-token vocabulary.
"""
from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Any, Iterable

MAX_LENGTH = 77  # every Stable Diffusion text encoder's max_position_embeddings


class TokenizerError(ValueError):
    """A word the closed vocabulary cannot hold as one token."""


def caption_words(captions: Iterable[str]) -> tuple[str, ...]:
    """The distinct lower-cased words of `captions`, sorted."""
    return tuple(sorted({w for c in captions for w in c.lower().split()}))


def word_tokenizer(folder: str | Path, words: Iterable[str], max_length: int = MAX_LENGTH) -> Any:
    """transformers' CLIPTokenizer over the 26 letters and `words` (lower-case letters), saved to `folder`
    and loaded from it.

    Its BPE merges build each word letter by letter, so a word of the list is one token and any other
    lower-case word is spelled out. The start- and end-of-text tokens come last, as in CLIP's vocabulary;
    end-of-text also pads, as in SD 1.x's tokenizer. TokenizerError if a word is not lower-case letters, or if
    one word's merges would split another.
    """
    import transformers

    words = tuple(dict.fromkeys(words))
    tokens = [*string.ascii_lowercase, *(c + "</w>" for c in string.ascii_lowercase)]
    merges: list[str] = []
    for word in sorted(words, key=len, reverse=True):  # long words' merges rank first: 'moon' before 'on'
        if not (word.isascii() and word.isalpha() and word.islower()):
            raise TokenizerError(f"word_tokenizer: {word!r} is not a lower-case word")
        piece = word[0]
        for i, c in enumerate(word[1:], 1):
            end = "</w>" if i == len(word) - 1 else ""
            if piece + c + end not in tokens:
                tokens.append(piece + c + end)
                merges.append(f"{piece} {c}{end}")
            piece += c + end
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("\n".join(["#version: 0.2", *merges]) + "\n")
    transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length,
                               pad_token="<|endoftext|>").save_pretrained(folder)
    tokenizer = transformers.CLIPTokenizer.from_pretrained(folder)
    split = [w for w in words if len(tokenizer.tokenize(w)) != 1]
    if split:  # one word's merges can apply inside another and break its chain
        raise TokenizerError(f"word_tokenizer: the merges spell {split} in pieces; drop or reorder the words")
    return tokenizer
