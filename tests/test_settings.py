"""Settings are validated at start, cross-field rules included, and name the variable."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from cvserve.app.settings import Settings


def test_environment_variables_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CVSERVE_MAX_QUEUE", "7")
    monkeypatch.setenv("CVSERVE_REDIS_URL", "redis://127.0.0.1:6379/0")
    s = Settings()
    assert s.max_queue == 7 and not s.embedded
    assert s.key("jobs", "m") == "cvserve:jobs:m"


def test_request_timeout_above_the_maximum_is_refused() -> None:
    with pytest.raises(ValidationError, match="max_request_timeout_s"):
        Settings(request_timeout_s=600, max_request_timeout_s=300)


def test_visibility_timeout_must_leave_room_for_a_batch() -> None:
    with pytest.raises(ValidationError, match="visibility_timeout_ms"):
        Settings(visibility_timeout_ms=10)


@pytest.mark.parametrize("raw", ["a,b", " a , b ", '["a", "b"]'])
def test_models_is_a_comma_separated_list(monkeypatch: pytest.MonkeyPatch, raw: str) -> None:
    monkeypatch.setenv("CVSERVE_MODELS", raw)
    assert Settings().models == ["a", "b"]


def test_api_keys_are_a_list_and_their_file_must_exist(monkeypatch: pytest.MonkeyPatch,
                                                       tmp_path) -> None:
    monkeypatch.setenv("CVSERVE_API_KEYS", "k1, k2")
    assert Settings().api_keys == ["k1", "k2"]
    with pytest.raises(ValidationError, match="api_keys_file"):
        Settings(api_keys_file=tmp_path / "missing.txt")
