"""nestc's compiled backend next to its peers, its achieved GFLOP/s, and its memory growth in T.

    python benchmarks/peers.py [--device cpu|cuda] [--quick] [--only SECTION ...] [sizes, see --help]

Sections (all by default, in this order):
  base            the `hope` training step against the performance issue's base commit (a git worktree)
  titans          the `titans` memory layer vs titans-pytorch `NeuralMemory` (chunks 16 and 64)
  gated_deltanet  the gated delta rule kernel vs fla-core's naive chunk and recurrent versions
  hope            the `hope` spec vs nested-learning's HOPEModel, training step and online pass
  gflops          achieved GFLOP/s of every benchmarked spec next to the `torch.mm` peak
  memory          peak memory of forward+backward at growing T, and whether it grows linearly

Every measurement runs in a fresh subprocess, so the peak memory it reports belongs to that
configuration alone: on CPU the peak resident set (and the part above the set after building
the model and inputs), on CUDA `torch.cuda.max_memory_allocated`. Timed rows run one warm-up
iteration first (peers too) and report the median of --repeats timed iterations of
forward+backward. Peers that are not installed are reported and skipped:
`pip install -e '.[bench]'` installs them. On a machine shared with other jobs, `--threads 1`
keeps OpenMP's waits out of the numbers (docs/benchmarks.md, "Peers (issue 4)").
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import resource
import shlex
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SPECS = ROOT / "specs"
SECTIONS = ("base", "titans", "gated_deltanet", "hope", "gflops", "memory")
# The commit before the performance work (issue 13) began: `base` measures against it.
BASE_COMMIT = "c866724"
GFLOPS_SPECS = ("deltanet", "gated_deltanet", "titans", "ttt_mlp", "hope")
MEMORY_SPECS = ("deltanet", "gated_deltanet", "titans", "hope")
PEER_MODULES = {"titans-pytorch": "titans_pytorch", "fla-core": "fla", "nested-learning": "nested_learning"}
NOT_INSTALLED = "not installed (pip install -e '.[bench]')"
# A layer-level comparison wraps each memory layer in the same tiny language model, so the
# embedding and head cost next to nothing and the loss is the same next-token cross-entropy.
LAYER_VOCAB = 16


# --- spec texts ----------------------------------------------------------------------------------


def substitute(pattern: str, replacement: str, text: str, what: str) -> str:
    """One regex substitution that must happen: a spec that drifted fails loudly, not silently."""
    new, count = re.subn(pattern, replacement, text, count=1, flags=re.MULTILINE)
    if count != 1:
        raise SystemExit(f"cannot rewrite {what}: pattern {pattern!r} not found")
    return new


def sized_spec(name: str, dim: int, heads: int, context: int) -> str:
    text = (SPECS / f"{name}.nest").read_text(encoding="utf-8")
    text = substitute(r"^(\s*dim\s+)\d+", rf"\g<1>{dim}", text, f"{name} dim")
    text = substitute(r"^(\s*heads\s+)\d+", rf"\g<1>{heads}", text, f"{name} heads")
    return substitute(r"^(\s*context\s+)\d+", rf"\g<1>{context}", text, f"{name} context")


def titans_layer_spec(dim: int, heads: int, context: int, chunk: int, layernorm: bool) -> str:
    """One `lmm` layer from lib/titans.nest in a one-layer model of vocabulary LAYER_VOCAB, with
    its chunk (`every`) changed, and optionally a layer norm inside the memory like the peer's."""
    level = (SPECS / "lib" / "titans.nest").read_text(encoding="utf-8")
    level = substitute(r"^(\s*every\s+)16\b", rf"\g<1>{chunk}", level, "lmm every")
    if layernorm:
        level = substitute(r"mlp\(depth=2, expand=4\)", "mlp(depth=2, expand=4, norm=layernorm)", level,
                           "lmm state")
    return level + f"""
model {{
    vocab {LAYER_VOCAB}
    dim {dim}
    heads {heads}
    layers 1
    block = residual(rmsnorm |> lmm)
}}

train {{
    context {context}
}}
"""


# --- measurement inside a worker process ----------------------------------------------------------


def resident_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure_steps(step, device: str, repeats: int, warmup: int = 1) -> dict:
    """Median seconds of `step` over `repeats` runs after `warmup` untimed ones (the first steps
    of a process also pay for the allocator's growth), and the peak memory."""
    import torch

    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    baseline = torch.cuda.memory_allocated() / 2**20 if cuda else resident_mib()
    for _ in range(int(warmup)):
        step()
        sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        sync()
        seconds.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"seconds": statistics.median(seconds), "peak_mib": peak, "above_setup_mib": peak - baseline}


def build_compiled(text: str, path: Path, torch_compile: bool = False):
    import warnings

    from nestc.backends import compiled
    from nestc.lang.sema import analyze_source
    from nestc.lang.source import SourceFile

    result = analyze_source(SourceFile(str(path), text))
    if not result.ok:
        errors = "; ".join(d.message for d in result.diagnostics if d.is_error)
        raise SystemExit(f"{path}: does not check: {errors}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the plan (`nestc compile --emit plan`) says what runs token by token
        return compiled.build(result.program, torch_compile=torch_compile), result.program


def next_token_loss(logits, tokens):
    import torch.nn.functional as F

    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


def job_nestc_model(job: dict) -> dict:
    """Forward+backward of a whole compiled model on random tokens (and, with `online`, the
    no-grad forward, in which every memory still learns in context)."""
    import torch

    torch.manual_seed(0)
    model, program = build_compiled(job["text"], SPECS / f"{job['name']}.nest", job.get("torch_compile", False))
    model.to(job["device"])
    tokens = torch.randint(0, model.vocab, (job["batch"], job["time"]), device=job["device"])

    def train_step():
        model.zero_grad(set_to_none=True)
        logits, _ = model(tokens)
        next_token_loss(logits, tokens).backward()

    result = measure_steps(train_step, job["device"], job["repeats"], job["warmup"])
    if job.get("count_ops"):
        from op_count import OpCounter  # benchmarks/, this script's folder

        counter = OpCounter()
        with counter:
            train_step()
        result["aten_ops"] = sum(counter.ops.values())
    if job.get("flops"):
        from nestc.search.sweep import measure

        result["parameters"], result["forward_flops_per_token"] = measure(program)
    if job.get("online"):
        def online_step():
            with torch.no_grad():
                model(tokens)

        result["online"] = measure_steps(online_step, job["device"], job["repeats"])
    return result


def job_titans_pytorch(job: dict) -> dict:
    """titans-pytorch NeuralMemory as the one residual layer of the same tiny language model."""
    import torch
    from titans_pytorch import NeuralMemory
    from torch import nn

    class MemoryLayerModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.embedding = nn.Embedding(LAYER_VOCAB, job["dim"])
            # depth 2, expansion 4 per head (the peer's default memory MLP, wrapped in its
            # ResidualNorm: x + LayerNorm(mlp(x))); pre-RMSNorm on the input is its default too
            # batch_size None: every token's gradient at the weights the call starts from;
            # batch_size = chunk: at the weights of the previous chunk's end, as in nestc
            self.memory = NeuralMemory(dim=job["dim"], heads=job["heads"], dim_head=job["dim"] // job["heads"],
                                       chunk_size=job["chunk"], batch_size=job.get("store_batch"),
                                       default_model_kwargs=dict(depth=2, expansion_factor=4.0))
            self.norm = nn.RMSNorm(job["dim"])
            self.head = nn.Linear(job["dim"], LAYER_VOCAB, bias=False)

        def forward(self, tokens):
            x = self.embedding(tokens)
            retrieved, _ = self.memory(x)
            return self.head(self.norm(x + retrieved))

    torch.manual_seed(0)
    model = MemoryLayerModel().to(job["device"])
    tokens = torch.randint(0, LAYER_VOCAB, (job["batch"], job["time"]), device=job["device"])

    def train_step():
        model.zero_grad(set_to_none=True)
        next_token_loss(model(tokens), tokens).backward()

    return measure_steps(train_step, job["device"], job["repeats"])


def load_fla_naive(name: str):
    """fla-core's `fla/ops/<name>/naive.py` by path: importing `fla` itself needs triton."""
    spec = importlib.util.find_spec("fla")
    path = Path(next(iter(spec.submodule_search_locations))) / "ops" / name / "naive.py"
    module_spec = importlib.util.spec_from_file_location(f"_fla_naive_{name}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def job_gated_delta_kernel(job: dict) -> dict:
    """The gated delta rule alone on random inputs [B, T, H, D]: nestc's compiled kernel for the
    `mixer` level of specs/gated_deltanet.nest, or one of fla-core's naive functions. The same
    input transforms (l2-normalised keys, sigmoid beta, log-sigmoid g) are timed for every one,
    and fla runs with scale 1, so all three compute the same function."""
    import torch
    import torch.nn.functional as F

    device, batch, length, heads, head_dim = job["device"], job["batch"], job["time"], job["heads"], job["head_dim"]
    torch.manual_seed(0)
    raw = [torch.randn(batch, length, heads, head_dim, device=device, requires_grad=True) for _ in range(3)]
    raw_beta, raw_g = (torch.randn(batch, length, heads, device=device, requires_grad=True) for _ in range(2))

    def inputs():
        q, k, v = raw
        return q, F.normalize(k, dim=-1), v, torch.sigmoid(raw_beta), F.logsigmoid(raw_g)

    if job["impl"] == "nestc":
        import nestc
        from nestc.backends.compiled import run_kernel
        from nestc.backends.kernel import MemoryKernel

        level = nestc.check(str(SPECS / "gated_deltanet.nest")).level("mixer")
        kernel = MemoryKernel(level, heads=heads, key_dim=head_dim, value_dim=head_dim).to(device)

        def forward():
            q, k, v, beta, g = inputs()
            return run_kernel(kernel, k, v, q, {"lr": beta, "retain": g.exp()})[0]
    elif job["impl"] == "fla_triton":
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule  # Triton kernels: CUDA only

        def forward():
            q, k, v, beta, g = inputs()
            return chunk_gated_delta_rule(q, k, v, g, beta, scale=1.0)[0]
    else:
        naive = load_fla_naive("gated_delta_rule")

        def forward():
            q, k, v, beta, g = inputs()
            if job["impl"] == "fla_chunk":
                return naive.naive_chunk_gated_delta_rule(q, k, v, g, beta, chunk_size=64, scale=1.0)[0]
            return naive.naive_recurrent_gated_delta_rule(q, k, v, beta, g, scale=1.0)[0]

    def train_step():
        for tensor in (*raw, raw_beta, raw_g):
            tensor.grad = None
        forward().square().mean().backward()

    return measure_steps(train_step, device, job["repeats"])


def job_nested_learning(job: dict) -> dict:
    """nested-learning's HOPEModel (paper variant `hope_selfmod`: self-modifying Titans + CMS)
    sized like specs/hope.nest: a training step, and its online pass (teach signal from the
    logits, then the explicit in-place memory update forward under no_grad, as its trainer does)."""
    import torch
    from nested_learning.levels import LevelSpec
    from nested_learning.model import HOPEModel, ModelConfig
    from nested_learning.training import compute_teach_signal

    device = job["device"]
    cms = [LevelSpec("cms_fast", 16), LevelSpec("cms_mid", 32), LevelSpec("cms_slow", 64)]
    config = ModelConfig(vocab_size=256, dim=job["dim"], num_layers=job["layers"], heads=job["heads"],
                         titan_level=LevelSpec("titan", 16), cms_levels=cms, block_variant="hope_selfmod",
                         self_mod_chunk_size=64, self_mod_chunk_size_memory=16, self_mod_hidden=4)
    torch.manual_seed(0)
    model = HOPEModel(config).to(device)
    tokens = torch.randint(0, 256, (job["batch"], job["time"]), device=device)

    def train_step():
        model.zero_grad(set_to_none=True)
        next_token_loss(model(tokens), tokens).backward()

    result = measure_steps(train_step, device, job["repeats"])
    result["parameters"] = sum(p.numel() for p in model.parameters())

    def online_step():
        with torch.no_grad():
            logits = model(tokens)
            model(tokens, teach_signal=compute_teach_signal(model, logits, tokens))

    result["online"] = measure_steps(online_step, device, job["repeats"])
    return result


def job_matmul(job: dict) -> dict:
    import torch

    size, device = job["size"], job["device"]
    a, b = (torch.randn(size, size, device=device) for _ in range(2))
    result = measure_steps(lambda: torch.mm(a, b), device, job["repeats"])
    result["gflops"] = 2 * size**3 / result["seconds"] / 1e9
    return result


JOBS = {"nestc_model": job_nestc_model, "titans_pytorch": job_titans_pytorch,
        "gated_delta_kernel": job_gated_delta_kernel, "nested_learning": job_nested_learning,
        "matmul": job_matmul}


# --- the driver -----------------------------------------------------------------------------------


def run_job(job: dict, args, code: Path | None = None) -> dict | str:
    """One measurement in a fresh interpreter: its result, or why there is none. With `code`, the
    interpreter imports nestc from that checkout instead of this one."""
    command = [sys.executable, __file__, "--job", json.dumps({**job, "threads": args.threads, "flush_denormal": args.flush_denormal})]
    env = None if code is None else {**os.environ, "PYTHONPATH": str(code)}
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=args.job_timeout, cwd=ROOT, env=env)
    except subprocess.TimeoutExpired:
        return f"timed out after {args.job_timeout} s"
    if out.returncode != 0:
        lines = (out.stderr.strip() or out.stdout.strip() or f"exit status {out.returncode}").splitlines()
        return f"failed: {lines[-1]}"
    return json.loads(out.stdout.strip().splitlines()[-1])


def installed(package: str) -> bool:
    return importlib.util.find_spec(PEER_MODULES[package]) is not None


def rate(tokens: int, result: dict) -> float:
    return tokens / result["seconds"]


def print_table(header: list[str], rows: list[list[str]]) -> None:
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(flush=True)


def speed_row(label: str, tokens: int, result: dict | str, *baselines: float | None) -> list[str]:
    if isinstance(result, str):
        return [label, result, "", ""] + [""] * max(len(baselines), 1)
    speed = rate(tokens, result)
    ratios = [f"{speed / baseline:.2f}x" if baseline else "" for baseline in baselines] or [""]
    return [label, f"{speed:,.0f}", f"{result['peak_mib']:,.0f}", f"{result['above_setup_mib']:,.0f}", *ratios]


SPEED_HEADER = ["implementation", "fwd+bwd tok/s", "peak MiB", "MiB above setup", "vs peer"]


def base_checkout(commit: str, folder: Path) -> Path:
    """A git worktree of `commit` whose `nestc` package imports from its folder as installed
    (nestc.backends and nestc.grammars live in backends/ and grammars/, pyproject's package-dir)."""
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(folder), commit], check=True,
                   capture_output=True)
    for package in ("backends", "grammars"):
        (folder / "nestc" / package).symlink_to(Path("..") / package)
    return folder


def section_base(args) -> None:
    length, heads, rounds = args.base_time, args.heads, args.base_rounds
    print(f"## base: hope's training step (fwd+bwd, T={length}, {heads} heads, layers 2), this tree vs {args.base} "
          "(the commit before the performance work), side by side\n")
    print(f"Both run this tree's specs/hope.nest (the same structure and chunk sizes). Each figure: {rounds} rounds, "
          f"each a fresh process per tree (this tree and the base alternating), each the median of {args.repeats} "
          "steps after 2 untimed ones; the table gives the median over the rounds and their range. ATen ops: one "
          "forward+backward under a dispatch counter (benchmarks/op_count.py counts the optimizer step too). "
          "Of mm peak: useful FLOPs (`nestc.search.sweep.measure`, x3 for fwd+bwd) per second against "
          "`torch.mm` measured in this run.\n")
    import tempfile

    peak = run_job({"kind": "matmul", "size": args.mm_size, "device": args.device, "repeats": 5}, args)
    peak_gflops = peak["gflops"] if isinstance(peak, dict) else None
    print(f"torch.mm {args.mm_size}x{args.mm_size} fp32: " + (f"{peak_gflops:.1f} GFLOP/s\n" if peak_gflops else f"{peak}\n"))
    rows = []
    with tempfile.TemporaryDirectory(prefix="nestc-base-") as scratch:
        base = base_checkout(args.base, Path(scratch) / "base")
        try:
            for dim in args.base_dims:
                for batch in args.base_batches:
                    job = {"kind": "nestc_model", "name": "hope", "text": sized_spec("hope", dim, heads, length),
                           "device": args.device, "batch": batch, "time": length, "repeats": args.repeats,
                           "warmup": 2, "count_ops": True}
                    # `processes` (how many processes `nestc run` starts) came after the base
                    older = {**job, "text": re.sub(r"^\s*processes \d+.*\n", "", job["text"], flags=re.MULTILINE)}
                    ours, theirs, failure = [], [], ""
                    for round_ in range(rounds):
                        mine = run_job({**job, "flops": round_ == 0}, args)
                        old = run_job(older, args, code=base)
                        failure = next((f"{who}: {r}" for who, r in (("this tree", mine), ("base", old))
                                        if isinstance(r, str)), "")
                        if failure:
                            break
                        ours.append(mine)
                        theirs.append(old)
                    rows.append(base_row(dim, batch, length, ours, theirs, failure, peak_gflops))
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base)], capture_output=True)
    print_table(["dim", "B", "base s/step", "this tree s/step", "speed-up", "base ATen ops", "ATen ops",
                 "this tree of mm peak"], rows)


def base_row(dim: int, batch: int, length: int, ours: list, theirs: list, failure: str, peak_gflops) -> list[str]:
    if failure:
        return [str(dim), str(batch), failure, "", "", "", "", ""]

    def spread(values: list[float], digits: int = 2) -> str:
        return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"

    mine = [r["seconds"] for r in ours]
    old = [r["seconds"] for r in theirs]
    ratios = [b / a for a, b in zip(mine, old)]
    share = ""
    if peak_gflops:
        gflops = 3 * ours[0]["forward_flops_per_token"] * batch * length / statistics.median(mine) / 1e9
        share = f"{100 * gflops / peak_gflops:.1f}%"
    return [str(dim), str(batch), spread(old), spread(mine), spread(ratios) + "x", f"{theirs[0]['aten_ops']:,}",
            f"{ours[0]['aten_ops']:,}", share]


def section_titans(args) -> None:
    dim, heads, batch, length = args.dim, args.heads, args.batch, args.time
    print(f"## titans: memory layer vs titans-pytorch NeuralMemory (B={batch} T={length} dim={dim} "
          f"heads={heads}, head dim {dim // heads})\n")
    print(f"Both memories sit as the one residual layer of the same language model (vocabulary "
          f"{LAYER_VOCAB}, so embedding and head cost little), trained on next-token cross-entropy.")
    print("Matched: dim, heads, head dim, a per-head 2-layer MLP memory with hidden width 4x and GELU, the chunk "
          "(nestc `every` = the peer's chunk_size), data-dependent lr, momentum and forgetting, l2 loss.")
    print("The peer's batch_size (None by default) sets where its gradients are taken: None takes every token's "
          "at the weights the call starts from, so the whole sequence is one parallel step; batch_size = chunk "
          "takes them at the previous chunk's end, the Titans rule nestc computes (`every` C).")
    print("Not matched: nestc (lib/titans.nest) has conv(4)+SiLU+l2norm on q/k/v and per-token gates, "
          "x + W1 gelu(W2 x) memory; the peer has pre-RMSNorm, SiLU, gates shared per chunk, a retrieve "
          "gate and x + LayerNorm(mlp(x)). The `+layernorm` rows give nestc's memory that norm too.\n")
    tokens = batch * length
    rows = []
    for chunk in args.titans_chunks:
        common = {"device": args.device, "batch": batch, "time": length, "repeats": args.repeats}
        baselines = []
        for store_batch in (None, chunk):
            if installed("titans-pytorch"):
                peer = run_job({"kind": "titans_pytorch", "dim": dim, "heads": heads, "chunk": chunk,
                                "store_batch": store_batch, **common}, args)
            else:
                peer = NOT_INSTALLED
            rows.append(speed_row(f"titans-pytorch NeuralMemory, chunk {chunk}, batch_size {store_batch}", tokens,
                                  peer, None, None))
            baselines.append(rate(tokens, peer) if isinstance(peer, dict) else None)
        # The warm-up call pays torch.compile's tracing and code generation; the timed calls reuse it.
        for layernorm, torch_compile in ((False, False), (True, False), (False, True)):
            text = titans_layer_spec(dim, heads, length, chunk, layernorm)
            result = run_job({"kind": "nestc_model", "name": "titans", "text": text, "warmup": True,
                              "torch_compile": torch_compile, **common}, args)
            label = (f"nestc titans lmm, every {chunk}" + (" +layernorm" if layernorm else "")
                     + (", torch.compile" if torch_compile else ""))
            rows.append(speed_row(label, tokens, result, *baselines))
    print_table(SPEED_HEADER[:-1] + ["vs peer, batch_size None", "vs peer, batch_size = chunk"], rows)


def section_gated_deltanet(args) -> None:
    batch, length, heads, head_dim = args.batch, args.time, args.heads, args.dim // args.heads
    print(f"## gated_deltanet: the gated delta rule kernel (B={batch} T={length} H={heads} D={head_dim})\n")
    print("Kernel level: random q, k, v [B, T, H, D], beta and g [B, T, H], loss mean(o^2). nestc runs "
          "`nestc.backends.compiled.run_kernel` on the `mixer` level of specs/gated_deltanet.nest (its "
          "`delta` form: a UT triangular solve per 64-token segment); fla-core runs its pure-PyTorch "
          "naive functions (chunk size 64) with scale 1, so all three compute the same outputs.\n")
    tokens = batch * length
    common = {"kind": "gated_delta_kernel", "device": args.device, "batch": batch, "time": length, "heads": heads,
              "head_dim": head_dim, "repeats": args.repeats}
    results = {}
    for impl in ("fla_chunk", "fla_recurrent", "nestc"):
        if impl.startswith("fla") and not installed("fla-core"):
            results[impl] = NOT_INSTALLED
        else:
            results[impl] = run_job({**common, "impl": impl}, args)
    chunk = results["fla_chunk"]
    baseline = rate(tokens, chunk) if isinstance(chunk, dict) else None
    print_table(SPEED_HEADER, [
        speed_row("fla-core naive_chunk_gated_delta_rule", tokens, chunk),
        speed_row("fla-core naive_recurrent_gated_delta_rule", tokens, results["fla_recurrent"], baseline),
        speed_row("nestc compiled run_kernel (delta form)", tokens, results["nestc"], baseline),
    ])
    if args.device != "cuda":
        return
    print("fla-core's Triton `chunk_gated_delta_rule` (the kernel fla users train with) against nestc's delta "
          "form at long T, same inputs and loss:\n")
    rows = []
    for long in args.triton_times:
        long_common = {**common, "time": long}
        triton = run_job({**long_common, "impl": "fla_triton"}, args) if installed("fla-core") else NOT_INSTALLED
        ours = run_job({**long_common, "impl": "nestc"}, args)
        triton_rate = rate(batch * long, triton) if isinstance(triton, dict) else None
        rows.append(speed_row(f"T={long}: fla-core chunk_gated_delta_rule (Triton)", batch * long, triton))
        rows.append(speed_row(f"T={long}: nestc compiled run_kernel (delta form)", batch * long, ours, triton_rate))
    print_table(SPEED_HEADER, rows)


def section_hope(args) -> None:
    dim, heads, batch, length = args.dim, args.heads, args.batch, args.hope_time
    print(f"## hope: whole model vs nested-learning HOPEModel (B={batch} T={length} dim={dim} layers 2, vocab 256)\n")
    print("Matched: dim, 2 layers, vocabulary, self-modifying Titans followed by a CMS chain of three MLPs "
          "updated every 16 / 32 / 64 tokens, self-modifying memories with hidden width 4x, chunks 64 for the "
          "generating memories and 16 for the read memory. Not matched: nestc's memories are per head "
          f"({heads} heads of {dim // heads}); the peer's are one full-width memory (its selfmod block has no "
          "heads). Not the same computation in training: the peer's differentiable forward reads its memories "
          "at their current weights and learns nothing in context (its updates come in the online pass), "
          "while nestc's forward learns in context and the backward differentiates through those updates. "
          "The online pass is the comparable one: for the peer, its teach signal from the logits and the "
          "explicit in-place update forward under no_grad (as its trainer does after backward); for nestc, "
          "the forward under no_grad, in which every memory and CMS level still learns in context.\n")
    tokens = batch * length
    common = {"device": args.device, "batch": batch, "time": length, "repeats": args.repeats}
    if installed("nested-learning"):
        peer = run_job({"kind": "nested_learning", "dim": dim, "heads": heads, "layers": 2, **common},
                       args)
    else:
        peer = NOT_INSTALLED
    nestc = run_job({"kind": "nestc_model", "name": "hope", "text": sized_spec("hope", dim, heads, length),
                     "warmup": True, "online": True, "flops": True, **common}, args)
    header = ["implementation", "parameters", "fwd+bwd tok/s", "peak MiB", "online pass tok/s", "online peak MiB"]
    rows = []
    for label, result in (("nested-learning HOPEModel (hope_selfmod)", peer), ("nestc hope (compiled)", nestc)):
        if isinstance(result, str):
            rows.append([label, result, "", "", "", ""])
            continue
        rows.append([label, f"{result['parameters']:,}", f"{rate(tokens, result):,.0f}", f"{result['peak_mib']:,.0f}",
                     f"{rate(tokens, result['online']):,.0f}", f"{result['online']['peak_mib']:,.0f}"])
    print_table(header, rows)
    if isinstance(peer, dict) and isinstance(nestc, dict):
        print(f"nestc / peer: training {rate(tokens, nestc) / rate(tokens, peer):.2f}x, online pass "
              f"{rate(tokens, nestc['online']) / rate(tokens, peer['online']):.2f}x\n")


def section_gflops(args) -> None:
    batch, length = args.batch, args.gflops_time
    print(f"## gflops: achieved GFLOP/s of the compiled backend (B={batch} T={length} dim={args.dim} "
          f"heads={args.heads})\n")
    print("Useful FLOPs: `nestc.search.sweep.measure`'s forward estimate per token (2 per parameter in a matmul, "
          "about 6 per memory state entry, attention over half the context), times 3 for forward+backward; "
          "work the compiled form adds on top (decay matrices, triangular solves, per-token errors) is "
          "not counted.\n")
    peak = run_job({"kind": "matmul", "size": args.mm_size, "device": args.device, "repeats": 5}, args)
    peak_gflops = peak["gflops"] if isinstance(peak, dict) else None
    rows = [[f"torch.mm {args.mm_size}x{args.mm_size} fp32", "", "", "",
             f"{peak_gflops:.1f}" if peak_gflops else peak, "100%" if peak_gflops else ""]]
    for name in GFLOPS_SPECS:
        text = sized_spec(name, args.dim, args.heads, length)
        result = run_job({"kind": "nestc_model", "name": name, "text": text, "device": args.device, "batch": batch,
                          "time": length, "repeats": args.repeats, "warmup": True, "flops": True}, args)
        if isinstance(result, str):
            rows.append([name, result, "", "", "", ""])
            continue
        speed = rate(batch * length, result)
        gflops = 3 * result["forward_flops_per_token"] * speed / 1e9
        share = f"{100 * gflops / peak_gflops:.2f}%" if peak_gflops else ""
        rows.append([name, f"{result['parameters']:,}", f"{3 * result['forward_flops_per_token'] / 1e6:.2f}",
                     f"{speed:,.0f}", f"{gflops:.2f}", share])
    print_table(["spec", "parameters", "fwd+bwd MFLOP/token", "tok/s", "GFLOP/s", "of mm peak"], rows)


def linearity(lengths: list[int], peaks: list[float]) -> tuple[list[str], str]:
    """Per step: the increment in MiB per 1k tokens, and its ratio to the previous step's. When T
    doubles, a linear peak gives ratios near 1 (each difference twice the previous one),
    a quadratic one near 2."""
    slopes = [(peaks[i] - peaks[i - 1]) / (lengths[i] - lengths[i - 1]) * 1024 for i in range(1, len(peaks))]
    cells = [f"{slopes[0]:.1f}"] + [f"{slopes[i]:.1f} ({slopes[i] / slopes[i - 1]:.2f})" if slopes[i - 1] > 0
                                   else f"{slopes[i]:.1f}" for i in range(1, len(slopes))]
    ratios = [slopes[i] / slopes[i - 1] for i in range(1, len(slopes)) if slopes[i - 1] > 0]
    if len(ratios) == 0:
        return cells, "too few points"
    # the first increments sit close to allocator noise, so judge on the largest T
    tail = ratios[-2:]
    verdict = "linear" if all(r < 1.4 for r in tail) else "superlinear"
    return cells, f"{verdict} (last slope ratios {', '.join(f'{r:.2f}' for r in tail)})"


def memory_lengths(name: str, args) -> list[int]:
    """The T of each spec's rows; hope stops at --hope-memory-max and, to keep three points for
    the verdict, goes down by halves below the smallest T instead."""
    if name != "hope":
        return list(args.memory_times)
    lengths = [t for t in args.memory_times if t <= args.hope_memory_max]
    while len(lengths) < 3 and min(lengths or args.memory_times) >= 512:
        lengths.insert(0, min(lengths or args.memory_times) // 2)
    return lengths


def section_memory(args) -> None:
    batch = args.memory_batch
    print(f"## memory: peak of one forward+backward vs T (B={batch}, dim={args.dim}, heads={args.heads})\n")
    print(f"One fresh process per row, no warm-up (only memory is read). hope only up to T={args.hope_memory_max} "
          "(its forward time grows faster than T), with shorter T for three points. Slope: MiB per 1k extra "
          "tokens between successive T; in brackets its ratio to the previous slope (about 1 when memory grows "
          "linearly in T, about 2 when quadratically).\n")
    unit = "peak MiB (CUDA allocated)" if args.device == "cuda" else "peak RSS MiB"
    columns = sorted({t for name in MEMORY_SPECS for t in memory_lengths(name, args)})
    rows, slope_rows = [], []
    for name in MEMORY_SPECS:
        lengths, peaks, cells = memory_lengths(name, args), [], {}
        for length in lengths:
            result = run_job({"kind": "nestc_model", "name": name, "device": args.device, "batch": batch,
                              "time": length, "repeats": 1, "warmup": False,
                              "text": sized_spec(name, args.dim, args.heads, length)}, args)
            if isinstance(result, str):
                cells[length] = result
                break
            peaks.append(result["peak_mib"])
            cells[length] = f"{result['peak_mib']:,.0f}"
        slopes, verdict = linearity(lengths[:len(peaks)], peaks) if len(peaks) >= 3 else ([], "too few points")
        slope_cells = dict(zip(lengths[1:], slopes))
        rows.append([name] + [cells.get(t, "") for t in columns] + [verdict])
        slope_rows.append([name] + [slope_cells.get(t, "") for t in columns])
    print(f"{unit}:\n")
    print_table(["spec"] + [f"T={t}" for t in columns] + ["verdict"], rows)
    print("slope, MiB per 1k tokens (ratio to the previous slope):\n")
    print_table(["spec"] + [f"T={t}" for t in columns], slope_rows)


def describe_machine(device: str, threads: int) -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    accelerator = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"{cpu}, {os.cpu_count()} cores ({threads or torch.get_num_threads()} torch threads), "
            f"torch {torch.__version__}, python {platform.python_version()}, device {device} ({accelerator}); "
            f"load average {load}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--quick", action="store_true", help="small sizes everywhere: a smoke run of a minute or two")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS), metavar="SECTION",
                        help=f"sections to run, among {', '.join(SECTIONS)}")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--time", type=int, default=1024, help="T of the titans and gated_deltanet comparisons")
    parser.add_argument("--triton-times", type=int, nargs="+", default=[2048, 8192],
                        help="T of the comparison with fla's Triton kernel (--device cuda only)")
    parser.add_argument("--titans-chunks", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--base", default=BASE_COMMIT, help="the commit the `base` section measures against")
    parser.add_argument("--base-dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--base-batches", type=int, nargs="+", default=[2, 16])
    parser.add_argument("--base-time", type=int, default=256)
    parser.add_argument("--base-rounds", type=int, default=3, help="fresh-process pairs per `base` row")
    parser.add_argument("--hope-time", type=int, default=512, help="T of the hope comparison")
    parser.add_argument("--gflops-time", type=int, default=512)
    parser.add_argument("--mm-size", type=int, default=2048)
    parser.add_argument("--memory-times", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--memory-batch", type=int, default=1)
    parser.add_argument("--hope-memory-max", type=int, default=2048,
                        help="hope's forward time grows faster than T (about 5 minutes at T=4096)")
    parser.add_argument("--repeats", type=int, default=2, help="timed iterations per row (after one warm-up)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads in every measurement; 0 keeps torch's default (one per core)")
    parser.add_argument("--flush-denormal", action="store_true",
                        help="torch.set_flush_denormal(True) in every measurement: subnormal floats slow CPU "
                             "arithmetic many times over, and decaying memories produce them")
    parser.add_argument("--job-timeout", type=int, default=900, help="seconds before a row gives up")
    parser.add_argument("--job", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.job:
        job = json.loads(args.job)
        import torch

        if job["threads"]:
            torch.set_num_threads(job["threads"])
        torch.set_flush_denormal(job["flush_denormal"])
        print(json.dumps(JOBS[job["kind"]](job)))
        return
    if args.quick:
        args.time, args.hope_time, args.gflops_time, args.mm_size = 256, 256, 256, 1024
        args.memory_times, args.hope_memory_max, args.repeats = [256, 512, 1024], 512, 1
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available to this torch")
    print(f"# nestc vs peers; command: python {shlex.join(sys.argv)}")
    print(f"# machine: {describe_machine(args.device, args.threads)}"
          f"{', subnormals flushed to zero' if args.flush_denormal else ''}")
    versions = []
    for package in PEER_MODULES:
        try:
            versions.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{package} {NOT_INSTALLED}")
    print(f"# peers: {', '.join(versions)}\n", flush=True)
    sections = {"base": section_base, "titans": section_titans, "gated_deltanet": section_gated_deltanet, "hope": section_hope,
                "gflops": section_gflops, "memory": section_memory}
    for name in SECTIONS:
        if name in args.only:
            started = time.perf_counter()
            sections[name](args)
            print(f"({name}: {time.perf_counter() - started:.0f} s; load average now "
                  f"{' '.join(f'{x:.1f}' for x in os.getloadavg())})\n", flush=True)


if __name__ == "__main__":
    main()
