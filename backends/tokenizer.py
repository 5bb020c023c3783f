"""A CLIP tokenizer built in code, for pipelines with ``random`` weights (no model hub is reachable).

The real CLIP tokenizers ship a 49,408-entry BPE vocabulary with 48,894 merges. With random weights the
token ids carry no meaning, so this tokenizer keeps CLIP's pre-processing (NFC, whitespace folding,
lower-casing, CLIP's word split, byte-level mapping, ``</w>`` word ends) but has **no merges**: every
UTF-8 byte of a prompt becomes one token (id = byte value, +256 at the end of a word), framed by CLIP's
``<|startoftext|>`` (49406) and ``<|endoftext|>`` (49407, also padding) and cut at 77 tokens like CLIP.
Ids therefore fit any CLIP text encoder (vocab 49,408), and a prompt of n bytes costs the same text
encoder work as any other prompt (the encoder always sees 77 positions).

Prompts served with ``random`` weights are tokenised this way; pipelines loaded from the hub or a local
directory use the tokenizer saved with them.
"""

from __future__ import annotations

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
BOS_ID = 49406
EOS_ID = 49407
CLIP_MAX_LENGTH = 77


def _bytes_to_unicode() -> dict[int, str]:
    """Byte-level BPE's reversible map of the 256 byte values to printable characters.

    Printable Latin-1 bytes map to themselves; the others are shifted to code points from 256 up, in
    byte order, so that no token is whitespace or a control character.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\u00a1"), ord("\u00ac") + 1))
        + list(range(ord("\u00ae"), ord("\u00ff") + 1))
    )
    mapping = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + shifted)
            shifted += 1
    return mapping


def byte_level_vocab() -> dict[str, int]:
    """Token -> id: each byte alone (id = byte) and at a word end (id = 256 + byte), plus CLIP's specials."""
    chars = _bytes_to_unicode()
    vocab: dict[str, int] = {}
    for b in range(256):
        vocab[chars[b]] = b
        vocab[chars[b] + "</w>"] = 256 + b
    vocab[BOS_TOKEN] = BOS_ID
    vocab[EOS_TOKEN] = EOS_ID
    return vocab


def byte_level_clip_tokenizer(model_max_length: int = CLIP_MAX_LENGTH):
    """A ``transformers.CLIPTokenizer`` over :func:`byte_level_vocab` with no merges."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer(
        vocab=byte_level_vocab(),
        merges=[],
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        model_max_length=model_max_length,
    )
