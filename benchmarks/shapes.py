"""Parameter sets shaped like real models (shapes only, no weights) and a sweep of total sizes.

Each set is the list of tensor shapes, in ``model.parameters()`` order, that an optimizer would see.
The encoder formula reproduces Hugging Face's BERT/RoBERTa sequence classifiers tensor for tensor
(RoBERTa-large: 355,361,794 values in 393 tensors); the decoder is OPT-1.3B-shaped (tied LM head);
the 7B set is Llama-2-7B's (6,738,415,616 values in 291 tensors), measured in bf16 only, as it is
fine-tuned.
"""
from __future__ import annotations

from dataclasses import dataclass
from math import prod


@dataclass(frozen=True)
class ShapeSet:
    name: str
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...] = ()  # the only weight dtypes measured (torch names); empty: every one

    @property
    def numel(self) -> int:
        return sum(prod(s) for s in self.shapes)

    @property
    def numel_list(self) -> list[int]:
        return [prod(s) for s in self.shapes]

    def measures(self, dtype) -> bool:
        return not self.dtypes or str(dtype).removeprefix("torch.") in self.dtypes

    @property
    def n_tensors(self) -> int:
        return len(self.shapes)


def encoder_shapes(
    *, vocab: int, max_pos: int, type_vocab: int, hidden: int, layers: int, ffn: int, labels: int, pooler: bool
) -> list[tuple[int, ...]]:
    """BERT (``pooler=True``: pooler + linear classifier) or RoBERTa (dense + out_proj head)."""
    h = hidden
    shapes: list[tuple[int, ...]] = [(vocab, h), (max_pos, h), (type_vocab, h), (h,), (h,)]
    per_layer = [(h, h), (h,)] * 4 + [(h,), (h,), (ffn, h), (ffn,), (h, ffn), (h,), (h,), (h,)]
    shapes += per_layer * layers
    shapes += [(h, h), (h,), (labels, h), (labels,)]  # pooler+classifier or dense+out_proj
    return shapes


def decoder_shapes(*, vocab: int, max_pos: int, hidden: int, layers: int, ffn: int) -> list[tuple[int, ...]]:
    """OPT-style decoder: token and learned position embeddings, pre-LN blocks, tied LM head."""
    h = hidden
    shapes: list[tuple[int, ...]] = [(vocab, h), (max_pos + 2, h)]
    per_layer = [(h, h), (h,)] * 4 + [(h,), (h,), (ffn, h), (ffn,), (h, ffn), (h,), (h,), (h,)]
    shapes += per_layer * layers
    shapes += [(h,), (h,)]
    return shapes


def bert_base() -> ShapeSet:
    return ShapeSet("bert-base", tuple(encoder_shapes(
        vocab=30522, max_pos=512, type_vocab=2, hidden=768, layers=12, ffn=3072, labels=2, pooler=True)))


def roberta_large(width_divisor: int = 1) -> ShapeSet:
    """RoBERTa-large; ``width_divisor`` > 1 keeps the 393 tensors but divides hidden, FFN and vocab."""
    d = width_divisor
    name = "roberta-large" if d == 1 else f"roberta-large/{d}"
    return ShapeSet(name, tuple(encoder_shapes(
        vocab=50265 // d, max_pos=514, type_vocab=1, hidden=1024 // d, layers=24, ffn=4096 // d, labels=2,
        pooler=False)))


def decoder_1p3b() -> ShapeSet:
    return ShapeSet("decoder-1.3b", tuple(decoder_shapes(vocab=50272, max_pos=2048, hidden=2048, layers=24, ffn=8192)))


def llama_shapes(*, vocab: int, hidden: int, layers: int, ffn: int) -> list[tuple[int, ...]]:
    """Llama decoder in Hugging Face's parameter order: embeddings, per layer q/k/v/o, gate/up/down
    and two RMSNorm weights, the final norm, an untied LM head (no biases)."""
    h = hidden
    per_layer = [(h, h)] * 4 + [(ffn, h), (ffn, h), (h, ffn), (h,), (h,)]
    return [(vocab, h)] + per_layer * layers + [(h,), (vocab, h)]


def llama2_7b() -> ShapeSet:
    return ShapeSet("llama-2-7b", tuple(llama_shapes(vocab=32000, hidden=4096, layers=32, ffn=11008)),
                    dtypes=("bfloat16",))


def sweep(total: int, n_matrices: int = 64) -> ShapeSet:
    """``total`` values (rounded down to whole rows): ``n_matrices`` weight matrices, each with a bias
    vector, like a stack of linear layers; the sweep shows how cost grows with size alone."""
    cols = 1024 if total // n_matrices >= 4 * 1024 else 64
    rows = max(1, (total // n_matrices - cols) // cols)
    shapes: list[tuple[int, ...]] = []
    for _ in range(n_matrices):
        shapes += [(rows, cols), (cols,)]
    return ShapeSet(f"sweep-{_short(total)}", tuple(shapes))


def _short(n: int) -> str:
    for unit, div in (("B", 10**9), ("M", 10**6), ("k", 10**3)):
        if n >= div and n % div == 0:
            return f"{n // div}{unit}"
    return str(n)


FULL_SWEEP = (10**6, 4 * 10**6, 16 * 10**6, 64 * 10**6, 256 * 10**6, 10**9)
QUICK_SWEEP = (250_000, 10**6)


def shape_sets(mode: str) -> list[ShapeSet]:
    """The parameter sets a run covers: real models first, then the sweep in growing size."""
    if mode == "full":
        # the reference model first: a time-limited run keeps what matters most
        return [roberta_large(), bert_base(), decoder_1p3b(), llama2_7b()] + [sweep(n) for n in FULL_SWEEP]
    if mode == "quick":
        # the 393 tensors of the reference model at 1/16 and 1/4 of its width (1.44M and 22.4M values)
        return [roberta_large(16), roberta_large(4)] + [sweep(n) for n in QUICK_SWEEP]
    if mode == "tiny":
        return [sweep(10_000, n_matrices=4)]
    raise ValueError(f"Invalid mode: {mode!r}; expected 'quick', 'full' or 'tiny'")
