"""Assertions shared by the test modules."""
import pytest


def assert_clear_error(call, exc, words):
    """``call()`` raises ``exc`` with a message that starts with the public function
    (``agkd_ops.<fn>``) and contains every one of ``words``."""
    with pytest.raises(exc) as info:
        call()
    message = str(info.value)
    assert message.startswith("agkd_ops."), message
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"
