"""Flow transforms and the flow model: exact inverses, log-determinants against autograd Jacobians,
normalisation of a 2-D density, the spline's boundaries, autocast. Peers as oracles: test_flows_oracles.py."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from genlab.core.registry import build
from genlab.metrics.likelihood import bits_per_dim_of, quantize
from genlab.models.flows import (IAF, MAF, ActNorm, AdditiveCoupling, AffineCoupling, BatchNormFlow, DiagonalScaling,
                                 FactorOut, Flow, FlowChain, FlowTransform, GlowCoupling, GlowStep, InvertibleConv1x1,
                                 SplineAutoregressive, SplineCoupling, Squeeze, rq_spline)
from genlab.testing.devices import DeviceAudit, generator_on


def _perturbed(t: FlowTransform, seed: int = 0, scale: float = 0.3) -> FlowTransform:
    """t in float64 and eval mode with every parameter moved off its (identity) initialisation."""
    g = torch.Generator().manual_seed(seed)
    t = t.double().eval()
    with torch.no_grad():
        for p in t.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
        for m in t.modules():
            if isinstance(m, BatchNormFlow):
                m.running_mean.normal_(generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
    return t


CASES: dict[str, tuple[Callable[[], FlowTransform], tuple[int, ...]]] = {
    "additive_vec": (lambda: AdditiveCoupling([4], "checkerboard", 1, hidden=8), (4,)),
    "additive_img_channel": (lambda: AdditiveCoupling([2, 4, 4], "channel", 0, hidden=4), (2, 4, 4)),
    "affine_vec_channel": (lambda: AffineCoupling([4], "channel", 1, hidden=8), (4,)),
    "affine_img_checkerboard": (lambda: AffineCoupling([2, 4, 4], "checkerboard", 0, hidden=4), (2, 4, 4)),
    "affine_img_channel": (lambda: AffineCoupling([2, 2, 2], "channel", 1, hidden=4), (2, 2, 2)),
    "diagonal_scaling": (lambda: DiagonalScaling([3]), (3,)),
    "actnorm_vec": (lambda: ActNorm(3), (3,)),
    "actnorm_img": (lambda: ActNorm(2), (2, 2, 3)),
    "batch_norm_vec": (lambda: BatchNormFlow(3), (3,)),
    "batch_norm_img": (lambda: BatchNormFlow(2), (2, 2, 2)),
    "conv1x1": (lambda: InvertibleConv1x1(3), (3, 2, 2)),
    "glow_coupling_affine": (lambda: GlowCoupling(3, hidden=4), (3, 2, 2)),
    "glow_coupling_additive": (lambda: GlowCoupling(2, hidden=4, kind="additive"), (2, 2, 2)),
    "glow_step": (lambda: GlowStep(2, hidden=4), (2, 2, 2)),
    "squeeze": (lambda: Squeeze(), (1, 4, 2)),
    "factor_out": (lambda: FactorOut([AffineCoupling([2, 2, 2], "checkerboard", 0, hidden=4)]), (4, 2, 2)),
    "spline_coupling": (lambda: SplineCoupling(4, bins=5, bound=2.0, hidden=8), (4,)),
    "maf": (lambda: MAF(3, hidden=8, reverse=True), (3,)),
    "iaf": (lambda: IAF(3, hidden=8), (3,)),
    "spline_autoregressive": (lambda: SplineAutoregressive(3, bins=4, bound=2.0, hidden=8), (3,)),
    "realnvp_multiscale": (lambda: FlowChain([
        AffineCoupling([1, 4, 4], "checkerboard", 0, hidden=4), Squeeze(), AffineCoupling([4, 2, 2], "channel", 1, hidden=4),
        FactorOut([AffineCoupling([2, 2, 2], "checkerboard", 1, hidden=4), BatchNormFlow(2)])]), (1, 4, 4)),
    "chain": (lambda: FlowChain([AffineCoupling([3], "checkerboard", 0, hidden=8), MAF(3, hidden=8),
                                 SplineCoupling(3, bins=4, bound=2.0, hidden=8, parity=1)]), (3,)),
}


def _x(shape: tuple[int, ...], batch: int = 3, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 1.5 * torch.randn((batch, *shape), generator=g, dtype=torch.float64)


@pytest.mark.parametrize("name", CASES)
def test_inverse_and_logdet(name: str) -> None:
    make, shape = CASES[name]
    t, x = _perturbed(make()), _x(shape)
    z, logdet = t(x)
    x_back, inv_logdet = t.inverse(z)
    assert z.numel() == x.numel() and logdet.shape == (3,) and inv_logdet.shape == (3,)
    assert z.shape != x.shape or not torch.allclose(z, x)  # the transform does something
    torch.testing.assert_close(x_back, x, atol=1e-10, rtol=0)
    torch.testing.assert_close(inv_logdet, -logdet, atol=1e-10, rtol=0)
    for i in range(len(x)):  # log|det J| per sample from autograd
        jac = torch.autograd.functional.jacobian(lambda v: t(v[None])[0].flatten(), x[i])
        jac = jac.reshape(x[i].numel(), x[i].numel())
        assert abs(float(torch.linalg.slogdet(jac).logabsdet - logdet[i].detach())) < 1e-8, name


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_finite(name: str, dtype: torch.dtype) -> None:
    make, shape = CASES[name]
    t = _perturbed(make()).float()
    with torch.autocast("cpu", dtype=dtype):
        z, logdet = t(_x(shape).float())
        x, inv = t.inverse(z.float())
    assert all(bool(v.isfinite().all()) for v in (z, logdet, x, inv)), name


def test_chain_sums_and_reverses() -> None:
    a, b = _perturbed(AffineCoupling([2], "checkerboard", 0, hidden=4)), _perturbed(MAF(2, hidden=4), seed=2)
    x = _x((2,))
    z_a, ld_a = a(x)
    z_b, ld_b = b(z_a)
    z, ld = FlowChain([a, b])(x)
    torch.testing.assert_close(z, z_b)
    torch.testing.assert_close(ld, ld_a + ld_b)
    torch.testing.assert_close(FlowChain([a, b]).inverse(z)[0], a.inverse(b.inverse(z)[0])[0])


def _flow_2d() -> Flow:
    return _perturbed(Flow([2], [AffineCoupling([2], "checkerboard", 0, hidden=8), SplineCoupling(2, bins=4, bound=3.0,
                                                                                                   hidden=8),
                                 MAF(2, hidden=8, reverse=True), ActNorm(2)]), scale=0.2)


def test_density_integrates_to_one() -> None:
    flow, n, lim = _flow_2d(), 500, 9.0
    h = 2 * lim / n
    u = -lim + h * (torch.arange(n, dtype=torch.float64) + 0.5)  # midpoints
    grid = torch.stack(torch.meshgrid(u, u, indexing="ij"), -1).reshape(-1, 2)
    with torch.no_grad():
        mass = flow.log_prob(grid).exp().sum() * h * h
    assert abs(float(mass) - 1) < 1e-3


def test_log_prob_change_of_variables_and_bits_per_dim() -> None:
    flow, x = _flow_2d(), _x((2,))
    z, logdet = flow(x)
    expected = -0.5 * z.square().sum(1) - math.log(2 * math.pi) + logdet
    torch.testing.assert_close(flow.log_prob(x), expected)
    torch.testing.assert_close(flow.bits_per_dim(x), -expected / (2 * math.log(2)))


def test_sample_generator_device_dtype_temperature() -> None:
    flow = _flow_2d()
    a = flow.sample(5, generator=torch.Generator().manual_seed(3))
    b = flow.sample(5, generator=torch.Generator().manual_seed(3))
    assert a.dtype == torch.float64 and a.shape == (5, 2)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(flow.sample(2, temperature=0.0), flow.inverse(torch.zeros(2, 2, dtype=torch.float64))[0])


def test_draws_and_tensors_on_the_models_device() -> None:
    """On the ``meta`` device: every draw on the generator's device, no CPU tensor mixed in, no value read
    on the host (sampling with the sequential inverses of MAF and the spline, log_prob, IAF's forward)."""
    flow = Flow([2], [AffineCoupling([2], hidden=4), ActNorm(2), SplineCoupling(2, bins=3, hidden=4), MAF(2, hidden=4),
                      IAF(2, hidden=4), SplineAutoregressive(2, bins=3, hidden=4), BatchNormFlow(2),
                      InvertibleConv1x1(2), DiagonalScaling([2])], num_classes=2).eval().to("meta")
    labels = torch.zeros(3, dtype=torch.long, device="meta")
    with DeviceAudit() as audit:
        x = flow.sample(3, labels, generator_on("meta"))
        log_p = flow.log_prob(x, labels)
    assert (x.device.type, x.shape, log_p.shape, audit.draws) == ("meta", (3, 2), (3,), 1)


def test_bits_per_dim_of_discrete_images() -> None:
    """A flow is a Likelihood: bits/dim of 8-bit images with uniform dequantisation (the shared helper)."""
    flow = _perturbed(Flow([1, 2, 2], [AffineCoupling([1, 2, 2], hidden=4), Squeeze(), GlowStep(4, hidden=4)]))
    x = quantize(_x((1, 2, 2)).clamp(-1, 1), 256)
    bpd = bits_per_dim_of(flow, x, generator=torch.Generator().manual_seed(0))
    assert bpd.shape == (3,) and bool(bpd.isfinite().all())


def test_class_conditional_base() -> None:
    flow = Flow([2], [AffineCoupling([2], hidden=4)], num_classes=3).double()
    with torch.no_grad():
        flow.prior.weight.copy_(torch.tensor([[0.0, 0, 0, 0], [2.0, -1, 0.5, 0], [0, 0, 0, 0]]))
    x, c = _x((2,)), torch.tensor([1, 1, 0])
    mu, sigma = torch.tensor([2.0, -1.0], dtype=torch.float64), torch.tensor([math.exp(0.5), 1.0], dtype=torch.float64)
    expected = torch.distributions.Normal(mu, sigma).log_prob(x).sum(1)
    torch.testing.assert_close(flow.log_prob(x, c)[:2], expected[:2])
    s = flow.sample(4000, torch.ones(4000, dtype=torch.long), torch.Generator().manual_seed(0))
    assert float((s.mean(0) - mu).abs().max()) < 0.1
    with pytest.raises(ValueError, match="class labels"):
        flow.log_prob(x)


def test_actnorm_data_dependent_init() -> None:
    x = 3 + 2 * _x((2, 4, 4), batch=8)
    norm = ActNorm(2).double()
    z, _ = norm(x)
    torch.testing.assert_close(z.mean((0, 2, 3)), torch.zeros(2, dtype=torch.float64), atol=1e-10, rtol=0)
    torch.testing.assert_close(z.std((0, 2, 3), unbiased=False), torch.ones(2, dtype=torch.float64), atol=1e-5, rtol=0)
    before = norm.log_scale.detach().clone()
    norm(x + 1)
    torch.testing.assert_close(norm.log_scale.detach(), before)  # only the first batch initialises


def test_glow_coupling_starts_as_identity() -> None:
    x = _x((4, 2, 2)).float()
    z, logdet = GlowCoupling(4, hidden=4)(x)
    torch.testing.assert_close(z[:, :2], x[:, :2])
    torch.testing.assert_close(z[:, 2:], x[:, 2:] * torch.sigmoid(torch.tensor(2.0)))  # zero net: s = sigmoid(2)
    z, logdet = GlowCoupling(4, hidden=4, kind="additive")(x)
    torch.testing.assert_close(z, x)


# --- the spline ------------------------------------------------------------------------------------

def _spline_params(n: int, bins: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return tuple(2 * torch.randn(n, k, generator=g, dtype=torch.float64) for k in (bins, bins, bins - 1))


def test_spline_at_and_beyond_the_boundary() -> None:
    bound = 2.0
    edge = [bound, -bound, bound * (1 + 1e-12), -bound * (1 + 1e-12), 2 * bound, -7 * bound, 1e6, -1e30]
    for dtype in (torch.float64, torch.float32):
        v = torch.tensor(edge + [bound * (1 - 1e-7), -bound * (1 - 1e-7)], dtype=dtype, requires_grad=True)
        params = torch.cat(_spline_params(len(v), 6, seed=1), -1).to(dtype)
        for inverse in (False, True):
            y, ladj = rq_spline(v, params, bound, inverse=inverse)
            grad, = torch.autograd.grad((y + ladj).sum(), v)
            assert bool(y.isfinite().all() and ladj.isfinite().all() and grad.isfinite().all()), (dtype, inverse)
            torch.testing.assert_close(y[:len(edge)], v[:len(edge)].detach())  # the identity tails, knots at +-B
            assert float(ladj[:len(edge)].detach().abs().max()) == 0.0
            assert float((y[len(edge):] - v[len(edge):]).detach().abs().max()) < 1e-5  # continuous at +-B


# --- construction ----------------------------------------------------------------------------------

def test_built_from_config() -> None:
    flow = build("model", {"type": "flow", "shape": [2], "transforms": [
        {"type": "affine_coupling", "shape": [2], "parity": 0}, {"type": "maf", "features": 2},
        {"type": "spline_coupling", "features": 2, "parity": 1}, {"type": "actnorm", "features": 2}]})
    assert isinstance(flow, Flow) and len(flow.chain.transforms) == 4
    assert flow.log_prob(torch.randn(3, 2)).shape == (3,)


@pytest.mark.parametrize("make, message", [
    (lambda: AffineCoupling([2], parity=2), "parity must be >= 0 and <= 1"),
    (lambda: AffineCoupling([2, 3]), "shape must be"),
    (lambda: AffineCoupling([1], mask="channel"), "at least 2 features"),
    (lambda: SplineCoupling(1), "features must be >= 2"),
    (lambda: SplineCoupling(4, bound=0.0), "bound must be > 0"),
    (lambda: MAF(0), "features must be >= 1"),
    (lambda: GlowCoupling(1), "channels must be >= 2"),
    (lambda: BatchNormFlow(2, momentum=0.0), "momentum must be > 0"),
    (lambda: Flow([], []), "shape must be"),
    (lambda: FlowChain([torch.nn.Linear(2, 2)]), "must be a FlowTransform"),
])
def test_bad_construction(make: Callable[[], object], message: str) -> None:
    with pytest.raises((ValueError, TypeError), match=message):
        make()


def test_bad_shapes() -> None:
    with pytest.raises(ValueError, match=r"expected x: \[B, 3\]"):
        MAF(3)(torch.randn(2, 4))
    with pytest.raises(ValueError, match="H and W even"):
        Squeeze()(torch.randn(1, 1, 3, 2))
    with pytest.raises(ValueError, match=r"expected x: \[B, 2\]"):
        Flow([2], [])(torch.randn(2, 3))


def test_batch_norm_equals_torch_batch_norm() -> None:
    ours, ref = BatchNormFlow(3, eps=1e-3).double(), torch.nn.BatchNorm1d(3, eps=1e-3).double()
    x = _x((3,), batch=16)
    with torch.no_grad():
        ours.log_gamma.copy_(torch.tensor([0.1, -0.2, 0.3]))
        ours.beta.copy_(torch.tensor([1.0, 0.0, -1.0]))
        ref.weight.copy_(ours.log_gamma.exp())
        ref.bias.copy_(ours.beta)
    torch.testing.assert_close(ours(x)[0], ref(x))  # training mode: batch statistics, running averages updated
    ours.eval(), ref.eval()
    torch.testing.assert_close(ours.running_mean, ref.running_mean)
    torch.testing.assert_close(ours(x)[0], ref(x))
    var = ref.running_var
    torch.testing.assert_close(ours(x)[1], (ours.log_gamma - 0.5 * torch.log(var + 1e-3)).sum().expand(16))


def _actnorm_rank(rank: int, init_file: str, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(rank)) * (1 + rank) + 3 * rank
    norm = ActNorm(2)
    norm(x)
    torch.save({"log_scale": norm.log_scale.detach(), "bias": norm.bias.detach(), "x": x}, f"{out}.{rank}")
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_actnorm_initialises_alike_on_every_process(tmp_path) -> None:
    """Under torch.distributed (2 gloo processes with different batches) both start from the averaged
    mean and std, so that data-parallel replicas stay equal."""
    torch.multiprocessing.spawn(_actnorm_rank, args=(str(tmp_path / "init"), str(tmp_path / "out")), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"out.{r}") for r in (0, 1))
    torch.testing.assert_close(r0["log_scale"], r1["log_scale"])
    torch.testing.assert_close(r0["bias"], r1["bias"])
    stats = [(r["x"].mean(0), r["x"].std(0, unbiased=False)) for r in (r0, r1)]
    std = (stats[0][1] + stats[1][1]) / 2
    torch.testing.assert_close(r0["log_scale"], -torch.log(std + 1e-6))
