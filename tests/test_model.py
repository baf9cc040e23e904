"""The scoring model: parity with plain torchvision, CAM identity, bf16 bound, loading."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from triage.scoring.card import CardError, ModelCard, load_card, write_card
from triage.scoring.model import (
    BF16_LOGIT_TOLERANCE,
    FEATURE_CHANNELS,
    ScoringModel,
    build_densenet169,
    cpu_has_native_bf16,
    load_model,
    resolve_precision,
)
from triage.scoring.preprocess import prepare_array, prepare_grey

REPO = Path(__file__).resolve().parents[1]
DEMO_CARD = REPO / "models" / "demo"
#: fp32 batch vs single-image forward: only summation order differs.
FP32_LOGIT_TOLERANCE = 1e-4


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Two shared cores: one thread keeps these tests from starving everyone else's.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _image(seed: int, rows: int, columns: int) -> np.ndarray:
    """A radiograph-like 8-bit image: a bright 'bone' band on soft tissue, with noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:rows, 0:columns]
    angle = rng.uniform(-0.6, 0.6)
    distance = np.abs((x - columns / 2) * np.cos(angle) + (y - rows / 2) * np.sin(angle))
    image = 0.25 + 0.55 * (distance < columns * rng.uniform(0.08, 0.2))
    image += 0.1 * np.sin(y / rng.uniform(5, 20)) + rng.normal(0, 0.03, (rows, columns))
    return (np.clip(image, 0, 1) * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def batch() -> torch.Tensor:
    """Three views of different sizes, prepared the way the daemon prepares them."""
    card = load_card(DEMO_CARD)
    shapes = [(512, 400), (300, 300), (640, 480)]
    arrays = [
        prepare_array(_image(seed, *shape), card.input_size, card.mean, card.std)
        for seed, shape in enumerate(shapes)
    ]
    return torch.from_numpy(np.stack(arrays))


@pytest.fixture(scope="module")
def grey_batch() -> torch.Tensor:
    """The views of :func:`batch` before normalisation, as the worker's decode processes
    send them."""
    card = load_card(DEMO_CARD)
    shapes = [(512, 400), (300, 300), (640, 480)]
    arrays = [
        prepare_grey(_image(seed, *shape), card.input_size) for seed, shape in enumerate(shapes)
    ]
    return torch.from_numpy(np.stack(arrays))


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, ModelCard]:
    """A DenseNet-169 with distinct weights saved to a file, and a card for it.

    The classifier and the last batch norm are randomised so logits differ clearly from view to
    view (torchvision's initialisation gives nearly the same logit for every input).
    """
    folder = tmp_path_factory.mktemp("trained")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        net = build_densenet169()
        with torch.no_grad():
            net.classifier.weight.normal_(0, 0.02)
            net.classifier.bias.fill_(-0.3)
            net.features.norm5.weight.uniform_(0.5, 1.5)
            net.features.norm5.bias.normal_(0, 0.2)
    torch.save(net.state_dict(), folder / "weights.pt")
    card = write_card(
        folder,
        name="test-densenet",
        version="1",
        weights_file=folder / "weights.pt",
        training_data="synthetic test weights",
    )
    return net.eval(), card


def _plain_logits(net: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """One image at a time through torchvision's own forward, fp32."""
    with torch.inference_mode():
        return torch.cat([net(batch[i : i + 1]).flatten() for i in range(len(batch))])


def test_fp32_batch_matches_single_image_torchvision(trained, batch):
    net, card = trained
    model = load_model(card, device="cpu", precision="fp32")
    assert (model.device.type, model.precision) == ("cpu", "fp32")
    probabilities, cams = model.probabilities(batch)
    assert cams.shape == (3, 7, 7)
    reference = torch.sigmoid(_plain_logits(net, batch))
    assert probabilities.dtype == torch.float32 and probabilities.shape == (3,)
    torch.testing.assert_close(probabilities, reference, atol=FP32_LOGIT_TOLERANCE / 4, rtol=0)
    # The views differ by far more than the tolerance, so the comparison tells them apart.
    assert float(reference.max() - reference.min()) > 100 * FP32_LOGIT_TOLERANCE


def test_cam_is_the_classifier_over_the_relu_features(trained, batch):
    net, card = trained
    model = load_model(card, device="cpu", precision="fp32")
    logits, cams = model.forward(batch)
    assert cams.shape == (3, 7, 7) and cams.dtype == torch.float32
    # Identity: the CAM's spatial mean plus the bias is the logit, and that is torchvision's.
    torch.testing.assert_close(cams.mean(dim=(1, 2)) + model.bias, logits, atol=1e-6, rtol=0)
    torch.testing.assert_close(logits, _plain_logits(net, batch), atol=FP32_LOGIT_TOLERANCE, rtol=0)
    # The map itself, from features caught by a forward hook on the plain network.
    caught: list[torch.Tensor] = []
    handle = net.features.register_forward_hook(lambda _m, _i, out: caught.append(out.clone()))
    try:
        with torch.inference_mode():
            net(batch)
    finally:
        handle.remove()
    features = torch.relu(caught[0])
    assert features.shape[1] == FEATURE_CHANNELS
    expected = torch.einsum("nkhw,k->nhw", features, net.classifier.weight[0])
    torch.testing.assert_close(cams, expected, atol=1e-5, rtol=1e-5)
    assert model.bias == pytest.approx(-0.3)


def test_demo_card_is_torchvision_init_under_its_seed(batch):
    card = load_card(DEMO_CARD)
    state = torch.random.get_rng_state()
    first = load_model(card, device="cpu", precision="fp32")
    # Loading does not disturb the caller's random state.
    assert torch.equal(torch.random.get_rng_state(), state)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(card.seed)
        reference = build_densenet169().eval()
    logits, _ = first.forward(batch[:2])
    torch.testing.assert_close(logits, _plain_logits(reference, batch[:2]), atol=1e-4, rtol=0)
    assert first.info == card.info and not first.info.validated


def test_bf16_within_its_bound_of_fp32_single_image_torchvision(batch):
    card = load_card(DEMO_CARD)
    model = load_model(card, device="cpu", precision="bf16")
    assert model.precision == "bf16" and model.channels_last
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(card.seed)
        reference = build_densenet169().eval()
    plain = _plain_logits(reference, batch)
    logits, cams = model.forward(batch)
    gap = float((logits - plain).abs().max())
    assert gap <= BF16_LOGIT_TOLERANCE, f"bf16 moved a logit by {gap:.4f}"
    probabilities, _ = model.probabilities(batch)
    # sigmoid' ≤ 1/4, so the probabilities are within a quarter of the logit bound.
    assert float((probabilities - torch.sigmoid(plain)).abs().max()) <= BF16_LOGIT_TOLERANCE / 4
    torch.testing.assert_close(cams.mean(dim=(1, 2)) + model.bias, logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cpu_graph_gives_the_eager_results_bit_for_bit(batch, precision):
    card = load_card(DEMO_CARD)
    eager = load_model(card, device="cpu", precision=precision)
    graph = load_model(card, device="cpu", precision=precision, cpu_graph=True)
    assert graph.traced and not eager.traced
    for views in (batch, batch[:1]):  # a traced graph takes any batch size
        eager_logits, eager_cams = eager.forward(views)
        logits, cams = graph.forward(views)
        assert torch.equal(logits, eager_logits) and torch.equal(cams, eager_cams)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_batch_with_a_value_that_is_not_a_number_is_refused(batch, precision):
    model = load_model(load_card(DEMO_CARD), device="cpu", precision=precision, cpu_graph=True)
    broken = batch[:2].clone()
    broken[1, 1, 5, 7] = float("nan")
    with pytest.raises(ValueError, match="not a finite number"):
        model.forward(broken)
    logits, _ = model.forward(batch[:2])  # the same model, finite inputs: finite logits
    assert bool(torch.isfinite(logits).all())


def test_cpu_graph_runs_unfrozen_when_freezing_fails(batch, monkeypatch):
    def refuse(*args, **kwargs):
        raise RuntimeError("no freezing here")

    card = load_card(DEMO_CARD)
    eager = load_model(card, device="cpu", precision="fp32")
    monkeypatch.setattr(torch.jit, "freeze", refuse)
    model = load_model(card, device="cpu", precision="fp32", cpu_graph=True)
    assert model.traced
    logits, cams = model.forward(batch[:1])
    eager_logits, eager_cams = eager.forward(batch[:1])
    assert torch.equal(logits, eager_logits) and torch.equal(cams, eager_cams)


def test_cpu_graph_falls_back_to_eager_when_tracing_fails(batch, monkeypatch):
    def refuse(*args, **kwargs):
        raise RuntimeError("no tracing here")

    monkeypatch.setattr(torch.jit, "trace", refuse)
    card = load_card(DEMO_CARD)
    model = load_model(card, device="cpu", precision="fp32", cpu_graph=True)
    assert not model.traced
    logits, _ = model.forward(batch[:1])
    assert logits.shape == (1,)


def test_auto_precision_follows_the_hardware():
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == ("bf16" if cpu_has_native_bf16() else "fp32")
    assert resolve_precision("fp32", cpu) == "fp32"
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("fp16", cpu)


def test_bad_device_is_refused():
    card = load_card(DEMO_CARD)
    with pytest.raises(ValueError, match="device"):
        load_model(card, device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            load_model(card, device="cuda")


@pytest.mark.parametrize(("precision", "graph"), [("fp32", False), ("fp32", True), ("bf16", True)])
def test_grey_views_normalised_by_the_model_give_the_same_bits(batch, grey_batch, precision, graph):
    # The worker sends grey views and the model normalises them: the logits and CAMs must be
    # those of prepare_array's normalised input, to the last bit.
    model = load_model(load_card(DEMO_CARD), device="cpu", precision=precision, cpu_graph=graph)
    grey = model.make_batch(list(grey_batch.numpy()))
    assert grey.shape == (3, 224, 224)
    logits, cams = model.forward(grey)
    normalised_logits, normalised_cams = model.forward(batch)
    assert torch.equal(logits, normalised_logits) and torch.equal(cams, normalised_cams)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_grey_views_give_the_normalised_views_results(batch, grey_batch):
    model = load_model(load_card(DEMO_CARD), device="auto", precision="auto")
    logits, cams = model.forward(model.make_batch(list(grey_batch.numpy())))
    normalised_logits, normalised_cams = model.forward(model.make_batch(list(batch.numpy())))
    assert torch.equal(logits, normalised_logits) and torch.equal(cams, normalised_cams)


def test_forward_checks_the_batch_shape():
    model = load_model(load_card(DEMO_CARD), device="cpu", precision="fp32")
    with pytest.raises(ValueError, match=r"expected a batch \[N, 3, 224, 224\]"):
        model.forward(torch.zeros(1, 3, 128, 128))
    with pytest.raises(ValueError, match=r"or \[N, 224, 224\]"):
        model.forward(torch.zeros(2, 128, 128))
    batch = model.make_batch([np.zeros((3, 224, 224), np.float32)] * 2)
    assert batch.shape == (2, 3, 224, 224) and batch.dtype == torch.float32


def test_imagenet_weights_file_loads_features_and_drops_its_classifier(tmp_path: Path):
    # torchvision's ImageNet file uses the old "norm.1" key names, has no num_batches_tracked
    # (it predates PyTorch 0.4) and a 1000-class classifier.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        imagenet = build_densenet169()
    state = {
        re.sub(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.", r"\1.\2.", key): value
        for key, value in imagenet.state_dict().items()
        if not key.startswith("classifier.") and not key.endswith("num_batches_tracked")
    }
    assert "features.denseblock1.denselayer1.norm.1.weight" in state
    state["classifier.weight"] = torch.zeros(1000, FEATURE_CHANNELS)
    state["classifier.bias"] = torch.zeros(1000)
    path = tmp_path / "densenet169-imagenet.pth"
    torch.save(state, path)
    net = build_densenet169(str(path))
    assert net.classifier.out_features == 1
    loaded = net.features.state_dict()
    for key, value in imagenet.features.state_dict().items():
        assert torch.equal(loaded[key], value), key
    torch.save({"features.conv0.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="missing keys"):
        build_densenet169(str(tmp_path / "other.pth"))


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
        ),
    ],
)
def test_passes_started_ahead_give_what_forward_gives(grey_batch, batch, device):
    # On CUDA start() returns once the pass is queued, from one of two reused pinned buffers:
    # two passes in flight, a third reusing the first's buffer, a larger batch growing one,
    # and normalised views (not staged) in between must each give forward()'s very bits.
    model = load_model(load_card(DEMO_CARD), device=device, precision="auto")
    views = list(grey_batch.numpy())
    batches = [views[:2], views[1:], views * 3, views[2:], list(batch.numpy())]
    expected = [model.forward(model.make_batch(arrays)) for arrays in batches]
    first, second = model.start(batches[0]), model.start(batches[1])
    got = [first.result()]
    third = model.start(batches[2])
    got += [second.result(), third.result()]
    fourth, fifth = model.start(batches[3]), model.start(batches[4])
    got += [fourth.result(), fifth.result()]
    for (logits, cams), (expected_logits, expected_cams) in zip(got, expected, strict=True):
        assert logits.device.type == "cpu" and cams.device.type == "cpu"
        assert torch.equal(logits, expected_logits) and torch.equal(cams, expected_cams)


def test_a_started_pass_that_gives_a_logit_that_is_not_finite_says_so():
    model = load_model(load_card(DEMO_CARD), device="cpu", precision="fp32")
    pending = model.start([np.full((224, 224), np.nan, np.float32)])
    with pytest.raises(ValueError, match="not a finite number"):
        pending.result()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_channels_last_within_bound(batch):
    card = load_card(DEMO_CARD)
    model = load_model(card, device="auto", precision="auto")
    assert model.device.type == "cuda" and model.precision == "bf16" and model.channels_last
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(card.seed)
        reference = build_densenet169().eval()
    logits, cams = model.forward(model.make_batch(list(batch.numpy())))
    assert logits.device.type == "cpu" and cams.shape == (3, 7, 7)
    gap = float((logits - _plain_logits(reference, batch)).abs().max())
    assert gap <= BF16_LOGIT_TOLERANCE, f"bf16 on CUDA moved a logit by {gap:.4f}"


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (~90 s compile)")
def test_cuda_compiled_matches_eager(batch):
    # On a CPU compiling DenseNet-169 takes minutes (386 s on the 2 shared cores here; it matched
    # eager fp32 to 6e-8), so the compiled path is tested where it is used: on CUDA.
    card = load_card(DEMO_CARD)
    eager = load_model(card, device="cuda", precision="bf16")
    compiled = load_model(card, device="cuda", precision="bf16", compile=True)
    torch.testing.assert_close(
        compiled.forward(batch)[0], eager.forward(batch)[0], atol=BF16_LOGIT_TOLERANCE, rtol=0
    )


class _SmallNet(torch.nn.Module):
    """The shape of a DenseNet as ScoringModel uses it (features → ReLU → one logit), small
    enough to compile on a CPU in seconds."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(3, 4, kernel_size=32, stride=32), torch.nn.BatchNorm2d(4)
        )
        self.classifier = torch.nn.Linear(4, 1)


@pytest.mark.slow
def test_a_compiled_model_builds_its_one_graph_while_it_warms_up(monkeypatch):
    # On a CPU compiling DenseNet-169 takes minutes (see below); which graphs dynamo builds
    # depends on the batch sizes, not on the network, so a small one shows it. Each graph
    # costs ~90 s on an H200: left to itself, dynamo builds one for the first size and
    # another at the second, and another for a batch of 1 when that comes later.
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    try:
        card = load_card(DEMO_CARD)
        net = _SmallNet()
        compiled = ScoringModel(net, card, torch.device("cpu"), "fp32", compile=True)
        eager = ScoringModel(net, card, torch.device("cpu"), "fp32")
        before = counters["stats"]["unique_graphs"]
        sizes: list[int] = []
        forward = compiled.forward
        with monkeypatch.context() as patch:
            patch.setattr(compiled, "forward", lambda b: sizes.append(len(b)) or forward(b))
            compiled.warm_up(16)
        assert sizes == [16]  # built from a full batch: inductor sizes its kernels for it
        built = counters["stats"]["unique_graphs"] - before
        assert built == 1  # the batch dimension dynamic; a lone view runs as a batch of 2
        rng = np.random.default_rng(0)
        for size in (3, 1, 16, 2, 7, 1):
            grey = torch.from_numpy(rng.random((size, 224, 224), dtype=np.float32))
            logits, cams = compiled.forward(grey)
            expected_logits, expected_cams = eager.forward(grey)
            torch.testing.assert_close(logits, expected_logits, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(cams, expected_cams, atol=1e-5, rtol=1e-5)
        assert counters["stats"]["unique_graphs"] - before == built
    finally:
        torch._dynamo.reset()


_COMPILE_AND_COUNT = """
import sys
import torch
from torch._dynamo.utils import counters
from triage.scoring.card import load_card
from triage.scoring.model import ScoringModel

torch.manual_seed(0)
net = torch.nn.Module()
net.features = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 32, 32), torch.nn.BatchNorm2d(4))
net.classifier = torch.nn.Linear(4, 1)
model = ScoringModel(net, load_card(sys.argv[1]), torch.device("cpu"), "fp32", compile=True)
model.warm_up()
print(counters["inductor"]["fxgraph_cache_hit"], counters["inductor"]["fxgraph_cache_miss"])
"""


@pytest.mark.slow
def test_a_compiled_model_is_loaded_from_the_cache_by_the_next_process(tmp_path: Path):
    # The systemd units keep TORCHINDUCTOR_CACHE_DIR across restarts (deploy/): the next
    # process (a restart, another instance) loads the graph compiled before, not compiling
    # it again (~90 s on an H200), including through ScoringModel's dynamic batch dimension.
    env = {
        **os.environ,
        "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache"),
        "PYTHONPATH": str(REPO),
    }
    counts = []
    for _ in range(2):
        run = subprocess.run(
            [sys.executable, "-c", _COMPILE_AND_COUNT, str(DEMO_CARD)],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=True,
        )
        counts.append(tuple(int(n) for n in run.stdout.split()[-2:]))
    assert counts == [(0, 1), (1, 0)]  # (hits, misses): compiled once, then loaded


def test_an_eager_model_warms_up_with_one_batch(monkeypatch):
    model = ScoringModel(_SmallNet(), load_card(DEMO_CARD), torch.device("cpu"), "fp32")
    sizes: list[int] = []
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda batch: sizes.append(len(batch)) or forward(batch))
    assert model.warm_up(16) >= 0  # the worker's batch size matters only to a compiled one
    assert sizes == [1]


def test_scoring_model_requires_one_logit(trained):
    _, card = trained
    net = build_densenet169()
    net.classifier = torch.nn.Linear(FEATURE_CHANNELS, 2)
    with pytest.raises(ValueError, match="one-logit"):
        ScoringModel(net, card, torch.device("cpu"), "fp32")


def test_mismatched_weights_raise_card_error_naming_keys(tmp_path: Path):
    net = build_densenet169()
    net.classifier = torch.nn.Linear(FEATURE_CHANNELS, 1000)  # an ImageNet head left on
    state = net.state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state["features.norm5.bias"]
    torch.save(state, tmp_path / "weights.pt")
    card = write_card(
        tmp_path, name="m", version="1", weights_file=tmp_path / "weights.pt", training_data="x"
    )
    with pytest.raises(CardError) as caught:
        load_model(card, device="cpu", precision="fp32")
    message = str(caught.value)
    assert "\n" not in message
    assert "weights do not fit densenet169" in message
    assert "missing keys: features.norm5.bias" in message
    assert "unexpected keys: extra.weight" in message
    assert "classifier.weight [1000, 1664] vs [1, 1664]" in message


def test_weights_changed_after_the_card_was_read(trained, tmp_path: Path):
    _, card = trained
    copy = tmp_path / "weights.pt"
    copy.write_bytes(card.weights_path.read_bytes())
    loaded = write_card(
        tmp_path, name="m", version="1", weights_file=copy, training_data="synthetic"
    )
    copy.write_bytes(copy.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(CardError, match="changed: its sha256 no longer matches"):
        load_model(loaded, device="cpu", precision="fp32")


def _card_for(tmp_path: Path, state: dict) -> ModelCard:
    torch.save(state, tmp_path / "weights.pt")
    return write_card(
        tmp_path, name="m", version="1", weights_file=tmp_path / "weights.pt", training_data="x"
    )


def test_weights_that_are_not_finite_numbers_are_refused(tmp_path: Path):
    state = build_densenet169().state_dict()
    state["features.denseblock4.denselayer32.conv2.weight"][0, 0, 0, 0] = float("nan")
    card = _card_for(tmp_path, state)
    with pytest.raises(CardError, match="holds values that are not finite numbers") as caught:
        load_model(card, device="cpu", precision="fp32")
    assert "denselayer32.conv2.weight" in str(caught.value)


def test_a_value_that_is_not_a_tensor_is_named_in_one_line(tmp_path: Path):
    state = build_densenet169().state_dict()
    state["classifier.bias"] = 0.0
    with pytest.raises(CardError, match=re.escape("classifier.bias float vs [1]")) as caught:
        load_model(_card_for(tmp_path, state), device="cpu", precision="fp32")
    assert "\n" not in str(caught.value)


def test_weights_saved_without_batch_counters_load(tmp_path: Path):
    net = build_densenet169()
    state = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    model = load_model(_card_for(tmp_path, state), device="cpu", precision="fp32")
    assert model.card.name == "m"


def test_weights_file_that_is_not_a_state_dict(tmp_path: Path):
    (tmp_path / "weights.pt").write_bytes(b"definitely not a zip or pickle")
    card = write_card(
        tmp_path, name="m", version="1", weights_file=tmp_path / "weights.pt", training_data="x"
    )
    with pytest.raises(CardError, match="is not a torch state dict") as caught:
        load_model(card, device="cpu", precision="fp32")
    assert "\n" not in str(caught.value)
