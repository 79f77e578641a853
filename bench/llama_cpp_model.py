"""The 1.1B LLaMA of ``pyllm bench --models --model llama-1.1b`` as a
Hugging Face checkpoint that llama.cpp can convert, for the prefill and
decode comparison with llama.cpp.

    pip install sentencepiece        # not a pyllm dependency
    python bench/llama_cpp_model.py OUT_DIR [--dtype bfloat16]

writes ``OUT_DIR``: ``config.json`` and ``model.safetensors`` (TinyLlama-1.1B's
shapes with the bench's random weights: the same seed, the same values) and
``tokenizer.model``, a small SentencePiece BPE model trained on generated
words (llama.cpp's converter wants a tokenizer; it pads the vocabulary to the
model's 32000 entries, and the timings do not depend on the text). Then,
with llama.cpp built (``cmake -B build -DGGML_NATIVE=ON`` and ``cmake --build
build --target llama-bench``; the ``llama-cpp-python`` sdist carries the
source under ``vendor/llama.cpp``):

    PYTHONPATH=llama.cpp/gguf-py python llama.cpp/convert_hf_to_gguf.py OUT_DIR \\
        --outtype bf16 --outfile llama-1.1b-bf16.gguf      # or f32
    llama.cpp/build/bin/llama-bench -m llama-1.1b-bf16.gguf -t 2 -p 128 -n 64 -r 3

``pp128`` is the 128-token prefill and ``tg64`` the decode of 64 tokens, in
tokens/s: the bench's ``prefill B1 S128`` and ``decode B1 128+64`` rows.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import torch


def export(out: Path, dtype: torch.dtype) -> None:
    """Saves the bench's model (``dtype``) and a tokenizer into ``out``."""
    import sentencepiece

    from pyllm.benchmark.models import _llama_pair

    out.mkdir(parents=True, exist_ok=True)
    hf, _ = _llama_pair(dtype, "cpu")
    hf.save_pretrained(out, safe_serialization=True)
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
             for _ in range(3000)]
    corpus = out / "tokenizer_corpus.txt"
    with open(corpus, "w") as f:
        for _ in range(20000):
            f.write(" ".join(rng.choice(words) for _ in range(12)) + "\n")
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(out / "tokenizer"), vocab_size=2000, model_type="bpe",
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    corpus.unlink()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="directory to write")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    export(args.out, getattr(torch, args.dtype))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
