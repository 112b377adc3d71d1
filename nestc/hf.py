"""Hugging Face interop: a nestc model as a `transformers` causal language model.

    import nestc.hf
    config = nestc.hf.NestConfig(spec="specs/deltanet.nest")   # a path or the spec's text
    model = nestc.hf.NestForCausalLM(config)
    model.save_pretrained("out")                               # config.json + model.safetensors
    AutoModelForCausalLM.from_pretrained("out").generate(ids, max_new_tokens=20)

The config holds the spec's text, self-contained (imports inlined), so a saved directory loads
anywhere. The cache `generate` carries between steps is the nestc `ModelState` (`NestCache`): each
step reads only the new tokens, and the memories go on learning from every token they read, as in
nestc's own `generate`. Needs the `hf` extra (`pip install -e ".[hf]"`); `import nestc` never
imports this module.
"""

from __future__ import annotations

import os

import torch
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from nestc.api import BACKENDS, check
from nestc.lang import ir

# transformers 5 renamed the cache argument and output field `past_key_values` to `cache`: the
# first of these names that this version's output has.
_CACHE_NAMES = ("cache", "past_key_values")  # transformers 5's name first
CACHE_FIELD = next(name for name in _CACHE_NAMES if name in CausalLMOutputWithPast.__dataclass_fields__)


def _byte_characters() -> dict[int, str]:
    """The byte-level alphabet of `tokenizers`' ByteLevel pre-tokenizer (GPT-2's): each byte as
    one printable character, the printable Latin-1 bytes as themselves, the others as the
    characters from U+0100 on, in byte order."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    characters, shifted = {}, 0
    for byte in range(256):
        if byte in printable:
            characters[byte] = chr(byte)
        else:
            characters[byte] = chr(256 + shifted)
            shifted += 1
    return characters


def byte_tokenizer():
    """A `tokenizers.Tokenizer` whose ids are the UTF-8 bytes of the text (a byte-level nestc
    run's symbols): the byte-level pre-tokenizer, a vocabulary of its 256 characters at their
    bytes' ids and no merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tokenizer = Tokenizer(models.BPE(vocab={character: byte for byte, character in _byte_characters().items()},
                                     merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _self_contained(spec: str) -> str:
    """The spec's text with its imports inlined (what a run directory's spec.nest holds)."""
    from nestc.lang.diagnostics import NestError
    from nestc.lang.sema import analyze_file, analyze_source
    from nestc.lang.source import SourceFile
    from nestc.runtime.checkpoint import bundle

    is_path = "\n" not in spec and spec.endswith(".nest")
    result = analyze_file(spec) if is_path else analyze_source(SourceFile("<spec>", spec))
    if not result.ok:
        raise NestError([d for d in result.diagnostics if d.is_error])
    return bundle(result)


class NestConfig(PretrainedConfig):
    """A nestc model for `transformers`: the spec's text and the backend that runs it. The sizes
    HF tools read (`vocab_size`, `hidden_size`, ...) are derived from the spec, never set apart
    from it."""

    model_type = "nestc"

    def __init__(self, spec: str | None = None, backend: str = "compiled", use_cache: bool = True, **kwargs):
        if backend not in BACKENDS:
            raise ValueError(f"unknown nestc backend {backend!r}; available: {', '.join(BACKENDS)}")
        for derived in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                        "tie_word_embeddings"):
            kwargs.pop(derived, None)
        self.spec = None if spec is None else _self_contained(spec)
        self.backend = backend
        self.use_cache = use_cache  # whether a call hands back its state (a field of transformers 4's base config)
        program = None if self.spec is None else check(self.spec)
        model = None if program is None else program.model
        if program is not None and model is None:
            raise ValueError("the spec has no `model` section: it is a library of levels")
        if model is not None and any(ir.contains_search(node) for node in (model, *program.levels)):
            raise ValueError("the spec is a search space: freeze it to one variant first "
                             "(`nestc sweep SPEC --dry-run` lists the variants)")
        self.vocab_size = None if model is None else model.vocab
        self.hidden_size = None if model is None else model.dim
        self.num_hidden_layers = None if model is None else model.layers
        self.num_attention_heads = None if model is None else model.heads
        # Tied embeddings share one tensor, `embedding.weight`: the nestc model has no head
        # parameter then, so no tensor is saved twice and none needs declaring as tied.
        super().__init__(tie_word_embeddings=False if model is None else bool(model.tie_embeddings), **kwargs)


class NestCache:
    """The cache of a nestc model: its `ModelState` (every level's memory, attention caches, the
    stream position). A call with it reads only the tokens after `position` and updates it in place."""

    # What `generate` asks of a cache object: the state is no attention cache that can be cut
    # back or sliced by mask length, nor a compilable static cache.
    is_compileable = False
    is_croppable = False

    def __init__(self, state):
        self.state = state

    @property
    def position(self) -> int:
        return self.state.position

    @property
    def is_linear(self) -> list[bool]:
        """All layers are treated as recurrent: `generate` must not slice the inputs by the length
        of an attention cache (`prepare_inputs_for_generation` slices them by `position`)."""
        return [True] * len(self.state.levels)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.state.position

    def reorder_cache(self, beam_idx):
        raise ValueError("beam search is not supported by nestc models: it would have to reorder every level's "
                         "memory between beams; use greedy decoding or sampling")


def _either(cache, past_key_values):
    """The cache, by its transformers 5 name (`cache`) or its transformers 4 one."""
    return past_key_values if cache is None else cache


def _nest_cache(cache) -> NestCache | None:
    if cache is not None and not isinstance(cache, NestCache):
        raise TypeError(f"a nestc model's cache is a NestCache (its memory state), not {type(cache).__name__}")
    return cache


def _pads_the_end(attention_mask: torch.Tensor | None) -> bool:
    """Whether `attention_mask` pads the end of some rows (right padding); False when it pads
    nothing. A mask with a 0 before a 1 (left padding) is refused."""
    if attention_mask is None:
        return False
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be [batch, time] (ones and zeros), got shape "
                         f"{tuple(attention_mask.shape)}")
    real = attention_mask.bool()
    if real.all():
        return False
    # A pad before a real token: the memories would learn from the pad tokens before reading the
    # text, so the text's logits would not be those of the text alone.
    real_later = real.flip(-1).cummax(-1).values.flip(-1)
    if (real_later & ~real).any():
        raise ValueError("left padding (a 0 in attention_mask before a 1) is not supported: a nestc model's "
                         "memories learn from every token they read, pad tokens included, so a padded row "
                         "would not give that text's logits. Pad on the right (padding_side='right') or "
                         "generate each prompt apart.")
    return True


class NestForCausalLM(PreTrainedModel, GenerationMixin):
    """`transformers` causal LM around a nestc model (`self.nest`), run by `config.backend`."""

    config_class = NestConfig
    base_model_prefix = "nest"
    main_input_name = "input_ids"
    _is_stateful = True  # generate refuses assisted decoding, which would have to roll the memories back

    def __init__(self, config: NestConfig):
        super().__init__(config)
        if config.spec is None:
            raise ValueError("NestConfig has no spec: give NestConfig(spec=...) a spec path or text")
        from nestc.api import load

        self.nest = load(config.spec, backend=config.backend)
        self.post_init()

    @classmethod
    def from_run(cls, run_directory: str, backend: str = "compiled") -> NestForCausalLM:
        """The trained model of a nestc run directory (`nestc run`), ready for `save_pretrained`."""
        from nestc.runtime.rundir import load_run

        trained = load_run(run_directory, backend=backend)
        with open(os.path.join(run_directory, "spec.nest"), encoding="utf-8") as handle:
            model = cls(NestConfig(spec=handle.read(), backend=backend))
        model.nest.load_state_dict(trained.state_dict())
        return model.eval()

    @staticmethod
    def tokenizer_from_run(run_directory: str):
        """The tokenizer of a nestc run as a transformers `PreTrainedTokenizerFast`, to publish
        with the model (`save_pretrained` into the same directory, `AutoTokenizer` reads it back):
        the run's own `tokenizer.json` (a run trained with `--tokenizer`), or else the byte
        tokenizer of a run that read bytes, whose ids are the bytes of the UTF-8 text."""
        from transformers import PreTrainedTokenizerFast

        from nestc.runtime.rundir import TOKENIZER_FILE, load_run

        path = os.path.join(run_directory, TOKENIZER_FILE)
        if os.path.isfile(path):
            return PreTrainedTokenizerFast(tokenizer_file=path)
        vocab = load_run(run_directory).vocab
        if vocab < 256:
            raise ValueError(f"`{run_directory}` has no {TOKENIZER_FILE} and its vocab ({vocab}) is smaller than the "
                             "256 bytes: its ids are not bytes, so no tokenizer maps text to them")
        return PreTrainedTokenizerFast(tokenizer_object=byte_tokenizer())

    def init_weights(self):
        """Nothing to do: the nestc backend initializes each level's parameters as its rules say
        (HF's generic initialization would replace them), there are no weights to tie (tied
        embeddings are one tensor), and from_pretrained loads every weight."""

    def _init_weights(self, module):
        """Nothing, for the same reason (transformers 5 calls it for weights a checkpoint lacks)."""

    def get_input_embeddings(self):
        return self.nest.embedding

    def set_input_embeddings(self, embedding):
        self.nest.embedding = embedding

    def get_output_embeddings(self):
        return self.nest.head  # None when the embeddings are tied (the logits read embedding.weight)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the cache is the model's own state, made by its first call

    def generate(self, *args, **kwargs):
        # transformers 4 takes a cache passed to generate for a tuple of attention tensors
        if CACHE_FIELD == "past_key_values" and kwargs.get("past_key_values") is not None:
            raise ValueError("continuing generate from a NestCache needs transformers 5 (transformers 4 reads a "
                             "cache passed to generate as attention tensors); call the model with "
                             "past_key_values=... instead")
        return super().generate(*args, **kwargs)

    def prepare_inputs_for_generation(self, input_ids, cache=None, past_key_values=None, attention_mask=None,
                                      use_cache=None, **kwargs):
        cache = _nest_cache(_either(cache, past_key_values))
        if cache is not None and input_ids.shape[1] <= cache.position:
            raise ValueError(f"generate with a cache needs the whole sequence so far: the cache has read "
                             f"{cache.position} tokens, input_ids has {input_ids.shape[1]}")
        unread = input_ids if cache is None else input_ids[:, cache.position:]
        return {"input_ids": unread, CACHE_FIELD: cache, "attention_mask": attention_mask, "use_cache": use_cache}

    def forward(self, input_ids: torch.LongTensor | None = None, cache: NestCache | None = None,
                past_key_values: NestCache | None = None, attention_mask: torch.Tensor | None = None,
                labels: torch.LongTensor | None = None, use_cache: bool | None = None,
                return_dict: bool | None = None, inputs_embeds: torch.Tensor | None = None, **kwargs):
        """Read `input_ids` ([batch, time], the tokens after the cache's) and return their logits;
        with `use_cache`, the cache holds the state after them. `labels` gives HF's shifted
        cross-entropy (label -100 is ignored)."""
        if inputs_embeds is not None or input_ids is None:
            raise ValueError("a nestc model reads token ids (input_ids); inputs_embeds is not supported")
        cache = _nest_cache(_either(cache, past_key_values))
        use_cache = self.config.use_cache if use_cache is None else use_cache
        right_padded = _pads_the_end(attention_mask)
        logits, state = self.nest(input_ids, None if cache is None else cache.state)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size,
                                      **{k: v for k, v in kwargs.items() if k == "num_items_in_batch"})
        returned = None
        # A right-padded call's state has read the pad tokens of the shorter rows: it is no row's
        # state after its text, so it is not handed back to continue from.
        if use_cache and not right_padded:
            if cache is None:
                returned = NestCache(state)
            else:
                cache.state = state
                returned = cache
        output = CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: returned})
        return_dict = self.config.return_dict if return_dict is None else return_dict
        return output if return_dict else output.to_tuple()


AutoConfig.register(NestConfig.model_type, NestConfig)
AutoModelForCausalLM.register(NestConfig, NestForCausalLM)
