"""Per-size profile values: the size comes from the architecture; a contradiction is an error,
an architecture of no known size is a loud, recorded inference."""

import pytest

from fourm_eval.errors import ConfigError
from fourm_eval.tasks.profiles import resolve_size


@pytest.mark.parametrize("shape,size", [((768, 12), "b"), ((1024, 24), "l"), ((2048, 24), "xl"),
                                        ((128, 4), "tiny"), ((1280, 32), "xl")])
def test_known_architectures(shape, size):
    assert resolve_size(*shape, None) == (size, None)
    assert resolve_size(*shape, size.upper()) == (size, None)


def test_contradicting_size_is_refused():
    with pytest.raises(ConfigError, match=r"'b' contradicts the backbone \(dim 1024, 24 blocks is size 'l'\)"):
        resolve_size(1024, 24, "b")


def test_unknown_architecture_warns():
    size, note = resolve_size(768, 24, None)
    assert size == "b" and "none of the released sizes" in note
    assert resolve_size(768, 24, "l") == ("l", None)  # stated by the user: no inference
    with pytest.raises(ConfigError, match="unknown model size"):
        resolve_size(768, 12, "huge")
