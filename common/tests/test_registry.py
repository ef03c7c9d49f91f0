"""common.registry: registration, lookup by name and family, and the errors a user sees."""

from __future__ import annotations

import pytest
import torch

from common import registry
from common.errors import ConfigError


@pytest.fixture(autouse=True)
def empty_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    # Each test starts from an empty table so it neither sees nor leaks the real networks.
    monkeypatch.setattr(registry, "_REGISTRY", {})


def _make_net(width: int = 1) -> type[torch.nn.Module]:
    class Net(torch.nn.Module):
        def __init__(self, channels: int = width):
            super().__init__()
            self.conv = torch.nn.Conv2d(channels, 1, 1)

    return Net


def test_register_under_own_name_and_build_with_kwargs():
    net = registry.register_model()(_make_net())
    model = registry.get_model("Net", channels=3)
    assert isinstance(model, net) and model.conv.in_channels == 3
    assert registry.get_model_builder("Net") is net


def test_family_filters_listing_and_lookup():
    registry.register_model("B", family="one")(_make_net())
    registry.register_model("A", family="two")(_make_net())
    registry.register_model("C", family="one")(_make_net())
    assert registry.list_models() == ["B", "A", "C"]  # registration order
    assert registry.list_models("one") == ["B", "C"]
    assert registry.list_models("none") == []
    with pytest.raises(ConfigError, match=r"^unknown --model_type 'A'; valid: B, C$"):
        registry.get_model("A", family="one")


def test_unknown_name_lists_valid_names_with_the_flag():
    registry.register_model("U_Net", family="isic")(_make_net())
    registry.register_model("AttU_Net", family="isic")(_make_net())
    with pytest.raises(ConfigError) as info:
        registry.get_model("X")
    assert str(info.value) == "unknown --model_type 'X'; valid: U_Net, AttU_Net"
    assert isinstance(info.value, ValueError)  # ConfigError is a ValueError for generic handlers
    with pytest.raises(ConfigError, match=r"^unknown --arch 'X'; valid: \(none registered\)$"):
        registry.get_model_builder("X", family="other", flag="--arch")


def test_duplicate_name_from_another_definition_raises():
    registry.register_model("Net")(_make_net())
    other = _make_net()
    other.__qualname__ = "Other"
    with pytest.raises(ValueError, match="'Net' is already registered"):
        registry.register_model("Net")(other)


def test_re_registering_the_same_definition_replaces_it():
    # importlib.reload re-executes the decorator with a new class object of the same origin.
    first, second = _make_net(1), _make_net(2)
    registry.register_model("Net")(first)
    registry.register_model("Net")(second)
    assert registry.get_model_builder("Net") is second
