"""A run directory and its checkpoints, written so that a kill at any moment (SIGKILL, an OOM kill,
a power cut) loses at most the steps since the last checkpoint and never mixes two steps.

    runs/<spec>-<variant id>/
        spec.nest  metrics.jsonl  curves.png  report.md
        checkpoints/step-00000040/  model.safetensors  trainer.safetensors  manifest.json
        checkpoints/step-00000050/  ...

A checkpoint is written into a hidden `.partial-*` directory: each file is fsynced, then the
manifest (the step, and each file's size and SHA-256) is written last; the directory is renamed to
`step-N`, which is atomic on POSIX, and its parent fsynced. A reader takes the newest `step-N` whose
files match its manifest, so a torn or damaged checkpoint is passed over for the one before it. The
newest two are kept. Nothing in a run directory is a pickle: loading one never runs code.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass

import torch

from nestc.lang.diagnostics import NestError
from nestc.lang.sema import analyze_source
from nestc.lang.source import SourceFile
from nestc.runtime import checkpoint
from nestc.runtime.checkpoint import CheckpointError

CHECKPOINTS = "checkpoints"
MODEL_FILE = "model.safetensors"
TRAINER_FILE = "trainer.safetensors"
MANIFEST_FILE = "manifest.json"
TOKENIZER_FILE = "tokenizer.json"  # a copy of `--tokenizer`'s file: what the run's token ids mean
METRICS_FILE = "metrics.jsonl"
KEPT = 2  # the newest checkpoint, and one more in case the disk damages it later
_STEP_DIRECTORY = re.compile(r"step-(\d{8,})")
# What a run writes besides spec.nest, removed by --overwrite (and the top-level files of older nestc).
_RUN_OUTPUTS = (CHECKPOINTS, METRICS_FILE, "curves.png", "report.md", MODEL_FILE, TRAINER_FILE, "trainer.pt",
                TOKENIZER_FILE)


@dataclass(frozen=True)
class Checkpoint:
    directory: str
    step: int

    @property
    def model_file(self) -> str:
        return os.path.join(self.directory, MODEL_FILE)

    @property
    def trainer_file(self) -> str:
        return os.path.join(self.directory, TRAINER_FILE)


def _fsync(path: str) -> None:
    """Flush a file's or a directory's contents to the disk (a rename is durable once its parent is)."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write(run_directory: str, step: int, weights: dict, trainer: dict) -> Checkpoint:
    """Write the checkpoint of `step` as one unit (see the module's docstring) and drop the older
    ones past the newest two. A complete checkpoint of the same step is kept as it is: the state
    after a step is the same however often it is saved."""
    from safetensors.torch import save_file

    root = os.path.join(run_directory, CHECKPOINTS)
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, f"step-{step:08d}")
    if os.path.isdir(final) and problem(final, step) is None:
        return Checkpoint(final, step)
    partial = os.path.join(root, f".partial-step-{step:08d}-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    save_file(weights, os.path.join(partial, MODEL_FILE), metadata={"step": str(step)})
    checkpoint.save_tree(trainer, os.path.join(partial, TRAINER_FILE), "nestc_trainer")
    files = {}
    for name in (MODEL_FILE, TRAINER_FILE):
        path = os.path.join(partial, name)
        _fsync(path)
        files[name] = {"bytes": os.path.getsize(path), "sha256": _sha256(path)}
    with open(os.path.join(partial, MANIFEST_FILE), "w", encoding="utf-8") as handle:
        json.dump({"format": 1, "step": step, "files": files}, handle)
        handle.flush()
        os.fsync(handle.fileno())
    _fsync(partial)
    if os.path.isdir(final):  # a damaged checkpoint of this step: move it out of the way first
        damaged = os.path.join(root, f".damaged-step-{step:08d}-{os.getpid()}")
        os.rename(final, damaged)
        shutil.rmtree(damaged, ignore_errors=True)
    os.rename(partial, final)
    _fsync(root)
    _prune(root)
    return Checkpoint(final, step)


def _step_directories(root: str) -> list[tuple[int, str]]:
    """(step, path) of every `step-N` directory, newest first."""
    if not os.path.isdir(root):
        return []
    found = [(int(match.group(1)), os.path.join(root, name)) for name in os.listdir(root)
             if (match := _STEP_DIRECTORY.fullmatch(name))]
    return sorted(found, reverse=True)


def _prune(root: str) -> None:
    """Keep the newest KEPT checkpoints (by name: a `step-N` directory exists only once its write
    completed, and the newest is the one just written, so nothing is hashed again here); remove
    the rest and the partial directories of writes that were killed."""
    for _, path in _step_directories(root)[KEPT:]:
        shutil.rmtree(path, ignore_errors=True)
    for name in os.listdir(root):
        if name.startswith((".partial-", ".damaged-")) and not name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def problem(directory: str, step: int) -> str | None:
    """Why the checkpoint directory of `step` cannot be used (None when its files match its manifest)."""
    try:
        with open(os.path.join(directory, MANIFEST_FILE), encoding="utf-8") as handle:
            manifest = json.load(handle)
    except FileNotFoundError:
        return "it has no manifest (its write was cut short)"
    except (OSError, ValueError) as error:
        return f"its manifest is unreadable ({error})"
    if not isinstance(manifest, dict) or manifest.get("step") != step or not isinstance(manifest.get("files"), dict) \
            or set(manifest["files"]) != {MODEL_FILE, TRAINER_FILE}:
        return "its manifest is not a nestc checkpoint manifest of this step"
    for name, expected in manifest["files"].items():
        path = os.path.join(directory, name)
        if not isinstance(expected, dict) or not os.path.isfile(path):
            return f"`{name}` is missing"
        if os.path.getsize(path) != expected.get("bytes") or _sha256(path) != expected.get("sha256"):
            return f"`{name}` does not match the manifest (damaged or changed after it was written)"
    return None


def latest(run_directory: str, log=lambda message: None) -> Checkpoint | None:
    """The newest complete checkpoint of a run (None when it has none); each one passed over is
    logged with its reason. CheckpointError when there are checkpoints but none is complete."""
    passed_over = []
    for step, path in _step_directories(os.path.join(run_directory, CHECKPOINTS)):
        reason = problem(path, step)
        if reason is None:
            return Checkpoint(path, step)
        log(f"passing over the checkpoint of step {step}: {reason}")
        passed_over.append(f"step {step}: {reason}")
    if passed_over:
        raise CheckpointError(f"`{run_directory}` has no complete checkpoint ({'; '.join(passed_over)}); "
                              "start over with --overwrite")
    return None


def holds_run(run_directory: str) -> bool:
    """Whether a directory holds the outputs of an earlier run, which a new run must not replace
    without --resume or --overwrite."""
    return any(os.path.exists(os.path.join(run_directory, name)) for name in _RUN_OUTPUTS)


def old_layout(run_directory: str) -> bool:
    """Whether the run was written before checkpoints had their own directories (weights and a
    trainer state, once a pickle, at the top level), which nestc no longer resumes."""
    return not os.path.isdir(os.path.join(run_directory, CHECKPOINTS)) and any(
        os.path.exists(os.path.join(run_directory, name)) for name in (MODEL_FILE, TRAINER_FILE, "trainer.pt"))


def clear(run_directory: str) -> None:
    """Remove an earlier run's outputs (--overwrite); the directory and its spec.nest stay."""
    for name in _RUN_OUTPUTS:
        path = os.path.join(run_directory, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)


def cut_metrics(path: str, step: int) -> None:
    """Keep the metrics of steps 1..`step` only, so that a resumed run's log has each step once;
    a line that a kill cut short is dropped. Rewritten atomically."""
    if not os.path.exists(path):
        return
    kept = []
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
                kept.append(json.dumps(record) + "\n")
    temporary = path + ".tmp"
    with open(temporary, "w", encoding="utf-8") as handle:
        handle.writelines(kept)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def save(run_directory: str, model, optimizer, step: int, generator: torch.Generator, rng) -> Checkpoint:
    """The weights and everything else a resume needs: the optimizer's moments, the RNG states
    (which fix the data position), the step, and the gradients that `every N steps` levels have
    accumulated but not yet applied."""
    weights = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    held = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    trainer = {"step": step, "optimizer": optimizer.state_dict(), "generator": generator.get_state(),
               "python_rng": rng.getstate(), "torch_rng": torch.get_rng_state(), "held_gradients": held}
    return write(run_directory, step, weights, trainer)


def restore(found: Checkpoint, model, optimizer, generator: torch.Generator, rng) -> int:
    """Load what `save` wrote into the model, the optimizer and the RNGs; returns the step.
    CheckpointError on a file that does not fit the run."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    trainer = checkpoint.load_tree(found.trainer_file, "nestc_trainer", "trainer state")
    try:
        model.load_state_dict(load_file(found.model_file))
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"`{found.model_file}` is not a readable safetensors file ({error})") from None
    except RuntimeError as error:
        raise CheckpointError(f"`{found.model_file}` does not fit the spec: {str(error).splitlines()[0]}") from None
    try:
        if trainer["step"] != found.step:
            raise ValueError(f"it says step {trainer['step']}, its directory step {found.step}")
        optimizer.load_state_dict(trainer["optimizer"])
        generator.set_state(trainer["generator"])
        rng.setstate(trainer["python_rng"])
        torch.set_rng_state(trainer["torch_rng"])
        parameters = dict(model.named_parameters())
        for name, gradient in trainer["held_gradients"].items():
            parameters[name].grad = gradient.to(parameters[name].device)
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"`{found.trainer_file}` does not fit this run ({error})") from None
    return found.step


def run_tokenizer(run_directory: str):
    """The tokenizer a run trained with (None: it read bytes)."""
    from nestc.runtime import data

    path = os.path.join(run_directory, TOKENIZER_FILE)
    return data.load_tokenizer(path) if os.path.isfile(path) else None


def load_run(run_directory: str, backend: str = "compiled"):
    """The trained model of a run directory: its spec with the newest complete checkpoint's weights."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from nestc.backends import compiled, reference

    spec_path = os.path.join(run_directory, "spec.nest")
    if not os.path.isfile(spec_path):
        raise CheckpointError(f"`{run_directory}` is not a run directory: `spec.nest` is missing")
    found = latest(run_directory)
    if found is None:
        older = " (it was written by an older nestc: retrain it)" if old_layout(run_directory) else ""
        raise CheckpointError(f"`{run_directory}` has no checkpoint yet: train it with `nestc run`{older}")
    with open(spec_path, encoding="utf-8") as handle:
        result = analyze_source(SourceFile(spec_path, handle.read()))
    if not result.ok:
        raise NestError([d for d in result.diagnostics if d.is_error])
    model = (compiled if backend == "compiled" else reference).build(result.program)
    try:
        weights = load_file(found.model_file)
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"`{found.model_file}` is not a readable safetensors file ({error})") from None
    try:
        model.load_state_dict(weights)
    except RuntimeError as error:
        raise CheckpointError(f"`{found.model_file}` does not fit `{spec_path}`: {str(error).splitlines()[0]}") \
            from None
    return model
