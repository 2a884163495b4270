"""Convert an official Mix-of-Show ED-LoRA ``.pth`` into this pack's ``.safetensors`` layout.

Run from the pack folder::

    python -m formats.convert_edlora path/to/concept.pth [out.safetensors] [--words "<cat1> <cat2>"] [--class-word cat]

The input is read with ``torch.load(weights_only=True)``: a file that needs pickle code execution is
refused, never run. An existing output file is never overwritten.
"""

from __future__ import annotations

import argparse
import os
import sys

from .edlora import EDLoRAFileError, default_safetensors_name, read_edlora, write_edlora_safetensors


def convert(src: str, dst: str | None = None, words: str = "", class_word: str = "") -> str:
    weights = read_edlora(src)
    if words.strip():
        weights = weights.with_words(words.split())
    if class_word.strip():
        from dataclasses import replace

        weights = replace(weights, class_word=class_word.strip())
    if dst is None:
        dst = os.path.join(os.path.dirname(os.path.abspath(src)), default_safetensors_name(src))
    return write_edlora_safetensors(weights, dst)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m formats.convert_edlora", description=__doc__.splitlines()[0])
    parser.add_argument("source", help="official Mix-of-Show .pth (or one of our .safetensors)")
    parser.add_argument("output", nargs="?", help="output .safetensors (default: next to the source, same name)")
    parser.add_argument("--words", default="", help="rename the concept words, e.g. '<alice1> <alice2>'")
    parser.add_argument("--class-word", default="", help="class word stored in the metadata, e.g. 'woman'")
    args = parser.parse_args(argv)
    try:
        out = convert(args.source, args.output, args.words, args.class_word)
    except EDLoRAFileError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    weights = read_edlora(out)
    print(
        f"wrote {out}: words {' '.join(weights.words)}, {weights.layer_tokens} layer tokens, "
        f"{len(weights.unet_lora)} UNet + {sum(len(v) for v in weights.text_encoder_lora.values())} text-encoder LoRA modules"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
