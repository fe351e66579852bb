"""The network's training shortcut for 1 x 1 maps (net.AlexNetPlusLatent.fc6_of_one_pixel) against the pooled fc6
that torchvision's AlexNet computes."""
import copy
import sys

import pytest
import torch

from conftest import REPO

sys.path.insert(0, str(REPO))

import net  # noqa: E402  (after the path is set)


def pooled_forward(model, images):
    """The forward pass as written in torchvision: 6 x 6 average pool, flatten, fc6 and fc7 as one Sequential."""
    fc7 = model.fc6_fc7(torch.flatten(model.avgpool(model.features(images)), 1))
    codes = torch.sigmoid(model.latent_norm(model.latent(fc7)))
    return codes, model.classifier(codes), fc7


def fc6_calls(model, images):
    calls = []
    handle = model.fc6_fc7[1].register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        model(images)
    handle.remove()
    return len(calls)


def test_training_at_64_px_takes_fc6_on_the_pixel_with_the_pooled_values_and_gradients():
    torch.manual_seed(0)
    model = net.AlexNetPlusLatent(16, 3, "bnconv", 0.0).train()
    images, labels = torch.randn(8, 3, 64, 64), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    assert model.features(images).shape[-2:] == (1, 1)  # the case the shortcut serves
    assert fc6_calls(copy.deepcopy(model), images) == 0
    results = {}
    for name, forward in (("shortcut", lambda m, x: m(x)), ("pooled", pooled_forward)):
        copied = copy.deepcopy(model)  # BatchNorm's running statistics move with each training forward
        outputs = forward(copied, images)
        torch.nn.functional.cross_entropy(outputs[1], labels).backward()
        results[name] = outputs, {key: p.grad for key, p in copied.named_parameters()}
    (outputs, gradients), (expected, expected_gradients) = results["shortcut"], results["pooled"]
    for got, want in zip(outputs, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # to a millionth of the largest gradient: the conv biases before BatchNorm, which it cancels, get only rounding
    scale = max(want.abs().max().item() for want in expected_gradients.values())
    for key, want in expected_gradients.items():
        torch.testing.assert_close(gradients[key], want, rtol=1e-4, atol=1e-6 * scale, msg=key)


@pytest.mark.parametrize("case", ["evaluation", "dropout", "larger maps"])
def test_evaluation_dropout_and_larger_maps_keep_the_pooled_fc6(case):
    """Encoding keeps the pool, so a model's codes are bit for bit what they were; fc6's dropout masks the 36
    copies of a pixel apart; maps of 2 x 2 and more are not repeats of one value."""
    torch.manual_seed(0)
    model = net.AlexNetPlusLatent(16, 3, "bnconv", 0.5 if case == "dropout" else 0.0)
    model.train(case != "evaluation")
    images = torch.randn(4, 3, 128 if case == "larger maps" else 64, 64)
    assert fc6_calls(model, images) == 1
    if case == "evaluation":
        with torch.no_grad():
            assert all(torch.equal(got, want) for got, want in zip(model(images), pooled_forward(model, images)))
