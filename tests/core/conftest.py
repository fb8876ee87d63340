import pytest

from core.plan import SlotSpec


def two_width_slots() -> list[SlotSpec]:
    """A wide (32) and a thin (16) 'member', stem -> 2 convs -> shortcut -> linear, in forward order."""
    slots = []
    for m, w in enumerate((32, 16)):
        slots += [
            SlotSpec(m, "stem", "conv3x3", (16, 3, 3, 3)),
            SlotSpec(m, "conv1", "conv3x3", (w, 16, 3, 3)),
            SlotSpec(m, "conv2", "conv3x3", (w, w, 3, 3)),
            SlotSpec(m, "conv3", "conv3x3", (2 * w, w, 3, 3)),
            SlotSpec(m, "short", "conv1x1", (2 * w, w, 1, 1)),
            SlotSpec(m, "fc", "linear", (10, 2 * w)),
        ]
    return slots


@pytest.fixture
def slots():
    return two_width_slots()
