"""Inference engine over a device bundle: onnxruntime sessions, KV-cache generation, adapters (no torch)."""

from __future__ import annotations

import dataclasses
import json
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np

from edge_runtime import native as native_kernels
from edge_runtime.errors import BundleError, ConfigError
from edge_runtime.lowrank import LowRankLayout

if TYPE_CHECKING:
    from edge_runtime.decoding import Steering
from edge_runtime.protocol.adapter import AdapterMeta, load_adapter, stack_adapter
from edge_runtime.protocol.manifest import KvCache, Manifest, open_bundle, verify_files
from edge_runtime.sampling import nll, sample_next


@dataclasses.dataclass(frozen=True)
class ActiveAdapter:
    """An adapter ready to feed: immutable, so swapping the reference is atomic for readers."""

    version: int
    meta: AdapterMeta
    tensors: dict[str, np.ndarray]
    feeds: dict[str, np.ndarray]


SCORE_CHUNK = 64  # positions a scoring call runs at once (Engine.score)


def session_options(threads: int | None):
    """ORT session options with bounded threads (serving must leave cores to the rest of the device)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    return so


def uses_native_ops(graph: Path) -> bool:
    """Whether ``graph`` calls functions of the edgefm.native domain (bundle graphs keep their weights in
    a data file, so the graph file itself is small; a big single-file graph is not searched). The functions'
    names, not the domain: torch's exporter lists every custom domain it has seen in the process among a
    graph's opset imports, used or not."""
    if not graph.is_file() or graph.stat().st_size >= 64 << 20:
        return False
    data = graph.read_bytes()
    return native_kernels.DOMAIN.encode() in data and any(op.encode() in data for op in native_kernels.OPS)


class Engine:
    """Loads a bundle and runs it: ``generate`` (causal LM), ``embed``, ``classify``, ``score``."""

    def __init__(self, bundle: str | Path, *, threads: int | None = None, verify: bool = True, native: bool = True):
        """``native``: run the device's compiled kernels where the graph has functions for them (False: the
        graph's standard-operator form everywhere, as on a device without a C compiler)."""
        import onnxruntime as ort
        from tokenizers import Tokenizer

        self.dir = open_bundle(bundle)
        self.manifest = verify_files(self.dir) if verify else Manifest.load(self.dir)
        m = self.manifest
        self.task = m.task
        self.dims = m.model
        self.targets = list(m.adapter.targets)
        self.layers = int(m.model["layers"])
        so = session_options(threads)
        # graphs with edgefm.native functions run the device's compiled kernels where it has them
        # (edge_runtime/native.py), their standard-operator form where not
        self.native = native and uses_native_ops(self.dir / "model.onnx") and native_kernels.register(so)
        try:
            self.session = ort.InferenceSession(str(self.dir / "model.onnx"), so, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise BundleError(f"{self.dir}: onnxruntime cannot load model.onnx: {exc}") from None
        self.tokenizer = Tokenizer.from_file(str(self.dir / "tokenizer" / "tokenizer.json"))
        # tokenizer.json may carry the exporter's padding/truncation (all-MiniLM pads every input to 128):
        # we pad ourselves with a real attention mask, and encoders truncate where their reference does
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        if m.task != "causal-lm":
            self.max_length = int(m.model.get("max_length", m.model["max_positions"]))
            self.tokenizer.enable_truncation(self.max_length)
        tc = self.dir / "tokenizer" / "tokenizer_config.json"
        self.tokenizer_config = json.loads(tc.read_text()) if tc.is_file() else {}
        # inputs with a default (logits_from, low-rank slots) are "overridable initializers" to onnxruntime, not inputs
        overridable = self.session.get_overridable_initializers()
        self.input_names = {i.name for i in self.session.get_inputs()} | {i.name for i in overridable}
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.lowrank = LowRankLayout.from_bundle(self.dir, m)
        tensors, meta = load_adapter(self.dir / "adapter.safetensors", expect_fingerprint=m.base_fingerprint)
        self._lock = threading.Lock()
        self.adapter = ActiveAdapter(meta.version, meta, tensors, self.adapter_feeds(tensors))

    def adapter_feeds(self, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """An adapter's per-layer tensors as this bundle's graph inputs (low-rank slots or stacked)."""
        if self.lowrank is not None:
            return self.lowrank.feeds(tensors)
        return stack_adapter(tensors, self.targets, self.layers)

    # -- adapters --
    def make_active(self, tensors: dict[str, np.ndarray], meta: AdapterMeta) -> ActiveAdapter:
        """Validate an adapter against this bundle and precompute its feeds."""
        from edge_runtime.protocol.adapter import check_adapter, check_fits

        spec = self.manifest.adapter
        check_fits(meta, fingerprint=self.manifest.base_fingerprint, shapes=spec.shapes, alpha=spec.alpha)
        check_adapter(tensors, meta)
        return ActiveAdapter(meta.version, meta, tensors, self.adapter_feeds(tensors))

    def set_adapter(self, active: ActiveAdapter) -> None:
        """Swap the active adapter (one reference assignment: requests in flight keep the old one)."""
        self.adapter = active

    # -- low level --
    def empty_past(self, batch: int) -> dict[str, np.ndarray]:
        """Zero-length KV cache feeds."""
        shape = (batch, int(self.dims["kv_heads"]), 0, int(self.dims["head_dim"]))
        return {f"past.{i}.{kv}": np.zeros(shape, np.float32) for i in range(self.layers) for kv in ("key", "value")}

    def forward(
        self,
        ids: np.ndarray,
        mask: np.ndarray,
        positions: np.ndarray,
        past: dict[str, np.ndarray],
        adapter: ActiveAdapter | None = None,
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """One decoder call: returns logits [b, s, V] and the new KV cache."""
        feeds = {
            "input_ids": ids.astype(np.int64),
            "attention_mask": mask.astype(np.int64),
            "position_ids": positions.astype(np.int64),
            **past,
            **(adapter or self.adapter).feeds,
        }
        outs = self.session.run(None, feeds)
        present = {n.replace("present.", "past.", 1): v for n, v in zip(self.output_names[1:], outs[1:])}
        return outs[0], present

    # -- text --
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no special tokens added)."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        """Text of token ids (special tokens dropped)."""
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    FALLBACK_TEMPLATE = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )

    def chat_template(self) -> tuple[str, str]:
        """The bundle's chat template and where it came from: ``tokenizer/chat_template.jinja`` (what current
        transformers writes), else ``chat_template`` in tokenizer_config.json (older exports; a named list
        takes "default"), else ``FALLBACK_TEMPLATE`` ("role: content" lines), source "fallback"."""
        if not hasattr(self, "_chat_template"):
            file = self.dir / "tokenizer" / "chat_template.jinja"
            inline = self.tokenizer_config.get("chat_template")
            if isinstance(inline, list):
                inline = next((t.get("template") for t in inline if isinstance(t, dict) and t.get("name") == "default"), None)
            if file.is_file():
                self._chat_template = (file.read_text(encoding="utf-8"), "tokenizer/chat_template.jinja")
            elif isinstance(inline, str) and inline:
                self._chat_template = (inline, "tokenizer_config.json")
            else:
                self._chat_template = (self.FALLBACK_TEMPLATE, "fallback")
        return self._chat_template

    def _special_token(self, name: str) -> str:
        tok = self.tokenizer_config.get(name)
        if isinstance(tok, dict):
            tok = tok.get("content")
        return tok if isinstance(tok, str) else ""

    def chat_prompt(self, messages: list[dict], tools: list[dict] | None = None) -> str:
        """Render a chat as transformers' ``apply_chat_template(..., add_generation_prompt=True)`` does:
        the same template, a sandboxed jinja2 environment with trim_blocks/lstrip_blocks, the tokenizer's
        special tokens as variables, ``raise_exception``, ``tojson`` and ``strftime_now``."""
        import jinja2

        special = {n: self._special_token(n) for n in ("bos_token", "eos_token", "unk_token", "pad_token")}
        try:
            return self._compiled_chat_template().render(messages=messages, tools=tools, add_generation_prompt=True, **special)
        except jinja2.TemplateError as exc:
            raise ConfigError(f"the chat template cannot render these messages: {exc}") from None

    def _compiled_chat_template(self):
        """The chat template compiled once (a request only renders it)."""
        if not hasattr(self, "_chat_compiled"):
            import datetime

            import jinja2
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(msg):
                raise ConfigError(str(msg))

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
            env.filters["tojson"] = lambda x, indent=None, separators=None, sort_keys=False: json.dumps(
                x, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys
            )
            env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.datetime.now().strftime(fmt))
            try:
                self._chat_compiled = env.from_string(self.chat_template()[0])
            except jinja2.TemplateError as exc:
                raise ConfigError(f"the bundle's chat template does not compile: {exc}") from None
        return self._chat_compiled

    @property
    def eos_ids(self) -> set[int]:
        """Token ids that end generation."""
        eos = self.dims.get("eos_token_id")
        ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        for name in ("eos_token",):
            tok = self.tokenizer_config.get(name)
            if isinstance(tok, dict):
                tok = tok.get("content")
            if isinstance(tok, str) and self.tokenizer.token_to_id(tok) is not None:
                ids.add(self.tokenizer.token_to_id(tok))
        return ids

    def generate(
        self,
        prompt_ids: list[int],
        *,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        stop_ids: set[int] | None = None,
        should_stop: Callable[[], bool] | None = None,
        adapter: "ActiveAdapter | None" = None,
        steer: "Steering | None" = None,
        on_token: Callable[[int, np.ndarray], None] | None = None,
    ) -> Iterator[int]:
        """Yield new token ids one at a time, using the KV cache (prefill once, then one token per step);
        ``adapter``: another adapter than the serving one (e.g. the base model's); ``steer``: logit bias,
        penalties and a grammar (``edge_runtime.decoding``); ``on_token(tok, logits)`` sees each chosen
        token with the logits it was chosen from (log-probabilities)."""
        if self.task != "causal-lm":
            raise ConfigError(f"this bundle is for {self.task}; generation needs a causal-lm bundle")
        if not prompt_ids:
            raise ConfigError("the prompt is empty")
        max_pos = int(self.dims.get("max_positions", 2048))
        if len(prompt_ids) + max_new_tokens > max_pos:
            raise ConfigError(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({max_new_tokens}) exceeds the model's {max_pos} positions"
            )
        adapter = adapter or self.adapter  # one adapter for the whole request, even if a swap happens meanwhile
        # the API takes any int64 seed (negative too, as OpenAI's does); numpy wants a non-negative one
        rng = np.random.default_rng(None if seed is None else int(seed) % 2**64)
        stop_ids = self.eos_ids if stop_ids is None else stop_ids
        n = len(prompt_ids)
        step_fn = self._decoder(adapter, capacity=min(max_pos, -(-(n + max_new_tokens) // 64) * 64))
        logits = step_fn(np.array([prompt_ids], np.int64), n)
        for step in range(max_new_tokens):
            row = logits[0, -1] if steer is None else steer.adjust(logits[0, -1])
            tok = sample_next(row, temperature=temperature, top_k=top_k, top_p=top_p, rng=rng)
            if on_token is not None:
                on_token(tok, row)
            if tok in stop_ids:
                return
            if steer is not None:
                steer.accept(tok)
            yield tok
            if step == max_new_tokens - 1 or (should_stop and should_stop()):
                return
            n += 1
            logits = step_fn(np.array([[tok]], np.int64), n)

    def grammar_tokenizer(self):
        """This bundle's tokenizer for llguidance (built once: ~1 s), for structured output."""
        if not hasattr(self, "_ll_tokenizer"):
            try:
                from llguidance import LLTokenizer
            except ImportError:
                raise ConfigError("structured output needs llguidance (pip install llguidance)") from None
            self._ll_tokenizer = LLTokenizer(
                self.tokenizer.to_str(), n_vocab=int(self.dims["vocab"]), eos_token=sorted(self.eos_ids)
            )
        return self._ll_tokenizer

    def _decoder(self, adapter: ActiveAdapter, capacity: int = 0):
        """A stateful step function over IO binding: the KV cache stays in ORT-owned OrtValues between
        steps (no numpy round trip of ~60 tensors per token); LoRA inputs are bound once per request.

        Bundles whose graph appends to the cache in place (``io.kv_cache == "shared"``, the fused
        builder) get one preallocated buffer of ``capacity`` positions per layer, bound as both past
        and present: nothing is reallocated or copied per token."""
        import onnxruntime as ort

        sess = self.session
        binding = sess.io_binding()
        for name, arr in adapter.feeds.items():
            binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(arr))
        outs = self.output_names
        shared = self.manifest.io.kv_cache is KvCache.SHARED and capacity > 0
        binding.bind_output(outs[0], "cpu")  # logits first: values[0] below
        if shared:
            shape = (1, int(self.dims["kv_heads"]), capacity, int(self.dims["head_dim"]))
            for o in outs[1:]:
                buf = ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, np.float32))
                binding.bind_ortvalue_input(o.replace("present.", "past.", 1), buf)
                binding.bind_ortvalue_output(o, buf)
        else:
            for name, arr in self.empty_past(1).items():
                binding.bind_cpu_input(name, arr)
        keep: list[np.ndarray] = []  # the numpy inputs bound this step must outlive the run
        # one-token steps write their logits into one preallocated buffer (no output allocation, no
        # wrapping of every output per token); the array returned is valid until the next step
        logits1 = np.empty((1, 1, self.session.get_outputs()[0].shape[-1] if shared else 0), np.float32)
        logits1_val = ort.OrtValue.ortvalue_from_numpy(logits1) if shared else None

        last_only = "logits_from" in self.input_names  # bundles whose head can skip the prompt's other positions
        # one-token steps (the decode loop) rebind only the growing mask: the token, its position and
        # logits_from live in arrays bound once and written in place (onnxruntime reads a bound numpy
        # array's buffer directly); the per-token Python work was ~0.25 ms of a ~6 ms step
        tok1, pos1 = np.zeros((1, 1), np.int64), np.zeros((1, 1), np.int64)
        ones = np.ones((1, capacity if shared else 0), np.int64)
        from0 = ort.OrtValue.ortvalue_from_numpy(np.zeros(1, np.int64)) if last_only else None
        one_token_bound = [False]

        def step(ids: np.ndarray, total: int, all_positions: bool = False) -> np.ndarray:
            """Logits of the last position ([1, 1, V], or [1, seq, V] for bundles without ``logits_from``
            and with ``all_positions``)."""
            seq = ids.shape[1]
            if shared and total > capacity:
                raise ConfigError(f"sequence of {total} tokens exceeds the cache of {capacity}")
            if shared and seq == 1:  # logits_from is 0 whether or not all positions are asked for
                if not one_token_bound[0]:
                    binding.bind_cpu_input("input_ids", tok1)
                    binding.bind_cpu_input("position_ids", pos1)
                    if from0 is not None:
                        binding.bind_ortvalue_input("logits_from", from0)
                    binding.bind_ortvalue_output(outs[0], logits1_val)
                    one_token_bound[0] = True
                tok1[0, 0], pos1[0, 0] = ids[0, 0], total - 1
                binding.bind_cpu_input("attention_mask", ones[:, :total])
                sess.run_with_iobinding(binding)
                return logits1
            one_token_bound[0] = False
            mask = np.ones((1, total), np.int64)
            pos = np.arange(total - seq, total, dtype=np.int64)[None]
            keep[:] = [ids, mask, pos]
            binding.bind_cpu_input("input_ids", ids)
            binding.bind_cpu_input("attention_mask", mask)
            binding.bind_cpu_input("position_ids", pos)
            if last_only:
                first = np.array([0 if all_positions else seq - 1], np.int64)
                keep.append(first)
                # an input with a default: onnxruntime binds it as an OrtValue only (bind_cpu_input looks it up
                # among the inputs without one, and fails)
                binding.bind_ortvalue_input("logits_from", ort.OrtValue.ortvalue_from_numpy(first))
            binding.bind_output(outs[0], "cpu")
            if not shared:
                for o in outs[1:]:
                    binding.bind_output(o, "cpu")
            sess.run_with_iobinding(binding)
            values = binding.get_outputs()
            if not shared:
                for o, v in zip(outs[1:], values[1:]):
                    binding.bind_ortvalue_input(o.replace("present.", "past.", 1), v)
            return values[0].numpy()

        return step

    def score(self, ids: list[int], adapter: ActiveAdapter | None = None, chunk: int = SCORE_CHUNK) -> tuple[float, int]:
        """Sum of next-token negative log-likelihoods over ``ids`` and how many tokens were scored.

        Runs ``chunk`` positions a call over the KV cache: the [positions, vocabulary] logits and their
        log-softmax exist one chunk at a time (a 256-token window at once grew the process by ~150 MB
        for SmolLM2, which the gate's evaluation then held through the training session)."""
        n = len(ids)
        if n < 2:
            return 0.0, 0
        step = self._decoder(adapter or self.adapter, capacity=-(-n // 64) * 64)
        total = 0.0
        for s0 in range(0, n - 1, chunk):
            seg = np.array([ids[s0 : s0 + chunk]], np.int64)
            logits = step(seg, s0 + seg.shape[1], all_positions=True)
            targets = np.asarray(ids[s0 + 1 : s0 + 1 + seg.shape[1]], np.int64)
            total += float(nll(logits[0, : len(targets)], targets).sum())
        return total, n - 1

    def perplexity(self, text: str, window: int = 256, adapter: ActiveAdapter | None = None) -> float:
        """Perplexity of ``text`` in non-overlapping windows."""
        ids = self.encode(text)
        total, count = 0.0, 0
        for i in range(0, len(ids), window):
            s, c = self.score(ids[i : i + window], adapter)
            total, count = total + s, count + c
        if count == 0:
            raise ConfigError("text too short to score")
        return float(np.exp(total / count))

    def encoder_inputs(self, texts: list[str]) -> tuple[dict[str, np.ndarray], list[int]]:
        """Right-padded ids with a mask marking only real tokens, and each input's token count
        (special tokens included, after truncation to ``max_length``)."""
        enc = [self.tokenizer.encode(t).ids or [0] for t in texts]
        width = max(len(e) for e in enc)
        ids = np.zeros((len(enc), width), np.int64)
        mask = np.zeros((len(enc), width), np.int64)
        for i, e in enumerate(enc):
            ids[i, : len(e)] = e
            mask[i, : len(e)] = 1
        return {"input_ids": ids, "attention_mask": mask}, [len(e) for e in enc]

    def embed(self, texts: list[str]) -> np.ndarray:
        """L2-normalised sentence embeddings [n, hidden] (embedding bundles): mean pooling over real tokens."""
        return self.embed_counted(texts)[0]

    def embed_counted(self, texts: list[str]) -> tuple[np.ndarray, list[int]]:
        """``embed`` plus the tokens each input was read as (what usage reports), from one tokenization."""
        if self.task != "embedding":
            raise ConfigError(f"this bundle is for {self.task}; embeddings need an embedding bundle")
        feeds, counts = self.encoder_inputs(texts)
        return self.session.run(None, {**feeds, **self.adapter.feeds})[0], counts

    def classify(self, texts: list[str]) -> np.ndarray:
        """Class logits [n, labels] (classification bundles)."""
        if self.task != "classification":
            raise ConfigError(f"this bundle is for {self.task}; classification needs a classification bundle")
        feeds, _ = self.encoder_inputs(texts)
        return self.session.run(None, {**feeds, **self.adapter.feeds})[0]
