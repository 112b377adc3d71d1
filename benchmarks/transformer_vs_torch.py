"""specs/transformer.nest (compiled backend) against a hand-written torch.nn.TransformerEncoder LM of
the same size: one training step (forward + backward), both models timed in one process.

    python benchmarks/transformer_vs_torch.py [--dims 64 128] [--batch 8] [--time 256] [--repeats 9]
                                              [--threads 1] [--mm-size 1024]

The peer: an embedding whose transpose is the LM head (nestc's default, `tie_embeddings`), the
spec's number of pre-norm `TransformerEncoderLayer`s (its heads, feed-forward width 4 x dim,
GELU, no dropout, no biases), a causal mask passed with `is_causal=True` (so PyTorch's
scaled_dot_product_attention runs its causal kernel), and a final LayerNorm without bias. Its
parameter count equals the spec's exactly (both are printed). It does a little less work than
the spec: no rotary position embedding (the peer has no positions at all) and LayerNorm where
the spec has RMSNorm, so a ratio of 1.0x means nestc does that much more in the same time.

The repeats are interleaved: each round times one step of each model and one `torch.mm` of
--mm-size (the order of the two models alternating between rounds), so load from other jobs on
a shared machine falls on both models alike. Reported: the median over rounds, the spread (the
fastest and slowest round), the ratio of the medians, and the achieved GFLOP/s as a fraction of
the median `torch.mm` rate of the same run. Useful FLOPs per token, forward, for both models:
2 per weight-matrix entry (projections, feed-forward and the tied head) plus, per layer,
4 x dim x (T + 1) / 2 for causal attention's scores and mix; times 3 for forward + backward.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers import SPECS, build_compiled, describe_machine, print_table, sized_spec  # noqa: E402

SPEC = "transformer"


def torch_lm(vocab: int, dim: int, heads: int, layers: int, context: int):
    """The peer: a pre-norm TransformerEncoder LM with a tied head, as PyTorch users write it."""
    import torch
    from torch import nn

    class TransformerLM(nn.Module):
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

    return TransformerLM()


def forward_flops_per_token(vocab: int, dim: int, layers: int, context: int) -> float:
    """Matmul FLOPs of one token's forward pass (the module docstring says what is counted)."""
    per_layer = 2 * (4 * dim * dim + 2 * dim * 4 * dim) + 4 * dim * (context + 1) / 2
    return layers * per_layer + 2 * vocab * dim


def compare(dim: int, args) -> list[list[str]]:
    import torch
    import torch.nn.functional as F

    text = sized_spec(SPEC, dim, args.heads, args.time)
    torch.manual_seed(0)
    nestc_model, program = build_compiled(text, SPECS / f"{SPEC}.nest")
    vocab, layers = nestc_model.vocab, len(nestc_model.layers)
    peer = torch_lm(vocab, dim, args.heads, layers, args.time)
    tokens = torch.randint(0, vocab, (args.batch, args.time))

    def train_step(model) -> None:
        model.zero_grad(set_to_none=True)
        out = model(tokens)
        logits = out[0] if isinstance(out, tuple) else out
        F.cross_entropy(logits[:, :-1].reshape(-1, vocab), tokens[:, 1:].reshape(-1)).backward()

    a, b = (torch.randn(args.mm_size, args.mm_size) for _ in range(2))
    models = {"nestc (compiled)": nestc_model, "torch TransformerEncoder": peer}
    seconds = {name: [] for name in [*models, "torch.mm"]}
    for model in models.values():
        train_step(model)  # warm-up: allocator, first-call costs
    torch.mm(a, b)
    for round_index in range(args.repeats):
        order = list(models) if round_index % 2 == 0 else list(reversed(models))
        for name in order:
            start = time.perf_counter()
            train_step(models[name])
            seconds[name].append(time.perf_counter() - start)
        start = time.perf_counter()
        torch.mm(a, b)
        seconds["torch.mm"].append(time.perf_counter() - start)

    mm_gflops = 2 * args.mm_size**3 / statistics.median(seconds["torch.mm"]) / 1e9
    step_flops = 3 * forward_flops_per_token(vocab, dim, layers, args.time) * args.batch * args.time
    peer_median = statistics.median(seconds["torch TransformerEncoder"])
    rows = []
    for name, model in models.items():
        median = statistics.median(seconds[name])
        gflops = step_flops / median / 1e9
        rows.append([f"dim {dim}", name, f"{sum(p.numel() for p in model.parameters()):,}",
                     f"{1e3 * median:.1f}", f"{1e3 * min(seconds[name]):.1f}-{1e3 * max(seconds[name]):.1f}",
                     f"{args.batch * args.time / median:,.0f}", f"{gflops:.2f}", f"{100 * gflops / mm_gflops:.1f}%",
                     f"{peer_median / median:.2f}x"])
    rows.append([f"dim {dim}", f"torch.mm {args.mm_size}x{args.mm_size}", "",
                 f"{1e3 * statistics.median(seconds['torch.mm']):.1f}",
                 f"{1e3 * min(seconds['torch.mm']):.1f}-{1e3 * max(seconds['torch.mm']):.1f}", "",
                 f"{mm_gflops:.2f}", "100%", ""])
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
    args = parser.parse_args()
    if args.repeats < 1:
        raise SystemExit(f"--repeats {args.repeats}: at least one timed round is needed (7 or more for a median "
                         "that load spikes do not move)")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# specs/{SPEC}.nest vs torch.nn.TransformerEncoder; command: python {shlex.join(sys.argv)}")
    print(f"# machine: {describe_machine('cpu', args.threads)}")
    print(f"# training step (forward + backward), B={args.batch} T={args.time} heads={args.heads}; "
          f"{args.repeats} interleaved rounds, median and (fastest-slowest)\n", flush=True)
    rows = []
    for dim in args.dims:
        rows += compare(dim, args)
    print_table(["size", "model", "parameters", "ms/step", "spread ms", "tok/s", "GFLOP/s", "of mm peak",
                 "vs TransformerEncoder"], rows)


if __name__ == "__main__":
    main()
