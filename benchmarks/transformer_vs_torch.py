"""specs/transformer.nest (compiled backend) against PyTorch models of the same size: a
torch.nn.TransformerEncoder LM and a hand-written LM that does the spec's work. One training step
(forward + backward), all models timed in one process.

    python benchmarks/transformer_vs_torch.py [--dims 64 128] [--batch 8] [--time 256] [--repeats 9]
                                              [--threads 1] [--mm-size 1024]

Both peers have an embedding whose transpose is the LM head (nestc's default, `tie_embeddings`),
the spec's number of pre-norm layers and heads, a feed-forward block of width 4 x dim with GELU,
no dropout, no biases, causal attention through PyTorch's scaled_dot_product_attention kernel,
and a final norm. Their parameter counts equal the spec's exactly (all are printed).

- `TransformerEncoder`: `nn.TransformerEncoderLayer(norm_first=True, bias=False)` layers, the
  causal mask passed with `is_causal=True`, a final LayerNorm without bias. It does less work
  than the spec: no rotary position embedding (it has no positions at all) and LayerNorm (one
  fused kernel each way on a CPU) where the spec has RMSNorm.
- `hand-written`: the spec's computation as PyTorch users write it (LLaMA style): `nn.RMSNorm`,
  one fused q/k/v `nn.Linear`, RoPE on the pairs (i, i + d/2) by `rotate_half` with the cosines
  and sines computed once per call, `F.scaled_dot_product_attention(is_causal=True)`.

A second nestc row runs the spec changed to do the encoder's work (keys and queries without
`rope`, `layernorm` blocks and final norm), which separates what nestc's schedule costs from what
the spec's extra work costs.

The repeats are interleaved: each round times one step of every model and one `torch.mm` of
--mm-size (the order reversed every other round), so load from other jobs on a shared machine
falls on all of them alike. Each is timed by the process's CPU time (`--clock cpu`, the default,
with one thread: time the scheduler gives to other jobs does not count, though their use of the
caches and memory bus still does) and by wall time. Reported: the median over rounds, the spread
(the fastest and slowest round), the wall-time median, the ratios of the medians, and the
achieved GFLOP/s as a fraction of the median `torch.mm` rate of the same run. Useful FLOPs per token, forward, the same for every model: 2 per
weight-matrix entry (projections, feed-forward and the tied head) plus, per layer,
4 x dim x (T + 1) / 2 for causal attention's scores and mix; times 3 for forward + backward.
"""

from __future__ import annotations

import argparse
import functools
import shlex
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers import SPECS, build_compiled, describe_machine, print_table, sized_spec, substitute  # noqa: E402

SPEC = "transformer"


def encoder_lm(vocab: int, dim: int, heads: int, layers: int, context: int):
    """A pre-norm TransformerEncoder LM with a tied head."""
    import torch
    from torch import nn

    class EncoderLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.embedding = nn.Embedding(vocab, dim)
            nn.init.normal_(self.embedding.weight, std=0.02)
            layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, activation="gelu",
                                               batch_first=True, norm_first=True, bias=False)
            self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
            self.norm = nn.LayerNorm(dim, bias=False)
            self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(context), persistent=False)

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            length = tokens.shape[1]
            x = self.encoder(self.embedding(tokens), mask=self.mask[:length, :length], is_causal=True)
            return self.norm(x) @ self.embedding.weight.t()

    return EncoderLM()


def handwritten_lm(vocab: int, dim: int, heads: int, layers: int, base: float = 10000.0):
    """The spec's model (RMSNorm, RoPE, causal softmax attention, GELU feed-forward) in plain PyTorch."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    head_dim = dim // heads

    def rotate_half(x: torch.Tensor) -> torch.Tensor:
        first, second = x.chunk(2, dim=-1)
        return torch.cat([-second, first], dim=-1)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attention_norm, self.feedforward_norm = nn.RMSNorm(dim), nn.RMSNorm(dim)
            self.qkv = nn.Linear(dim, 3 * dim, bias=False)
            self.out = nn.Linear(dim, dim, bias=False)
            self.up, self.down = nn.Linear(dim, 4 * dim, bias=False), nn.Linear(4 * dim, dim, bias=False)

        def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
            batch, length, _ = x.shape
            q, k, v = self.qkv(self.attention_norm(x)).view(batch, length, 3, heads, head_dim).unbind(2)
            q, k = (t * cos + rotate_half(t) * sin for t in (q, k))
            y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
            x = x + self.out(y.transpose(1, 2).reshape(batch, length, dim))
            return x + self.down(F.gelu(self.up(self.feedforward_norm(x))))

    class HandwrittenLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.embedding = nn.Embedding(vocab, dim)
            nn.init.normal_(self.embedding.weight, std=0.02)
            self.blocks = nn.ModuleList(Block() for _ in range(layers))
            self.norm = nn.RMSNorm(dim)

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            half = head_dim // 2
            frequencies = base ** (-torch.arange(half, dtype=torch.float32) / half)
            angle = torch.arange(tokens.shape[1], dtype=torch.float32)[:, None] * frequencies
            angle = torch.cat([angle, angle], dim=-1)[:, None, :]  # [T, 1, head_dim]: over heads
            cos, sin = angle.cos(), angle.sin()
            x = self.embedding(tokens)
            for block in self.blocks:
                x = block(x, cos, sin)
            return self.norm(x) @ self.embedding.weight.t()

    return HandwrittenLM()


def encoder_work_spec(text: str) -> str:
    """The spec's text with its library inlined, without RoPE, and with LayerNorm for RMSNorm."""
    library = (SPECS / "lib" / f"{SPEC}.nest").read_text(encoding="utf-8")
    library = substitute(r"^(\s*key = x \|> proj) \|> rope$", r"\g<1>", library, "the key's rope")
    library = substitute(r"^(\s*query = x \|> proj) \|> rope$", r"\g<1>", library, "the query's rope")
    text = substitute(r'^import "lib/transformer.nest".*$', library.replace("\\", "\\\\"), text, "the library import")
    text = substitute(r"^(\s*block = )residual\(rmsnorm \|> attn\) \|> residual\(rmsnorm \|> ffn\)$",
                      r"\g<1>residual(layernorm |> attn) |> residual(layernorm |> ffn)", text, "the block's norms")
    return substitute(r"^(\s*layers\s+\d+)$", "\\g<1>\n    norm layernorm", text, "the final norm")


def forward_flops_per_token(vocab: int, dim: int, layers: int, context: int) -> float:
    """Matmul FLOPs of one token's forward pass (the module docstring says what is counted)."""
    per_layer = 2 * (4 * dim * dim + 2 * dim * 4 * dim) + 4 * dim * (context + 1) / 2
    return layers * per_layer + 2 * vocab * dim


def compare(dim: int, args) -> list[list[str]]:
    import torch
    import torch.nn.functional as F

    text = sized_spec(SPEC, dim, args.heads, args.time)
    torch.manual_seed(0)
    nestc_model, _ = build_compiled(text, SPECS / f"{SPEC}.nest")
    torch.manual_seed(0)
    encoder_work, _ = build_compiled(encoder_work_spec(text), SPECS / f"{SPEC}.nest")
    vocab, layers = nestc_model.vocab, len(nestc_model.layers)
    tokens = torch.randint(0, vocab, (args.batch, args.time))

    def train_step(model) -> None:
        model.zero_grad(set_to_none=True)
        out = model(tokens)
        logits = out[0] if isinstance(out, tuple) else out
        F.cross_entropy(logits[:, :-1].reshape(-1, vocab), tokens[:, 1:].reshape(-1)).backward()

    a, b = (torch.randn(args.mm_size, args.mm_size) for _ in range(2))
    models = {"nestc (compiled)": nestc_model, "nestc, the encoder's work": encoder_work,
              "TransformerEncoder": encoder_lm(vocab, dim, args.heads, layers, args.time),
              "hand-written": handwritten_lm(vocab, dim, args.heads, layers)}
    steps = {name: functools.partial(train_step, model) for name, model in models.items()}
    steps["torch.mm"] = functools.partial(torch.mm, a, b)
    clocks = {"cpu": time.process_time, "wall": time.perf_counter}
    seconds = {clock: {name: [] for name in steps} for clock in clocks}
    for step in steps.values():
        step()  # warm-up: allocator, first-call costs
    for round_index in range(args.repeats):
        order = list(steps) if round_index % 2 == 0 else list(reversed(steps))
        for name in order:
            started = {clock: read() for clock, read in clocks.items()}
            steps[name]()
            for clock, read in clocks.items():
                seconds[clock][name].append(read() - started[clock])

    timed = seconds[args.clock]
    median = {name: statistics.median(values) for name, values in timed.items()}
    mm_gflops = 2 * args.mm_size**3 / median["torch.mm"] / 1e9
    step_flops = 3 * forward_flops_per_token(vocab, dim, layers, args.time) * args.batch * args.time
    rows = []
    for name in steps:
        spread = f"{1e3 * min(timed[name]):.1f}-{1e3 * max(timed[name]):.1f}"
        wall = f"{1e3 * statistics.median(seconds['wall'][name]):.1f}"
        gflops = (2 * args.mm_size**3 if name == "torch.mm" else step_flops) / median[name] / 1e9
        if name == "torch.mm":
            rows.append([f"dim {dim}", f"torch.mm {args.mm_size}x{args.mm_size}", "", f"{1e3 * median[name]:.1f}",
                         spread, wall, "", f"{gflops:.2f}", "100%", "", ""])
            continue
        rows.append([f"dim {dim}", name, f"{sum(p.numel() for p in models[name].parameters()):,}",
                     f"{1e3 * median[name]:.1f}", spread, wall, f"{args.batch * args.time / median[name]:,.0f}",
                     f"{gflops:.2f}", f"{100 * gflops / mm_gflops:.1f}%",
                     f"{median['TransformerEncoder'] / median[name]:.2f}x",
                     f"{median['hand-written'] / median[name]:.2f}x"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8, help="the spec's own batch is 8")
    parser.add_argument("--time", type=int, default=256, help="T; the spec's own context is 256")
    parser.add_argument("--repeats", type=int, default=9, help="interleaved timed rounds (after one warm-up)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads; 0 keeps torch's default")
    parser.add_argument("--mm-size", type=int, default=1024)
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                        help="what the medians, ratios and rates use: the process's CPU time (time taken away by "
                             "other jobs on a shared machine does not count; needs --threads 1) or wall time")
    args = parser.parse_args()
    if args.clock == "cpu" and args.threads != 1:
        raise SystemExit(f"--clock cpu with --threads {args.threads}: CPU time adds up every thread's time, so it "
                         "measures a step only with one thread; pass --threads 1, or --clock wall")
    if args.repeats < 1:
        raise SystemExit(f"--repeats {args.repeats}: at least one timed round is needed (7 or more for a median "
                         "that load spikes do not move)")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# specs/{SPEC}.nest vs torch.nn.TransformerEncoder and hand-written PyTorch; command: python {shlex.join(sys.argv)}")
    print(f"# machine: {describe_machine('cpu', args.threads)}")
    print(f"# training step (forward + backward), B={args.batch} T={args.time} heads={args.heads}; "
          f"{args.repeats} interleaved rounds; medians, spreads (fastest-slowest round), rates and ratios in "
          f"{'CPU time of this process' if args.clock == 'cpu' else 'wall time'}, and the wall-time median\n",
          flush=True)
    rows = []
    for dim in args.dims:
        rows += compare(dim, args)
    print_table(["size", "model", "parameters", "ms/step", "spread ms", "wall ms", "tok/s", "GFLOP/s", "of mm peak",
                 "vs TransformerEncoder", "vs hand-written"], rows)


if __name__ == "__main__":
    main()
