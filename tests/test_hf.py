"""Hugging Face interop (nestc/hf.py) with the real transformers library: save/load, generate with
the memory state as the cache, HF's loss, run directories, padding."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers", reason='the Hugging Face interop needs the hf extra: pip install -e ".[hf]"')

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from click.testing import CliRunner  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from nestc.cli import cli  # noqa: E402
from nestc.hf import CACHE_FIELD, NestCache, NestConfig, NestForCausalLM  # noqa: E402
from nestc.lang.diagnostics import NestError  # noqa: E402
from nesttest import SPECS  # noqa: E402

FFN = "level ffn : mlp(expand=4, residual=false)\n"
MODEL = """
model {
    vocab 256
    dim 16
    heads 2
    layers 2
    tie_embeddings %s
    block = residual(rmsnorm |> %s) |> residual(rmsnorm |> ffn)
}
"""
# A memory that learns while it reads (the delta rule, one step per token), and softmax attention,
# whose state is its KV cache.
DELTANET = """
level mixer : matrix {
    key = x |> proj |> conv(4) |> silu |> l2norm
    value = x |> proj |> conv(4) |> silu
    query = x |> proj |> conv(4) |> silu |> l2norm
    lr = x |> proj |> sigmoid
    objective l2
    optimizer gd
    every 1
    read after
}
""" + FFN
ATTENTION = """
level attn : cache {
    key = x |> proj |> rope
    query = x |> proj |> rope
}
""" + FFN
# A continuum level (HOPE's CMS): an MLP that takes a step on the task loss every 4 tokens, even
# while generate reads and writes; its unfinished chunk travels in the state.
CONTINUUM = ATTENTION + """
level cms : mlp(expand=2) {
    objective task
    lr = 0.5
    every 4
}
"""
SPECS_BY_NAME = {"deltanet": DELTANET + MODEL % ("true", "mixer"), "attention": ATTENTION + MODEL % ("false", "attn"),
                 "continuum": CONTINUUM + MODEL.replace("|> ffn)", "|> ffn) |> cms") % ("false", "attn")}
PROMPTS = torch.tensor([[1, 2, 3, 4, 5], [9, 8, 7, 6, 5]])


def model_of(name: str, backend: str = "compiled", tied: bool | None = None) -> NestForCausalLM:
    torch.manual_seed(0)
    spec = SPECS_BY_NAME[name]
    if tied is not None:
        spec = spec.replace("tie_embeddings true", f"tie_embeddings {str(tied).lower()}")
    return NestForCausalLM(NestConfig(spec=spec, backend=backend)).eval()


def varied(model: NestForCausalLM) -> NestForCausalLM:
    """Weights of unit scale (embedding) and 1/sqrt(fan-in) (matrices), so that greedy decoding
    does not settle on one token at once as at nestc's small initialization; then each step's
    choice depends on what the memories have read."""
    torch.manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() > 1:
                scale = 1.0 if parameter is model.nest.embedding.weight else parameter.shape[-1] ** -0.5
                parameter.normal_(0.0, scale)
    return model


def nestc_greedy(nest, prompts: torch.Tensor, count: int) -> torch.Tensor:
    """nestc's own loop: read the prompts, then feed back each argmax token, the state carried."""
    with torch.no_grad():
        logits, state = nest(prompts)
        written = []
        for _ in range(count):
            token = logits[:, -1].argmax(-1, keepdim=True)
            written.append(token)
            logits, state = nest(token, state)
    return torch.cat(written, dim=1)


@pytest.mark.parametrize("backend", ["compiled", "reference"])
@pytest.mark.parametrize("name", ["deltanet", "attention", "continuum"])
def test_greedy_generate_is_nestc_greedy_loop_reading_only_new_tokens(name, backend):
    model = varied(model_of(name, backend, tied=False))
    lengths = []
    model.nest.register_forward_pre_hook(lambda module, args: lengths.append(args[0].shape[1]))
    generated = model.generate(PROMPTS, attention_mask=torch.ones_like(PROMPTS), max_new_tokens=8, do_sample=False)
    assert lengths == [5] + [1] * 7  # the prompt once, then each new token alone: the state is the cache
    written = generated[:, PROMPTS.shape[1]:]
    assert torch.equal(written, nestc_greedy(model.nest, PROMPTS, 8))
    assert len(set(written[0].tolist())) > 2  # a test of the carried state, not of one repeated token


@pytest.mark.parametrize("name", ["deltanet", "attention"])
def test_save_pretrained_and_auto_from_pretrained_give_equal_logits(name, tmp_path):
    model = model_of(name)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "nestc" and saved["architectures"] == ["NestForCausalLM"]
    assert saved["spec"] == SPECS_BY_NAME[name] and saved["tie_word_embeddings"] == (name == "deltanet")
    assert AutoConfig.from_pretrained(tmp_path).hidden_size == 16
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(loaded) is NestForCausalLM
    with torch.no_grad():
        assert torch.equal(loaded(PROMPTS).logits, model(PROMPTS).logits)
    # the head, present only without tied embeddings, is saved and loaded like any weight
    assert (loaded.get_output_embeddings() is None) == (name == "deltanet")


def test_a_spec_path_is_stored_self_contained():
    config = NestConfig(spec=str(SPECS / "transformer.nest"))
    assert "import" not in config.spec and "level attn" in config.spec  # lib/transformer.nest inlined
    assert (config.vocab_size, config.hidden_size, config.num_hidden_layers) == (256, 128, 2)


def test_labels_give_hf_shifted_cross_entropy():
    model = model_of("deltanet")
    labels = PROMPTS.clone()
    labels[1, 3] = -100  # ignored, as in every HF causal LM
    output = model(PROMPTS, labels=labels)
    expected = F.cross_entropy(output.logits[:, :-1].reshape(-1, 256), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(output.loss, expected, rtol=1e-6, atol=0.0)
    output.loss.backward()  # a training step's loss: the gradient reaches the embedding
    assert model.nest.embedding.weight.grad.abs().sum() > 0


def test_a_call_continues_from_its_cache_as_one_stream():
    model = model_of("deltanet")
    with torch.no_grad():
        whole = model(PROMPTS).logits
        first = model(PROMPTS[:, :3])
        assert isinstance(first[CACHE_FIELD], NestCache) and first[CACHE_FIELD].position == 3
        rest = model(PROMPTS[:, 3:], **{CACHE_FIELD: first[CACHE_FIELD]}).logits
    torch.testing.assert_close(torch.cat([first.logits, rest], dim=1), whole, rtol=1e-5, atol=1e-6)


def test_generate_continues_from_a_cache_passed_in():
    model = varied(model_of("deltanet", tied=False))
    with torch.no_grad():
        first = getattr(model(PROMPTS[:, :3]), CACHE_FIELD)
    if CACHE_FIELD == "past_key_values":  # transformers 4
        with pytest.raises(ValueError, match="needs transformers 5"):
            model.generate(PROMPTS, past_key_values=first, max_new_tokens=5, do_sample=False)
        return
    lengths = []
    model.nest.register_forward_pre_hook(lambda module, args: lengths.append(args[0].shape[1]))
    generated = model.generate(PROMPTS, cache=first, max_new_tokens=5, do_sample=False)
    assert lengths == [2] + [1] * 4  # the 2 prompt tokens the cache has not read, then each new one
    assert torch.equal(generated[:, PROMPTS.shape[1]:], nestc_greedy(model.nest, PROMPTS, 5))


def test_left_padding_is_refused_and_right_padding_keeps_the_texts_logits():
    model = model_of("deltanet")
    with pytest.raises(ValueError, match="left padding .* memories learn from every token they read"):
        model.generate(PROMPTS, attention_mask=torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]]), max_new_tokens=2)
    with torch.no_grad():
        padded = model(PROMPTS, attention_mask=torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]))
        alone = model(PROMPTS[1:, :3]).logits
    torch.testing.assert_close(padded.logits[1:, :3], alone, rtol=1e-5, atol=1e-6)
    # its state has read the pad tokens of the shorter row: no state to continue from
    assert getattr(padded, CACHE_FIELD) is None


def test_unsupported_requests_are_clear_errors():
    model = model_of("deltanet")
    with pytest.raises(ValueError, match="beam search is not supported"):
        model.generate(PROMPTS, max_new_tokens=2, num_beams=2, do_sample=False)
    with pytest.raises(TypeError, match="NestCache"):
        model(PROMPTS, **{CACHE_FIELD: object()})
    with pytest.raises(ValueError, match="unknown nestc backend 'jax'"):
        NestConfig(spec=SPECS_BY_NAME["deltanet"], backend="jax")
    with pytest.raises(ValueError, match="has no spec"):
        NestForCausalLM(NestConfig())
    with pytest.raises(NestError):
        NestConfig(spec="model {\n")
    with pytest.raises(ValueError, match="search space: freeze it"):
        NestConfig(spec=str(SPECS / "spaces" / "deltanet_space.nest"))


def test_from_run_publishes_a_trained_run(tmp_path):
    from nestc.runtime.rundir import load_run

    tiny = ["--set", "model.dim=16", "--set", "model.heads=2", "--set", "model.layers=1", "--set", "train.batch=2",
            "--set", "train.context=32"]
    result = CliRunner().invoke(cli, ["run", str(SPECS / "deltanet.nest"), "--steps", "2", "--runs",
                                      str(tmp_path / "runs"), *tiny])
    assert result.exit_code == 0, result.output
    (run,) = list((tmp_path / "runs").iterdir())
    model = NestForCausalLM.from_run(str(run))
    assert model.config.spec == (run / "spec.nest").read_text()
    with torch.no_grad():
        trained = load_run(str(run))(PROMPTS)[0]
        assert torch.equal(model(PROMPTS).logits, trained)
        # not the untrained initialization: the checkpoint's weights were loaded
        assert not torch.equal(NestForCausalLM(model.config)(PROMPTS).logits, trained)
        model.save_pretrained(tmp_path / "published")
        assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / "published")(PROMPTS).logits, trained)
    # the byte run's tokenizer: ids are the UTF-8 bytes, and it round-trips through AutoTokenizer
    from transformers import AutoTokenizer

    NestForCausalLM.tokenizer_from_run(str(run)).save_pretrained(tmp_path / "published")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "published")
    text = "héllo wörld\n\t€ 1"
    assert tokenizer(text)["input_ids"] == list(text.encode("utf-8"))
    assert tokenizer.decode(list(text.encode("utf-8"))) == text


def test_a_tokenizer_runs_own_tokenizer_is_published(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer

    from nestc.runtime.rundir import TOKENIZER_FILE

    own = Tokenizer(models.WordLevel(vocab={"[UNK]": 0, "memory": 1, "learns": 2}, unk_token="[UNK]"))
    own.pre_tokenizer = pre_tokenizers.Whitespace()
    own.save(str(tmp_path / TOKENIZER_FILE))
    NestForCausalLM.tokenizer_from_run(str(tmp_path)).save_pretrained(tmp_path / "published")
    assert AutoTokenizer.from_pretrained(tmp_path / "published")("memory learns")["input_ids"] == [1, 2]
