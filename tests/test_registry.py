"""The one registry helper: registration, refusal of duplicates, listing, unknown-name errors."""

import pytest

from lightning_simo.registry import Registry, UnknownNameError


def test_register_get_list_and_case_insensitive_lookup():
    registry: Registry[int] = Registry("widget")
    registry.register("beta", 2)

    @registry.register("Alpha")
    def alpha():
        return 1

    assert registry.names() == ["alpha", "beta"]
    assert registry.get("ALPHA") is alpha
    assert registry.get(" beta ") == 2 and registry["Beta"] == 2
    assert "Beta" in registry and "gamma" not in registry and 3 not in registry
    assert list(registry) == ["alpha", "beta"] and len(registry) == 2
    assert registry.items() == [("alpha", alpha), ("beta", 2)]


def test_duplicates_are_refused_unless_replaced():
    registry: Registry[int] = Registry("widget")
    registry.register("a", 1)
    with pytest.raises(ValueError, match="widget 'a' is already registered"):
        registry.register("A", 2)
    registry.register("a", 3, replace=True)
    assert registry.get("a") == 3
    assert registry.unregister("a") == 3
    assert "a" not in registry


def test_unknown_name_lists_valid_names_and_the_fix():
    registry: Registry[int] = Registry("widget", hint="set --model.widget")
    registry.register("b", 1)
    registry.register("a", 2)
    with pytest.raises(UnknownNameError) as error:
        registry.get("c")
    assert str(error.value) == "unknown widget 'c'; valid names: a, b (set --model.widget)"
    assert isinstance(error.value, ValueError)
    with pytest.raises(UnknownNameError, match="non-empty name"):
        registry.get("")
