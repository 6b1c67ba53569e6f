"""The public explain API: samples in, :class:`Explanation` objects out."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError
from torch import nn

from dexar.adapters import DexarInputError, TeacherForcedBatch, VLMAdapter, get_adapter
from dexar.adapters.geometry import MapGeometry
from dexar.explanation import Explanation
from dexar.generation import generate_answers
from dexar.methods import Method, MethodOutput, build_method
from dexar.schema import Sample
from dexar.trace import run as run_trace
from dexar.trace.memory import ModelDims, free_device_bytes, memory_plan, samples_per_trace
from dexar.words import segment_words

ANSWER_SOURCES = ("ground_truth", "generate")


class Explainer:
    """Explains batches of samples with several methods sharing one trace.

    Args:
        model: A supported VLM (see :data:`dexar.adapters.ADAPTERS`).
        processor: Its processor.
        methods: Method instances by name; default ``{"dexar": DexAR()}``.
        skip_unsupported: Drop the methods the architecture does not define (their label → reason in
            :attr:`skipped`) instead of raising. All dropped: :class:`DexarInputError` all the same.
        trace_batch: Samples per trace (and per IIA forward): a batch is explained in sub-batches of
            this many. ``None``: as many as the memory model (:func:`dexar.trace.memory.samples_per_trace`)
            fits in the accelerator's free memory; the whole batch on the CPU.

    Raises:
        DexarInputError: A method the architecture does not define (one line), unless skipped.

    """

    def __init__(
        self,
        model: nn.Module,
        processor: Any,
        methods: Mapping[str, Method] | None = None,
        skip_unsupported: bool = False,
        trace_batch: int | None = None,
    ) -> None:
        if trace_batch is not None and trace_batch < 1:
            raise ValueError(f"trace_batch must be a positive number of samples or None, got {trace_batch}")
        self.trace_batch = trace_batch
        self.adapter: VLMAdapter = get_adapter(model, processor)
        self.methods: dict[str, Method] = dict(methods) if methods else {"dexar": build_method("dexar")}
        self.skipped: dict[str, str] = {}
        """Label → why the architecture cannot run the method (``skip_unsupported``)."""
        for label, method in list(self.methods.items()):
            try:
                self.adapter.check_method(method)  # a one-line error for a method the architecture lacks
            except DexarInputError as err:
                if not skip_unsupported:
                    raise
                refused = getattr(self.adapter, "refused_methods", {})
                self.skipped[label] = refused.get(method.name) or str(err)
                del self.methods[label]
        if not self.methods:
            reasons = "; ".join(f"{label}: {why}" for label, why in self.skipped.items())
            raise DexarInputError(f"no method runs on {type(self.adapter).__name__}: {reasons}")
        self.last_timings: dict[str, float] = {}
        """Seconds of the last ``explain_samples`` call by phase (see :mod:`dexar.phase_timing`)."""

    @property
    def needs(self) -> frozenset[str]:
        """Union of what the methods need from the trace."""
        return frozenset().union(*(m.needs for m in self.methods.values()))

    def answer_ids(
        self, samples: list[Sample], answer_source: str, max_new_tokens: int, keep_eos: bool
    ) -> tuple[list[list[int]], list[str]]:
        """Answer token ids and texts: the ground truth (teacher forcing) or greedy generations.

        A sample without a ground-truth answer is always generated.
        """
        if answer_source not in ANSWER_SOURCES:
            raise ValueError(f"answer_source must be one of {ANSWER_SOURCES}, got {answer_source!r}")
        ids: list[list[int] | None] = [None] * len(samples)
        texts: list[str] = [""] * len(samples)
        to_generate = [i for i, s in enumerate(samples) if answer_source == "generate" or s.answer is None]
        if to_generate:
            generated = generate_answers(self.adapter, [samples[i] for i in to_generate], max_new_tokens, keep_eos)
            for i, g in zip(to_generate, generated, strict=True):
                ids[i], texts[i] = g.ids, g.text
        eos = self.adapter.tokenizer.eos_token_id
        for i, s in enumerate(samples):
            if ids[i] is None:
                ids[i] = self.adapter.tokenize_answer(s.answer or "") + ([eos] if keep_eos else [])
                texts[i] = (s.answer or "").strip()
        return [list(x) for x in ids if x is not None], texts

    def explain_samples(
        self,
        samples: list[Sample],
        answer_source: str = "ground_truth",
        max_new_tokens: int = 32,
        keep_eos: bool = False,
        keep_images: bool = True,
        time_alone: bool = False,
    ) -> dict[str, list[Explanation]]:
        """Explain a batch: one trace (one forward + at most one backward), every method on it.

        Samples whose images give different image-token layouts (:meth:`VLMAdapter.grid_key`:
        dynamic resolution, tiles) are traced in sub-batches of equal layout; results keep the
        samples' order. A batch larger than :meth:`samples_per_trace` is traced in consecutive
        sub-batches of that size (the answers generated once for the whole batch): each sample's maps
        are its own whatever the batch (the samples do not interact), the timing sums every sub-batch.

        With ``time_alone``, each method is then run once more on its own (a trace of its own needs,
        its work, its explanation objects; results discarded) and timed as ``alone/<label>``: the
        paper's sec/img, which the shared trace (serving every method's needs) does not give.
        """
        groups: dict[Any, list[int]] = {}
        for i, sample in enumerate(samples):
            groups.setdefault(self.adapter.grid_key(sample.image), []).append(i)
        if len(groups) > 1:
            parts = list(groups.values())
            return self._explain_groups(
                samples, parts, answer_source, max_new_tokens, keep_eos, keep_images, time_alone
            )
        device = next(self.adapter.model.parameters()).device
        clock = PhaseClock(device)
        answer_ids, texts = self.answer_ids(samples, answer_source, max_new_tokens, keep_eos)
        clock.lap("generation")
        batch = self._build_batch(samples, answer_ids, device)
        size = self.samples_per_trace(batch)
        if size >= len(samples):
            results = self._explain_built(batch, samples, answer_ids, texts, keep_images, time_alone, clock)
        else:  # sub-batches of the generated answers, each encoded and padded on its own
            results = {name: [] for name in self.methods}
            for start in range(0, len(samples), size):
                part = slice(start, start + size)
                sub = self._build_batch(samples[part], answer_ids[part], device)
                out = self._explain_built(
                    sub, samples[part], answer_ids[part], texts[part], keep_images, time_alone, clock
                )
                for name, explanations in out.items():
                    results[name] += explanations
        self.last_timings = clock.laps
        return results

    def samples_per_trace(self, batch: TeacherForcedBatch) -> int:
        """Samples of ``batch`` per trace: :attr:`trace_batch`, or as many as fit the free accelerator memory.

        Sized by :func:`dexar.trace.memory.samples_per_trace` for the needs of the methods (the shared
        trace, and IIA's graph-holding forwards); a decoder on the CPU, or an encoder-decoder (the model
        covers decoder self-attention only), is traced whole.
        """
        if self.trace_batch is not None:
            return self.trace_batch
        device = next(self.adapter.model.parameters()).device
        free = free_device_bytes(device)
        if free is None or self.adapter.architecture != "decoder":
            return batch.input_ids.shape[0]
        probe = any("attention_probes" in getattr(m, "probe_needs", ()) for m in self.methods.values())
        dtype = next(self.adapter.model.parameters()).dtype
        dims = ModelDims.from_config(self.adapter.text_config)
        n, t = batch.input_ids.shape[1], batch.answer_ids.shape[1]
        return samples_per_trace(dims, n, t, memory_plan(self.needs), dtype, free, probe)

    def _build_batch(
        self, samples: list[Sample], answer_ids: list[list[int]], device: torch.device
    ) -> TeacherForcedBatch:
        prompt_ids, image_inputs = self.adapter.encode_prompts([s.image for s in samples], [s.prompt for s in samples])
        return self.adapter.build_batch(prompt_ids, answer_ids, image_inputs, device=device)

    def _explain_built(
        self,
        batch: TeacherForcedBatch,
        samples: list[Sample],
        answer_ids: list[list[int]],
        texts: list[str],
        keep_images: bool,
        time_alone: bool,
        clock: PhaseClock,
    ) -> dict[str, list[Explanation]]:
        """One trace of ``batch``, every method on it (and each on its own with ``time_alone``), laps in ``clock``."""
        clock.lap("encoding")
        trace = run_trace(self.adapter, batch, self.needs)
        clock.lap("trace")
        results: dict[str, list[Explanation]] = {}
        inputs = [batch.sample_inputs(b) for b in range(len(samples))]  # one copy per sample, shared by methods
        geometries = [self.adapter.map_geometry(s.image) for s in samples]  # once per sample, not per method
        shared = (batch, samples, answer_ids, texts, keep_images, inputs, geometries)
        for name, method in self.methods.items():
            out = method(trace)
            results[name] = self._explanations(name, method, out, *shared)
            clock.lap(f"method/{name}")
        del trace, out  # free the shared trace before any trace of one method's needs
        if time_alone:
            for name, method in self.methods.items():
                out = method(run_trace(self.adapter, batch, method.needs))
                self._explanations(name, method, out, *shared)
                clock.lap(f"alone/{name}")
        return results

    def _explanations(
        self,
        name: str,
        method: Method,
        out: MethodOutput,
        batch: TeacherForcedBatch,
        samples: list[Sample],
        answer_ids: list[list[int]],
        texts: list[str],
        keep_images: bool,
        inputs: list[dict[str, torch.Tensor]],
        geometries: list[MapGeometry],
    ) -> list[Explanation]:
        """One method's batched output as one :class:`Explanation` per sample (CPU tensors).

        ``inputs`` holds each sample's unpadded inputs (:meth:`TeacherForcedBatch.sample_inputs`), made
        once per sample: every method's explanation of a sample holds the same tensors (one
        ``pixel_values`` copy per sample, not one per method), in a dict of its own. ``geometries`` holds
        each sample's map geometry, also computed once per sample.
        """
        per_sample = []
        for b, sample in enumerate(samples):
            length = int(batch.answer_lengths[b])
            t_max = batch.answer_ids.shape[1]
            sl = slice(t_max - length, t_max)
            per_sample.append(
                Explanation(
                    tokens=self.adapter.decode_tokens(answer_ids[b]),
                    token_ids=list(answer_ids[b]),
                    token_maps=out.token_maps[b, sl].detach().cpu(),
                    token_weights=out.token_weights[b, sl].detach().cpu(),
                    sequence_map=out.sequence_map[b].detach().cpu(),
                    inputs=dict(inputs[b]),
                    answer_positions=self._positions(batch, b),
                    method=name,
                    options=_options(method),
                    token_empty=out.token_empty[b, sl].detach().cpu(),
                    sequence_empty=bool(out.sequence_empty[b]),
                    answer=texts[b],
                    image=sample.image if keep_images else None,
                    sample_id=sample.id,
                    geometry=geometries[b],
                    words=segment_words(self.adapter.tokenizer, answer_ids[b]),
                )
            )
        return per_sample

    def _explain_groups(
        self,
        samples: list[Sample],
        groups: list[list[int]],
        answer_source: str,
        max_new_tokens: int,
        keep_eos: bool,
        keep_images: bool,
        time_alone: bool = False,
    ) -> dict[str, list[Explanation]]:
        """Explain each group of sample indices as its own batch; merge results (input order) and timings."""
        results: dict[str, list[Explanation | None]] = {name: [None] * len(samples) for name in self.methods}
        timings: dict[str, float] = {}
        for group in groups:
            subset = [samples[i] for i in group]
            part = self.explain_samples(subset, answer_source, max_new_tokens, keep_eos, keep_images, time_alone)
            for name, explanations in part.items():
                for i, explanation in zip(group, explanations, strict=True):
                    results[name][i] = explanation
            for phase, seconds in self.last_timings.items():
                timings[phase] = timings.get(phase, 0.0) + seconds
        self.last_timings = timings
        return {name: [e for e in exps if e is not None] for name, exps in results.items()}

    @staticmethod
    def _positions(batch: TeacherForcedBatch, index: int) -> torch.Tensor:
        """Answer positions in the unpadded ``input_ids`` of one sample."""
        return batch.unpadded_answer_positions(index).cpu()


class PhaseClock:
    """Wall-clock laps between phases; synchronises CUDA only at lap boundaries."""

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        self.laps: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        """Record the seconds since the previous lap under ``name`` (accumulating)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.laps[name] = self.laps.get(name, 0.0) + now - self._last
        self._last = now


def _options(method: Method) -> dict[str, Any]:
    if not dataclasses.is_dataclass(method):
        return {}
    return {f.name: getattr(method, f.name) for f in dataclasses.fields(method)}


def open_image(image: str | Path | Image.Image) -> Image.Image:
    """Open an image path (any mode) with a one-line error if it cannot be decoded."""
    if isinstance(image, Image.Image):
        return image
    path = Path(image)
    if not path.is_file():
        raise DexarInputError(f"image not found: {path}")
    try:
        with Image.open(path) as img:
            img.load()
            return img.copy()
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise DexarInputError(f"cannot decode image {path}: {err}") from err


def explain(
    model: nn.Module,
    processor: Any,
    image: str | Path | Image.Image,
    prompt: str,
    answer: str | None = None,
    method: str = "dexar",
    *,
    max_new_tokens: int = 32,
    keep_eos: bool = False,
    **options: Any,
) -> Explanation:
    """Explain which image regions drive each token of a VLM's answer.

    Args:
        model: A supported VLM (LLaVA-1.5, BakLLaVA, the bundled Shapes model, ...).
        processor: Its processor.
        image: PIL image (any mode) or path.
        prompt: User prompt; the adapter applies the model's template.
        answer: Answer to teacher-force; ``None`` generates one greedily.
        method: Registered method name (``dexar``, ``attention``, ...).
        max_new_tokens: Generation budget when ``answer`` is ``None``.
        keep_eos: Include the end-of-sequence token among the explained tokens.
        **options: Method options (e.g. ``head_filter="top-0.1"``, ``relu=False``).

    Returns:
        The :class:`Explanation` of the answer.

    """
    sample = Sample(id="input", image=open_image(image), prompt=prompt, answer=answer)
    explainer = Explainer(model, processor, {method: build_method(method, **options)})
    source = "generate" if answer is None else "ground_truth"
    return explainer.explain_samples([sample], source, max_new_tokens, keep_eos)[method][0]
