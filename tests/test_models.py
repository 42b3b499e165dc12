import dataclasses

import pytest
import torch
import torch.nn.functional as F

from paramshare.config import Config
from paramshare.metrics import param_uses_count, shared_parameters, unique_param_count
from paramshare.models import FAMILIES, build

CFG = Config().model


def hp(family):
    return dataclasses.asdict(CFG.family(family))


def linear(i, o):
    return i * o + o


def gru_cell(i, h):
    return 3 * h * (i + h) + 2 * 3 * h


def vit_block(w, m):
    return 2 * (2 * w) + linear(w, 3 * w) + linear(w, w) + linear(w, m * w) + linear(m * w, w)


def expected_counts(family):
    """(tied, untied) unique parameters, derived from the architecture in params.yaml."""
    if family == "conv":
        c, h = CFG.conv.channels, CFG.conv.hidden
        fc = linear(c * 7 * 7, h) + linear(h, 10)
        tied = (c * 9 + c) + (c * c * 9 + c) + fc
        untied = 28 * 28 * (c * 9 + c) + 14 * 14 * (c * c * 9 + c) + fc
        return tied, untied
    if family == "recurrent":
        h = CFG.recurrent.hidden
        return gru_cell(28, h) + linear(h, 10), 28 * gru_cell(28, h) + linear(h, 10)
    if family == "attention":
        a = CFG.attention
        base = linear(a.patch ** 2, a.width) + (28 // a.patch) ** 2 * a.width + 2 * a.width + linear(a.width, 10)
        block = vit_block(a.width, a.mlp_ratio)
        return base + block, base + a.depth * block
    if family == "soft":
        h = CFG.soft.hidden
        encoder = linear(784, h) + linear(h, h)
        total = 2 * encoder + linear(h, 10) + linear(h, h) + linear(h, 784)
        return total, total
    if family == "mlp":
        h = CFG.mlp.hidden
        total = linear(784, h) + linear(h, h) + linear(h, 10)
        return total, total
    raise AssertionError(family)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_exact_unique_parameter_counts(family):
    tied, untied = expected_counts(family)
    assert unique_param_count(build(family, True, hp(family))) == tied
    assert unique_param_count(build(family, False, hp(family))) == untied


def test_reference_cnn_has_the_reference_count():
    assert unique_param_count(build("conv", True, hp("conv"))) == 211_690


@pytest.mark.parametrize("family", list(FAMILIES))
def test_untied_models_share_no_tensor(family):
    model = build(family, False, hp(family))
    assert shared_parameters(model) == {}
    assert param_uses_count(model) == unique_param_count(model)


@pytest.mark.parametrize("family, container, uses", [("recurrent", "cells", 28), ("attention", "blocks", 4)])
def test_tied_models_reuse_one_module_and_one_tensor(family, container, uses):
    model = build(family, True, hp(family))
    modules = list(getattr(model, container))
    assert len(modules) == uses and all(m is modules[0] for m in modules)
    first = next(modules[0].parameters())
    assert all(next(m.parameters()).data_ptr() == first.data_ptr() for m in modules)
    groups = shared_parameters(model)
    assert groups and all(len(names) == uses for names in groups.values())
    assert param_uses_count(model) == unique_param_count(model) + (uses - 1) * sum(
        p.numel() for p in modules[0].parameters())


def _loss(model, x, y):
    return F.cross_entropy(model(x), y)


def _batch(n=6):
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 1, 28, 28, generator=g) * 2 - 1, torch.randint(0, 10, (n,), generator=g)


@pytest.mark.parametrize("family, container", [("recurrent", "cells"), ("attention", "blocks")])
def test_gradient_of_a_shared_module_is_the_sum_over_its_uses(family, container):
    torch.manual_seed(0)
    tied = build(family, True, hp(family))
    untied = build(family, False, hp(family))
    shared = getattr(tied, container)[0]
    with torch.no_grad():
        for name, p in untied.named_parameters():
            if name.startswith(container + "."):
                p.copy_(shared.get_parameter(name.split(".", 2)[2]))
            else:
                p.copy_(tied.get_parameter(name))
    x, y = _batch()
    lt, lu = _loss(tied, x, y), _loss(untied, x, y)
    torch.testing.assert_close(lt, lu)
    lt.backward()
    lu.backward()
    for name, p in shared.named_parameters():
        summed = sum(m.get_parameter(name).grad for m in getattr(untied, container))
        torch.testing.assert_close(p.grad, summed, rtol=1e-4, atol=1e-6)


def test_conv_kernel_gradient_is_the_sum_over_positions_of_the_locally_connected_one():
    torch.manual_seed(0)
    conv = build("conv", True, hp("conv"))
    local = build("conv", False, hp("conv"))
    with torch.no_grad():
        for layer in ("conv1", "conv2"):
            c, lc = getattr(conv, layer), getattr(local, layer)
            lc.weight.copy_(c.weight.reshape(c.out_channels, -1).expand_as(lc.weight))
            lc.bias.copy_(c.bias[:, None, None].expand_as(lc.bias))
        for layer in ("fc1", "fc2"):
            getattr(local, layer).load_state_dict(getattr(conv, layer).state_dict())
    x, y = _batch()
    torch.testing.assert_close(conv(x), local(x), rtol=1e-4, atol=1e-5)
    _loss(conv, x, y).backward()
    _loss(local, x, y).backward()
    for layer in ("conv1", "conv2"):
        c, lc = getattr(conv, layer), getattr(local, layer)
        torch.testing.assert_close(c.weight.grad.reshape(c.out_channels, -1), lc.weight.grad.sum(0),
                                   rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(c.bias.grad, lc.bias.grad.sum((1, 2)), rtol=1e-4, atol=1e-6)


def test_locally_connected_positions_are_independent():
    local = build("conv", False, hp("conv")).conv1
    x = torch.rand(1, 1, 28, 28, requires_grad=True)
    local(x)[0, :, 10, 10].sum().backward()
    touched = torch.nonzero(local.weight.grad.abs().sum((1, 2))).flatten().tolist()
    assert touched == [10 * 28 + 10]
    assert torch.nonzero(x.grad[0, 0]).tolist() == [[r, c] for r in (9, 10, 11) for c in (9, 10, 11)]


def test_locally_connected_layer_is_unfold_then_one_matmul_per_position():
    """The fast gather + bmm computes exactly the definition: unfold, then out[b, o, l] =
    sum_f cols[b, f, l] * weight[l, o, f] + bias[o, l], in value and in both gradients."""
    torch.manual_seed(0)
    layer = build("conv", False, hp("conv")).conv2
    x = torch.randn(8, layer.in_channels, 14, 14, requires_grad=True)
    out = layer(x)
    x_ref = x.detach().clone().requires_grad_(True)
    weight, bias = layer.weight.detach().clone().requires_grad_(True), layer.bias.detach().clone().requires_grad_(True)
    cols = F.unfold(x_ref, 3, padding=1)
    ref = torch.einsum("bfl,lof->bol", cols, weight).reshape(8, -1, 14, 14) + bias
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    upstream = torch.randn_like(ref)
    (out * upstream).sum().backward()
    (ref * upstream).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layer.weight.grad, weight.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layer.bias.grad, bias.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("tied", [True, False])
def test_conv_forward_is_the_reference_order_relu_then_pool(tied):
    """ConvNet pools before the ReLU and runs channels-last for speed; the function and its
    gradients are those of the reference order (ReLU, then pool) in the default layout."""
    torch.manual_seed(0)
    model = build("conv", tied, hp("conv"))
    x, y = _batch()

    def reference(m, x):
        x = F.max_pool2d(F.relu(m.conv1(x.contiguous())), 2)
        x = F.max_pool2d(F.relu(m.conv2(x)), 2)
        return m.fc2(F.relu(m.fc1(x.flatten(1))))

    torch.testing.assert_close(model(x), reference(model, x), rtol=1e-5, atol=1e-5)
    fast = torch.autograd.grad(_loss(model, x, y), list(model.parameters()))
    slow = torch.autograd.grad(F.cross_entropy(reference(model, x), y), list(model.parameters()))
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_soft_penalty_is_zero_untied_and_has_the_right_gradient():
    untied = build("soft", False, hp("soft"))
    assert untied.strength == 0 and untied.tie_penalty().item() == 0.0
    tied = build("soft", True, {"hidden": 32, "strength": 0.5})
    a, b = tied.encoder_a[0].weight, tied.encoder_b[0].weight
    expected = 0.5 * sum((p - q).pow(2).sum() for p, q in
                         zip(tied.encoder_a.parameters(), tied.encoder_b.parameters()))
    penalty = tied.tie_penalty()
    torch.testing.assert_close(penalty, expected)
    penalty.backward()
    torch.testing.assert_close(a.grad, 2 * 0.5 * (a - b).detach())
    torch.testing.assert_close(b.grad, -2 * 0.5 * (a - b).detach())
    assert tied.head.weight.grad is None and tied.decoder[0].weight.grad is None


def test_soft_auxiliary_loss_trains_the_autoencoder_only_when_untied():
    model = build("soft", False, {"hidden": 16, "strength": 1.0})
    x, y = _batch()
    (model.auxiliary_loss(x) + _loss(model, x, y)).backward()
    assert model.encoder_b[0].weight.grad.abs().sum() > 0
    assert model.encoder_a[0].weight.grad.abs().sum() > 0
    model.zero_grad()
    model.auxiliary_loss(x).backward()
    assert model.encoder_a[0].weight.grad is None or model.encoder_a[0].weight.grad.abs().sum() == 0


def test_mlp_ignores_the_flag():
    torch.manual_seed(0)
    a = build("mlp", True, hp("mlp"))
    torch.manual_seed(0)
    b = build("mlp", False, hp("mlp"))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_classifies_a_batch_both_ways(family):
    for tied in (True, False):
        assert build(family, tied, hp(family))(_batch(3)[0]).shape == (3, 10)


def test_a_tie_survives_a_state_dict_round_trip():
    source = build("recurrent", True, hp("recurrent"))
    target = build("recurrent", True, hp("recurrent"))
    target.load_state_dict(source.state_dict())
    assert target.cells[0] is target.cells[27]
    torch.testing.assert_close(target.cells[5].weight_hh, source.cells[0].weight_hh)


def test_unknown_family_lists_the_known_ones():
    with pytest.raises(KeyError, match="conv, recurrent, attention, soft, mlp"):
        build("lstm", True, {})
