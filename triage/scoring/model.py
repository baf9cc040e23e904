"""The MURA DenseNet-169 and the scoring model the worker runs.

:func:`build_densenet169` is the network the training code trains and the daemon loads: a
torchvision ``densenet169`` whose classifier is one logit. :func:`load_model` loads it from a
model card and wraps it in a :class:`ScoringModel`, whose forward pass gives each view's logit and
its class activation map (CAM) from the *same* pass::

    f    = ReLU(features(x))            # [N, K, h, w], K = 1664, h = w = S/32
    CAM  = Σ_k w_k · f_k                # the classifier's weights over the feature maps
    logit = mean_hw(CAM) + b            # exactly the network's own logit (pool, then linear)

Precision: on CUDA the weights run in bf16 with channels_last (optionally ``torch.compile``);
on a CPU, fp32 — or bf16 autocast with channels_last when the CPU has native bf16 (AVX-512 BF16
or AMX), where it is ≈3× faster. The CAM and the logit are always accumulated in fp32 from the
features. bf16 moves a logit by at most :data:`BF16_LOGIT_TOLERANCE` on the demo model (measured
2.8e-3 here, 8e-3 in FACTS.md; the tests assert the bound). On a CPU the features run as a
traced graph when the daemon asks for it (``[model] cpu_graph``): the same numbers, without
Python's GIL between operators.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import re
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal, cast

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from triage.logs import get_logger
from triage.scoring.card import SEEDED_INIT, CardError, ModelCard
from triage.scoring.result import ModelInfo

log = get_logger("triage.scoring.model")

Device = Literal["auto", "cpu", "cuda"]
Precision = Literal["auto", "fp32", "bf16"]

#: Largest |logit(bf16) − logit(fp32)| the tests accept on the demo model (measured ≤ 8e-3).
BF16_LOGIT_TOLERANCE = 0.03
#: Channels of DenseNet-169's last feature map (the classifier's input width).
FEATURE_CHANNELS = 1664

# torchvision's ImageNet files predate the module names: "denselayer1.norm.1.weight" is now
# "denselayer1.norm1.weight" (torchvision.models.densenet._load_state_dict does the same).
_LEGACY_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\."
    r"([12]\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$"
)


def build_densenet169(imagenet_weights: str | None = None) -> nn.Module:
    """torchvision's DenseNet-169 with a one-logit classifier.

    *imagenet_weights* is a local torchvision ImageNet state-dict file
    (``densenet169-b2777c0a.pth``); its feature weights are loaded strictly and its 1000-class
    classifier is dropped. Nothing is ever downloaded. Raises ``ValueError`` when the file does
    not hold DenseNet-169 features.
    """
    net = torchvision.models.densenet169(weights=None, num_classes=1)
    if imagenet_weights is not None:
        state = torch.load(imagenet_weights, map_location="cpu", weights_only=True)
        if not isinstance(state, dict):
            raise ValueError(f"{imagenet_weights}: not a state dict")
        features: dict[str, torch.Tensor] = {}
        for key, value in state.items():
            match = _LEGACY_KEY.match(key)
            if match:
                key = match.group(1) + match.group(2)
            if key.startswith("features."):
                features[key.removeprefix("features.")] = value
        problem = _state_dict_mismatch(net.features, features)
        if problem:
            raise ValueError(f"{imagenet_weights}: not DenseNet-169 ImageNet weights: {problem}")
        net.features.load_state_dict(features, strict=True)
    return net


def _state_dict_mismatch(module: nn.Module, state: dict[str, torch.Tensor]) -> str:
    """'' when *state* loads strictly into *module*, else one line saying which keys do not."""
    expected = module.state_dict()
    # Files older than PyTorch 0.4 have no num_batches_tracked; BatchNorm fills it in on load.
    missing = [k for k in expected if k not in state and not k.endswith(".num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} {_shape(state[k])} vs {list(v.shape)}"
        for k, v in expected.items()
        if k in state and (not isinstance(state[k], torch.Tensor) or state[k].shape != v.shape)
    ]

    def listing(label: str, items: list[str]) -> str:
        shown = ", ".join(items[:4]) + (f", … ({len(items)} in all)" if len(items) > 4 else "")
        return f"{label}: {shown}"

    parts = [
        listing(label, items)
        for label, items in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatch (file vs model)", shapes),
        )
        if items
    ]
    return "; ".join(parts)


def _shape(value: object) -> str:
    return str(list(value.shape)) if isinstance(value, torch.Tensor) else type(value).__name__


def _non_finite_tensors(state: dict[str, torch.Tensor]) -> list[str]:
    """The keys of *state* whose floating-point values are not all finite numbers."""
    return [
        key
        for key, value in state.items()
        if isinstance(value, torch.Tensor)
        and value.is_floating_point()
        and not bool(torch.isfinite(value).all())
    ]


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX-512 BF16, AMX, or Arm BF16).

    Without it oneDNN emulates bf16 and is *slower* than fp32 (measured here on AVX-512
    without BF16: 5.4 img/s bf16 vs 10.5 img/s fp32 at batch 8).
    """
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    for probe in probes:
        check = getattr(torch.cpu, probe, None)
        if check is not None and check():
            return True
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as handle:
            for line in handle:
                if line.lower().startswith(("flags", "features")):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})
    except OSError:
        pass
    return False


def resolve_device(device: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU; ``cuda`` without a GPU raises ``ValueError``."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        return torch.device("cpu")
    if device == "cuda" or device.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} asked for, but no CUDA device is available")
        return torch.device(device)
    raise ValueError(f"device must be auto, cpu or cuda (got {device!r})")


def resolve_precision(precision: str, device: torch.device) -> Literal["fp32", "bf16"]:
    """``auto`` → bf16 on CUDA with bf16 support and on CPUs with native bf16, else fp32."""
    if precision in ("fp32", "bf16"):
        return cast(Literal["fp32", "bf16"], precision)
    if precision != "auto":
        raise ValueError(f"precision must be auto, fp32 or bf16 (got {precision!r})")
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_native_bf16() else "fp32"


class ScoringModel:
    """A loaded DenseNet-169 that gives per-view logits and CAMs from one forward pass.

    Always in eval mode; every call runs under ``torch.inference_mode``. Call it from one
    thread (the worker's inference loop).
    """

    def __init__(
        self,
        net: nn.Module,
        card: ModelCard,
        device: torch.device,
        precision: Literal["fp32", "bf16"],
        compile: bool = False,
        cpu_graph: bool = False,
    ) -> None:
        """Wrap *net* (already holding the card's weights) for inference on *device*.

        *compile*: run the features through ``torch.compile``. *cpu_graph* (CPU only): run them
        as a traced graph (see :func:`_traced`); eager when tracing is not possible.
        """
        self.card = card
        self.device = device
        self.precision = precision
        net = net.eval().requires_grad_(False)
        classifier = cast(nn.Linear, net.classifier)
        if classifier.out_features != 1:
            raise ValueError("the network must have a one-logit classifier")
        # The CAM is accumulated in fp32 whatever the features' precision, so the CAM's mean
        # plus the bias is the logit to fp32 rounding.
        self._weight = classifier.weight.detach()[0].to(device=device, dtype=torch.float32)
        self._bias = float(classifier.bias.detach()[0])
        # For grey batches, normalised on the device as preprocess.normalise does it on a CPU:
        # float32 (x − mean) then × float32(1 / std), each rounded once — the same bits.
        self._norm_mean = torch.tensor(
            np.array(card.mean, dtype=np.float32).reshape(1, 3, 1, 1), device=device
        )
        self._norm_scale = torch.tensor(
            np.array([np.float32(1.0 / v) for v in card.std], dtype=np.float32).reshape(1, 3, 1, 1),
            device=device,
        )
        # channels_last pays off with bf16 kernels (CUDA, or oneDNN's native bf16 on a CPU); fp32
        # convolutions on a CPU were 3× slower in channels_last here, so they stay contiguous.
        self.channels_last = precision == "bf16"
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        features = net.features.to(device=device, memory_format=memory_format)
        # On CUDA the weights themselves are cast to bf16 (FACTS: 7,700 img/s at batch 256 on an
        # H200); on a CPU autocast runs oneDNN's bf16 kernels and leaves the fp32 weights alone.
        # Both gave the same logits to the last bit on the CPU here.
        self._cast_input: torch.dtype | None = None
        self._autocast: Callable[[], contextlib.AbstractContextManager[None]]
        if precision == "bf16" and device.type == "cuda":
            features = features.to(torch.bfloat16)
            self._cast_input = torch.bfloat16
            self._autocast = contextlib.nullcontext
        elif precision == "bf16":
            self._autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)
        else:
            self._autocast = contextlib.nullcontext
        self._features = features
        self._memory_format = memory_format
        # CUDA: views are staged in one of two reused pinned buffers and copied on their own
        # stream, so one batch's staging and copy overlap the previous batch's forward pass.
        self._copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._staging: list[torch.Tensor | None] = [None, None]
        self._staging_copied: list[torch.cuda.Event | None] = [None, None]
        self._next_slot = 0
        self.compiled = compile
        self.traced = False
        self._run: Callable[[torch.Tensor], torch.Tensor] = self._eager
        if compile:
            # Default mode: max-autotune took > 5 min on an H200 (FACTS), too slow for start-up.
            compiled = torch.compile(self._relu_features)
            self._run = lambda x: self._run_compiled(compiled, x)
        elif cpu_graph and device.type == "cpu":
            graph = _traced(features, self._autocast, card.input_size, memory_format)
            if graph is not None:
                self._run = lambda x: F.relu(graph(x))
                self.traced = True

    def warm_up(self, batch_size: int = 1) -> float:
        """Run one forward pass, which builds what a later one would otherwise build while
        studies wait; returns the seconds it took.

        The worker runs whatever batch size its decoded views make (1 to ``batch_size``, its
        ``[model] batch_size``). A compiled model builds its one graph, which serves every size
        (see :meth:`_run_compiled`; ~90 s on an H200), here, before the worker says it is
        ready, from a full batch: inductor sizes its kernels for the batch a graph is built
        from, and a full one is where throughput matters. Eager and traced models are warmed
        with one view (lazy initialisation; a traced graph profiles its first run).
        """
        started = time.perf_counter()
        blank = np.zeros((self.input_size, self.input_size), np.float32)
        views = max(1, batch_size) if self.compiled else 1
        self.forward(self.make_batch([blank] * views))
        return time.perf_counter() - started

    def _run_compiled(
        self, compiled: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor
    ) -> torch.Tensor:
        """*compiled* on *x* through one graph for every batch size (~90 s to build on an
        H200, FACTS).

        Dynamo would specialise the first batch size it sees and compile again, with the
        batch dimension dynamic, at the first other size: two graphs. Marked dynamic from the
        first call, the batch dimension gets one graph, but sizes 0 and 1 are always
        specialised, so a lone view runs as a batch of two (itself twice; views in a batch do
        not affect each other in eval mode) rather than building a graph of its own.
        """
        lone = x.shape[0] == 1
        if lone:
            x = torch.cat([x, x]).contiguous(memory_format=self._memory_format)
        torch._dynamo.maybe_mark_dynamic(x, 0)
        features = self._with_autocast(compiled, x)
        return features[:1] if lone else features

    def _relu_features(self, x: torch.Tensor) -> torch.Tensor:
        # features() ends in norm5; torchvision applies the (in-place) ReLU in forward().
        return F.relu(self._features(x))

    def _with_autocast(
        self, run: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor
    ) -> torch.Tensor:
        with self._autocast():
            return run(x)

    def _eager(self, x: torch.Tensor) -> torch.Tensor:
        return self._with_autocast(self._relu_features, x)

    @property
    def info(self) -> ModelInfo:
        """The model as results and SRs name it (from the card)."""
        return self.card.info

    @property
    def input_size(self) -> int:
        """Side of the square input the model expects."""
        return self.card.input_size

    @property
    def mean(self) -> tuple[float, float, float]:
        """Per-channel normalisation mean (for :func:`triage.scoring.preprocess.prepare_array`)."""
        return self.card.mean

    @property
    def std(self) -> tuple[float, float, float]:
        """Per-channel normalisation std (for :func:`triage.scoring.preprocess.prepare_array`)."""
        return self.card.std

    @property
    def bias(self) -> float:
        """The classifier bias: a view's logit is its CAM's spatial mean plus this."""
        return self._bias

    def make_batch(self, arrays: Sequence[np.ndarray]) -> torch.Tensor:
        """Stack prepared views into a batch, pinned for a CUDA copy: grey ones (float32
        [S, S] from :func:`~triage.scoring.preprocess.prepare_grey`, what the worker's decode
        processes send) into [N, S, S], normalised ones ([3, S, S]) into [N, 3, S, S]."""
        batch = torch.from_numpy(np.stack(arrays).astype(np.float32, copy=False))
        if self.device.type == "cuda":
            batch = batch.pin_memory()
        return batch

    def forward(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits [N] and CAMs [N, h, w] (both float32, on the CPU) for a batch [N, 3, S, S]
        (normalised), or [N, S, S] (grey, normalised here on the model's device: a third of
        the bytes to gather and copy, and the same input to the last bit as
        :func:`~triage.scoring.preprocess.prepare_array`'s).

        Each CAM is in logit units on the feature grid (7×7 at S = 224): its spatial mean plus
        :attr:`bias` is the view's logit, which equals the network's own output. Raises
        ``ValueError`` for a batch of another shape, or when a logit is not a finite number
        (a batch value that is not: :func:`~triage.scoring.preprocess.decode_view` never
        gives one).
        """
        return self._launch(batch).result()

    __call__ = forward

    def start(self, views: Sequence[np.ndarray]) -> PendingForward:
        """Start the forward pass of prepared views (grey float32 [S, S], as the worker's
        decode processes send them, or normalised [3, S, S]); its :meth:`PendingForward.result`
        is what :meth:`forward` returns for ``make_batch(views)``, to the last bit.

        On a CPU the pass is done when this returns. On CUDA it returns once the pass is
        queued: grey views are stacked straight into one of two reused pinned buffers (one
        copy, not a stack and then a pinned copy) and copied to the device on a stream of
        their own, so the caller can stage the next batch while this one runs. A pass may be
        started before the last one's result is taken; every other pass reuses a buffer, and
        waits (if it must) until the batch that was staged there has reached the device.
        """
        size = self.card.input_size
        if self._copy_stream is None or not all(np.shape(view) == (size, size) for view in views):
            return self._launch(self.make_batch(views))
        slot = self._next_slot
        self._next_slot = 1 - slot
        copied = self._staging_copied[slot]
        if copied is not None:
            copied.synchronize()  # the buffer's last batch has reached the device
        staging = self._staging[slot]
        if staging is None or len(staging) < len(views):
            # A power of two: batch sizes vary, and a pinned allocation is slow.
            capacity = 1 << (len(views) - 1).bit_length()
            staging = torch.empty((capacity, size, size), dtype=torch.float32).pin_memory()
            self._staging[slot] = staging
        batch = staging[: len(views)]
        np.stack(views, out=batch.numpy())
        pending = self._launch(batch)
        self._staging_copied[slot] = pending.copied
        return pending

    def _to_device(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        """*batch* on the model's device, and (CUDA) the event of its copy having finished.

        On CUDA the copy runs on its own stream, ordered before the forward pass on the
        current one, so it overlaps the pass queued before it."""
        if self._copy_stream is None:
            return batch.to(self.device), None
        with torch.cuda.stream(self._copy_stream):
            x = batch.to(self.device, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(self._copy_stream)
        compute = torch.cuda.current_stream(self.device)
        compute.wait_event(copied)
        x.record_stream(compute)  # allocated on the copy stream, used on this one
        return x, copied

    def _launch(self, batch: torch.Tensor) -> PendingForward:
        size = self.card.input_size
        grey = batch.ndim == 3 and tuple(batch.shape[1:]) == (size, size)
        if not grey and (
            batch.ndim != 4 or batch.shape[1] != 3 or tuple(batch.shape[2:]) != (size, size)
        ):
            raise ValueError(
                f"expected a batch [N, 3, {size}, {size}] or [N, {size}, {size}], got"
                f" {list(batch.shape)}"
            )
        with torch.inference_mode():
            x, copied = self._to_device(batch)
            if grey:
                x = (x.to(torch.float32).unsqueeze(1) - self._norm_mean) * self._norm_scale
            if self._cast_input is not None:
                x = x.to(self._cast_input)
            x = x.contiguous(memory_format=self._memory_format)
            features = self._run(x)
            cams = torch.einsum("nkhw,k->nhw", features.float(), self._weight)
            logits = cams.mean(dim=(1, 2)) + self._bias
            if copied is None:
                return PendingForward(logits, cams)
            # Into pinned memory, read once the event says the pass is done.
            done = torch.cuda.Event()
            logits = logits.to("cpu", non_blocking=True)
            cams = cams.to("cpu", non_blocking=True)
            done.record(torch.cuda.current_stream(self.device))
        return PendingForward(logits, cams, done, copied)

    def probabilities(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Probabilities [N] (sigmoid of the logits) and CAMs [N, h, w] from one forward pass."""
        logits, cams = self.forward(batch)
        return torch.sigmoid(logits), cams


class PendingForward:
    """A forward pass started by :meth:`ScoringModel.start` (or run by
    :meth:`ScoringModel.forward`); :meth:`result` waits for it on CUDA."""

    def __init__(
        self,
        logits: torch.Tensor,
        cams: torch.Tensor,
        done: torch.cuda.Event | None = None,
        copied: torch.cuda.Event | None = None,
    ) -> None:
        self._logits = logits
        self._cams = cams
        self._done = done
        #: CUDA: recorded once the batch has been copied to the device (its host buffer may
        #: then be reused).
        self.copied = copied

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits [N] and CAMs [N, h, w], float32 on the CPU (see
        :meth:`ScoringModel.forward`). Raises ``ValueError`` when a logit is not a finite
        number."""
        if self._done is not None:
            self._done.synchronize()
            self._done = None
        # Checked on the N logits rather than the input (on a GPU host that would be a pass
        # over 40 M values per batch): a NaN anywhere in a view's input reaches its logit,
        # and a NaN probability is not above any threshold, so it would read as normal.
        if not bool(torch.isfinite(self._logits).all()):
            raise ValueError(
                "the model gave a logit that is not a finite number (an input value that is"
                " not, or broken weights)"
            )
        return self._logits, self._cams


def _traced(
    features: nn.Module,
    autocast: Callable[[], contextlib.AbstractContextManager[None]],
    size: int,
    memory_format: torch.memory_format,
) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """*features* traced into a TorchScript graph (under *autocast*), or None if that fails.

    An eager forward returns to Python between operators and takes the GIL each time: beside
    one Python thread busy 20% of the time (what the worker's other threads do) a 1-thread bf16
    forward lost ~20% here; the traced graph runs its operators without the GIL and lost
    nothing, and alone it was ~5–10% faster. Its outputs equal the eager ones bit for bit, in
    fp32 and in bf16 (tests/test_model.py checks). ``torch.jit.trace`` is deprecated; of its
    successors, a ``torch.export`` program runs its operators from Python again, and
    ``torch.compile`` / AOTInductor compile C++ at start (a toolchain, and minutes on a small
    CPU host). When torch drops it, this returns None and the model runs eagerly.
    """
    trace = getattr(getattr(torch, "jit", None), "trace", None)
    if trace is None:
        return None
    example = torch.zeros(1, 3, size, size).contiguous(memory_format=memory_format)
    try:
        with warnings.catch_warnings(), torch.no_grad(), autocast():
            warnings.simplefilter("ignore")  # the deprecation notice, on every start
            graph = trace(features, example, check_trace=False)
    except Exception as exc:  # an op the tracer cannot record, or torch without TorchScript
        log.warning("cpu_graph_unavailable", error=f"{type(exc).__name__}: {exc}")
        return None
    try:
        # Frozen, the weights are constants of the graph: under bf16 autocast their
        # conversion to bf16 is done once instead of on every pass (2–9% less per view at
        # batch 2–16 here; fp32 unchanged). No numerics-changing rewrites (conv-BN folding),
        # so the outputs stay the eager ones bit for bit.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # deprecated like trace
            graph = torch.jit.freeze(graph.eval(), optimize_numerics=False)
    except Exception as exc:  # the unfrozen graph is still correct, only slower
        log.warning("cpu_graph_not_frozen", error=f"{type(exc).__name__}: {exc}")
    return cast(Callable[[torch.Tensor], torch.Tensor], graph)


def _load_weights(card: ModelCard) -> nn.Module:
    """The card's network on the CPU in fp32, with its weights checked against the card."""
    if card.init == SEEDED_INIT:
        # Deterministic: torchvision's initialisation under the card's seed, without touching
        # the caller's global random state.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cast(int, card.seed))
            return build_densenet169()
    weights = cast(Path, card.weights_path)
    try:
        blob = weights.read_bytes()
    except OSError as exc:
        raise CardError(
            f"model card {card.path}: weights file unreadable: {weights}: {exc.strerror or exc}"
        ) from None
    # Hash the very bytes that are loaded: the file may have changed since the card was read.
    if hashlib.sha256(blob).hexdigest() != card.weights_sha256:
        raise CardError(
            f"model card {card.path}: weights file {weights.name} changed: its sha256 no longer "
            "matches the card"
        )
    try:
        state = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a file that is not a state dict
        message = " ".join(str(exc).split())[:200]
        raise CardError(
            f"model card {card.path}: weights file {weights.name} is not a torch state dict: "
            f"{type(exc).__name__}: {message}"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise CardError(
            f"model card {card.path}: weights file {weights.name} is not a state dict "
            f"(got {type(state).__name__})"
        )
    net = build_densenet169()
    problem = _state_dict_mismatch(net, state)
    if problem:
        raise CardError(
            f"model card {card.path}: weights do not fit {card.architecture}: {problem}"
        )
    not_finite = _non_finite_tensors(state)
    if not_finite:
        # A run that diverged: every view would score NaN (which is not above any threshold).
        raise CardError(
            f"model card {card.path}: weights file {weights.name} holds values that are not "
            f"finite numbers (NaN or infinity) in {len(not_finite)} tensors, e.g. {not_finite[0]}"
        )
    try:
        # Not strict: the check above is, but for num_batches_tracked, which eval never uses
        # (a file saved without it loads with the module's own).
        net.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # what the check above lets through
        message = " ".join(str(exc).split())[:200]
        raise CardError(
            f"model card {card.path}: weights do not fit {card.architecture}: {message}"
        ) from None
    return net


def load_model(
    card: ModelCard,
    device: str = "auto",
    precision: str = "auto",
    compile: bool = False,
    cpu_graph: bool = False,
) -> ScoringModel:
    """Load the card's weights into a :class:`ScoringModel` on *device* at *precision*.

    *device*: ``auto`` (CUDA if available, else CPU), ``cpu`` or ``cuda``. *precision*:
    ``auto`` (bf16 on CUDA and on CPUs with native bf16, else fp32), ``fp32`` or ``bf16``.
    *compile* wraps the feature extractor in ``torch.compile`` (CUDA start-up costs ~90 s).
    *cpu_graph* runs it as a traced graph on a CPU (same results, no GIL between operators).
    Raises :class:`CardError` when the weights do not check out or do not fit the architecture,
    ``ValueError`` for a bad device or precision.
    """
    resolved = resolve_device(device)
    chosen = resolve_precision(precision, resolved)
    net = _load_weights(card)
    return ScoringModel(net, card, resolved, chosen, compile=compile, cpu_graph=cpu_graph)


__all__ = [
    "BF16_LOGIT_TOLERANCE",
    "FEATURE_CHANNELS",
    "PendingForward",
    "ScoringModel",
    "build_densenet169",
    "cpu_has_native_bf16",
    "load_model",
    "resolve_device",
    "resolve_precision",
]
