"""Peak memory of a stage, from a model's config and the stage's settings, before anything is loaded. Pure.

A stage's peak is a sum of items (bytes): the weights at the bits they are held in, the LoRA parameters with
their gradients and AdamW state, the activations a training step keeps for its backward pass, the logits, the
KV cache of generation, and a second model where a stage loads one. What is counted, per item:

- weights: every linear and embedding matrix at `weight_bits` (quantized: bits + the 16-bit scale and bias of
  each group; on the CPU, where models are dequantized on load, 32). Norms and biases are ignored (< 0.1%).
- lora: rank x (in + out) per adapted matrix of the last `lora_layers` blocks, float32, x4 (weights, gradient,
  AdamW's two moments).
- activations: per token of a batch (batch x max_seq_length, the worst batch) and per block that gradients pass
  through (the adapted ones), what the backward pass reads: the block's input, the two norm outputs, q/k/v, the
  attention output, the residual, gate, up and their product (5h + 2kv + 4f values; h hidden, kv the K/V width,
  f the MLP width). With grad_checkpoint only each block's input is kept, and one block is recomputed at a time.
  On top, one block's worth of working buffers for its gradients, and its attention scores (B x heads x L x L,
  float32).
- logits: the vocabulary projection at every answer position (worst: every token), in the activation dtype, its
  float32 copy for the log-softmax and the float32 gradient of that.
- kv cache: batch x (prompt + new tokens) x layers x 2 x kv, in the activation dtype; prefill works on one block
  at a time.
- cpu copies: on the CPU the C++ kernels keep packed copies of the linear weights (fastllama: fused + packed;
  training: two packed copies of the frozen ones). A model kept quantized gets `linear_rows_q` packs for
  generation instead: its codes plus a float32 scale and bias per group (fastllama `_qpack_nbytes`), for 4- and
  8-bit groups of 32, 64 or 128.

Simplifications, said plainly: the allocator's cache and fragmentation are not counted (the Metal limits in
mlx_cai.memcheck bound the cache); the worst batch is assumed, so typical steps use less; attention is costed as
unfused scores of one block at a time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

GB = 1e9  # memory figures are decimal GB, as mlx-lm prints its peaks
FLOAT32 = 4
LORA_COPIES = 4  # LoRA weight, its gradient, AdamW's first and second moments (all float32)
SAVED_PER_TOKEN = (5, 2, 4)  # activations kept per token and block: 5h + 2kv + 4f values (module docstring)
# Generation prompts are not known before the data is: the chat template, a system turn and the request (~256
# tokens), plus each few-shot demo (a request, an answer, a critique and a revision: ~384 tokens).
PROMPT_TOKENS = 256
DEMO_TOKENS = 384
PREFILL_ROWS = 8  # prompts are prefilled a few rows at a time (mlx-lm's BatchGenerator: prefill_batch_size 8)


@dataclass(frozen=True)
class ModelShape:
    """What the memory of a llama-family transformer depends on (from its config.json, no weights)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    weight_bits: float  # bits per weight as held in memory, scales and biases included
    act_bytes: int  # bytes per activation value (2: float16/bfloat16, 4: float32)
    quant_bits: int = 0  # kept quantized (MLX affine): bits and group size of the block weights; 0: not quantized
    group_size: int = 0
    head_quant: tuple[int, int] | None = None  # (bits, group size) of the vocabulary projection where it differs

    @classmethod
    def from_config(cls, config: dict, *, dequantize: bool) -> "ModelShape":
        """From an mlx-lm / Hugging Face config.json; `dequantize`: weights become float32 on load (the CPU)."""
        hidden = int(config["hidden_size"])
        heads = int(config["num_attention_heads"])
        quant = config.get("quantization") or config.get("quantization_config")
        # No dtype named (a GGUF converted here): its norms are float32, so the activations are too.
        dtype = str(config.get("torch_dtype") or config.get("dtype") or "float32")
        act = FLOAT32 if dequantize or dtype == "float32" else 2
        qbits = group = 0
        head_quant = None
        if dequantize:
            bits = 32.0
        elif quant and "bits" in quant:
            qbits, group = int(quant["bits"]), int(quant.get("group_size", 64))
            bits = quantized_bits(qbits, group)
            # the head's own entry (a GGUF's Q4_1 model keeps its embedding, the tied head, at 8 bits)
            head = quant.get("model.embed_tokens" if config.get("tie_word_embeddings") else "lm_head")
            if isinstance(head, dict) and "bits" in head:
                head_quant = (int(head["bits"]), int(head.get("group_size", group)))
        else:
            bits = 8.0 * act
        return cls(hidden=hidden, layers=int(config["num_hidden_layers"]), heads=heads,
                   kv_heads=int(config.get("num_key_value_heads") or heads),
                   head_dim=int(config.get("head_dim") or hidden // heads),
                   intermediate=int(config["intermediate_size"]), vocab=int(config["vocab_size"]),
                   tied=bool(config.get("tie_word_embeddings", False)), weight_bits=bits, act_bytes=act,
                   quant_bits=qbits, group_size=group, head_quant=head_quant)

    @property
    def kv(self) -> int:
        """Width of K (and of V) per token: kv heads x head dim."""
        return self.kv_heads * self.head_dim

    def block_matrices(self) -> list[tuple[int, int]]:
        """(in, out) of the seven linear layers of one block: q, k, v, o, gate, up, down."""
        h, q, f = self.hidden, self.heads * self.head_dim, self.intermediate
        return [(h, q), (h, self.kv), (h, self.kv), (q, h), (h, f), (h, f), (f, h)]

    def block_params(self) -> int:
        return sum(i * o for i, o in self.block_matrices())

    def params(self) -> int:
        """Linear and embedding parameters (norms left out)."""
        head = 0 if self.tied else self.vocab * self.hidden
        return self.layers * self.block_params() + self.vocab * self.hidden + head

    def weight_bytes(self) -> float:
        return self.params() * self.weight_bits / 8


def quantized_bits(bits: int, group_size: int, scale_bits: int = 16) -> float:
    """Bits per weight of MLX's affine quantization: the packed bits + a scale and a bias per group."""
    return bits + 2 * scale_bits / group_size


def quantized_pack_bytes(shape: ModelShape) -> float:
    """Bytes of the `kernels.linear_rows_q` packs fastllama makes for a model kept quantized (block matrices and
    the vocabulary projection, the tied embedding included): codes + float32 scale and bias per group, for the
    bits and group sizes the kernel takes (fastllama `_packable`); 0 for a model not kept quantized."""
    def per_weight(bits: int, group: int) -> float:
        packable = bits in (4, 8) and group in (32, 64, 128)
        return quantized_bits(bits, group, scale_bits=32) / 8 if packable else 0.0

    if not shape.quant_bits:
        return 0.0
    block = (shape.quant_bits, shape.group_size)
    return (shape.layers * shape.block_params() * per_weight(*block)
            + shape.vocab * shape.hidden * per_weight(*(shape.head_quant or block)))


@dataclass(frozen=True)
class Estimate:
    """The peak of one stage, itemised, and the settings that shrink it (section.field or --flag, value)."""

    stage: str
    items: dict[str, float]
    knobs: tuple[tuple[str, object], ...] = ()
    notes: tuple[str, ...] = field(default=())

    @property
    def total(self) -> float:
        return sum(self.items.values())


@dataclass(frozen=True)
class Context:
    """What a stage config needs to estimate its peak: the shape of a model spec (None for an API backend or a
    model whose config cannot be read without loading it), how the user names a setting ("sft.batch_size" in a
    run, "--batch-size" on a stage command), the run's model and the CPU kernels' weight copies."""

    stage: str
    shape: Callable[[str], ModelShape | None]
    name: Callable[[str], str]
    model: str | None = None  # the run's model: the responder clean's helpful answers default to
    train_copy_limit: float = 0.0  # CPU kernels: bytes of packed weight copies training may make (0: none)
    decode_copy_limit: float = 0.0  # CPU kernels: bytes of fused/packed copies generation may make (0: none)
    fused_attention: bool = False  # GPU: inference attention never materialises its scores


def training(ctx: Context, cfg, sequences: int) -> Estimate | None:
    """A TrainConfig's peak (`sequences` per example: DPO's chosen and rejected run as one batch)."""
    shape = ctx.shape(cfg.model)
    if shape is None:
        return None
    items = train_items(shape, batch=cfg.batch_size * sequences, seq=cfg.max_seq_length, lora_layers=cfg.lora_layers,
                        lora_rank=cfg.lora_rank, grad_checkpoint=cfg.grad_checkpoint,
                        copy_limit=ctx.train_copy_limit)
    notes = () if cfg.grad_checkpoint else (f"or set {ctx.name('grad_checkpoint')} true",)
    return Estimate(ctx.stage, items, ((ctx.name("batch_size"), cfg.batch_size),
                                       (ctx.name("max_seq_length"), cfg.max_seq_length)), notes)


def generation(ctx: Context, spec: str | None, others: dict[str, str | None], *, batch: int, prompt: int,
               new_tokens: int, knobs: dict[str, object]) -> Estimate | None:
    """The peak of a stage that generates with `spec` and the `others` (role -> spec: a critic, judge or writer,
    which generate in turn; API backends and repeats of `spec` cost nothing), batch rows at once; `knobs`: the
    settings (field -> value) that lower it. Each local model generates while the others stay loaded (with their
    CPU kernel copies): the peak is the largest such moment. None when no local model generates."""
    roles = {"": spec, **{role: other for role, other in others.items() if other and other != spec}}
    shapes = {role: ctx.shape(s) for role, s in roles.items() if s}
    shapes = {role: shape for role, shape in shapes.items() if shape is not None}
    if not shapes:
        return None

    def moment(active: str) -> dict[str, float]:
        items = _named(active, generate_items(shapes[active], batch=batch, prompt=prompt, new_tokens=new_tokens,
                                              copy_limit=ctx.decode_copy_limit, scores=not ctx.fused_attention))
        for role, shape in shapes.items():
            if role != active:
                items.update(held_model(shape, role or "model", ctx.decode_copy_limit))
        return items

    items = max((moment(role) for role in shapes), key=lambda it: sum(it.values()))
    return Estimate(ctx.stage, items, tuple((ctx.name(k), v) for k, v in knobs.items()))


def _named(role: str, items: dict[str, float]) -> dict[str, float]:
    return {f"{role} {k}" if role else k: v for k, v in items.items()}


def train_items(shape: ModelShape, *, batch: int, seq: int, lora_layers: int, lora_rank: int,
                grad_checkpoint: bool, answer_tokens: int | None = None, copy_limit: float = 0.0) -> dict[str, float]:
    """Bytes of a LoRA training step over `batch` sequences of `seq` tokens (DPO: batch = 2 x pairs).
    `answer_tokens`: positions whose logits are computed (default: all of them, the worst case);
    `copy_limit`: the CPU kernels keep two packed copies of the frozen float32 weights when they fit in it."""
    adapted = shape.layers if lora_layers < 0 else min(lora_layers, shape.layers)
    tokens = batch * seq
    a = shape.act_bytes
    ch, ckv, cf = SAVED_PER_TOKEN
    per_block = (ch * shape.hidden + ckv * shape.kv + cf * shape.intermediate) * tokens * a
    scores = batch * shape.heads * seq * seq * FLOAT32
    lora = adapted * lora_rank * sum(i + o for i, o in shape.block_matrices())
    kept = adapted * shape.hidden * tokens * a if grad_checkpoint else adapted * per_block
    k = tokens if answer_tokens is None else answer_tokens
    items = {
        "weights": shape.weight_bytes(),
        "lora + grads + adam": lora * FLOAT32 * LORA_COPIES,
        "activations": kept + 2 * per_block if grad_checkpoint else kept + per_block,
        "attention scores": 2 * scores,
        "logits": k * shape.vocab * (a + 2 * FLOAT32),
    }
    frozen = (shape.layers * shape.block_params() + (0 if shape.tied else shape.vocab * shape.hidden)) * FLOAT32
    if shape.weight_bits == 32 and 0 < 2 * frozen <= copy_limit:
        items["cpu kernel copies"] = 2 * frozen
    return items


def generate_items(shape: ModelShape, *, batch: int, prompt: int, new_tokens: int, copy_limit: float = 0.0,
                   scores: bool = True) -> dict[str, float]:
    """Bytes of batched generation: weights, the KV cache of batch x (prompt + new tokens), the buffers of one
    block prefilling PREFILL_ROWS prompts (with their attention scores unless `scores` is False: fused attention),
    the last position's logits. `copy_limit`: the CPU kernels' decode path keeps packed copies of the float32
    weights, and fused q/k/v and gate/up copies, when they fit in it; of a model kept quantized, `linear_rows_q`
    packs (quantized_pack_bytes) when they fit in it (the model's own quantized arrays stay: prefill above
    fastllama.Q_ROWS_MAX rows dequantizes them)."""
    a = shape.act_bytes
    length = prompt + new_tokens
    rows = min(batch, PREFILL_ROWS)
    items = {
        "weights": shape.weight_bytes(),
        "kv cache": batch * length * shape.layers * 2 * shape.kv * a,
        "prefill": rows * prompt * (4 * shape.hidden + 3 * shape.intermediate) * a
                   + (rows * shape.heads * prompt * length * FLOAT32 if scores else 0),
        "logits": batch * shape.vocab * FLOAT32 * 2,
    }
    if shape.weight_bits == 32:
        packed = (shape.layers * shape.block_params() + shape.vocab * shape.hidden) * FLOAT32
        q = shape.heads * shape.head_dim
        fused = shape.layers * shape.hidden * (q + 2 * shape.kv + 2 * shape.intermediate) * FLOAT32
        copies = packed + fused if packed + fused <= copy_limit else packed if packed <= copy_limit else 0.0
        if copies:
            items["cpu kernel copies"] = copies
    elif 0 < (packs := quantized_pack_bytes(shape)) <= copy_limit:
        items["cpu kernel copies"] = packs
    return items


def held_model(shape: ModelShape, role: str, copy_limit: float = 0.0) -> dict[str, float]:
    """Another model a stage holds while one generates: its weights and, on the CPU, the packed copies its
    decode path built (a critic, judge or helpful-answer writer)."""
    items = generate_items(shape, batch=0, prompt=0, new_tokens=0, copy_limit=copy_limit)
    return {f"{role} {k}": items[k] for k in ("weights", "cpu kernel copies") if k in items}


def refusal(est: Estimate, budget: float) -> str | None:
    """One line when `est` cannot fit `budget` bytes, naming the settings to lower; None when it fits."""
    if est.total <= budget:
        return None
    head = f"{est.stage} needs ~{gb(est.total)} GB of a {gb(budget)} GB budget"
    weights = sum(v for k, v in est.items.items() if "weights" in k)
    if weights > budget:
        return f"{head}: the weights alone are {gb(weights)} GB; use a smaller or more quantized model"
    lower = " or ".join(f"{name} ({value})" for name, value in est.knobs)
    extra = "".join(f"; {n}" for n in est.notes)
    return f"{head}: lower {lower}{extra}" if lower else f"{head}{extra}"


def gb(nbytes: float) -> str:
    """Decimal GB with one decimal, or two significant digits below 1 GB (a tiny model's 0.0042)."""
    v = nbytes / GB
    return f"{v:.1f}" if v >= 0.95 else f"{v:.2g}"


def biggest(est: Estimate, n: int = 3) -> str:
    """The n largest items, e.g. 'logits 10.5, weights 4.5, activations 1.3' (GB)."""
    top = sorted(est.items.items(), key=lambda kv: -kv[1])[:n]
    return ", ".join(f"{k} {gb(v)}" for k, v in top)
