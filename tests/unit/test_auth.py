"""API keys: Bearer tokens compared in constant time, from the environment and a keys file."""

import pytest

from cluster.errors import Unauthenticated
from cluster.serving.auth import ENV, ApiKeys, client_metadata


def test_no_key_leaves_the_apis_open(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    keys = ApiKeys.load(None)
    assert keys.open
    keys.check(None)


def test_keys_from_the_environment_and_a_file_for_rotation(monkeypatch, tmp_path):
    monkeypatch.setenv(ENV, "env-key")
    path = tmp_path / "keys"
    path.write_text("# rotated 2026-12\nold-key\n\n  new-key  \n")
    keys = ApiKeys.load(str(path))
    for key in ("env-key", "old-key", "new-key"):
        keys.check(f"Bearer {key}")
    keys.check("bearer new-key")
    with pytest.raises(Unauthenticated, match="no API key"):
        keys.check(None)
    with pytest.raises(Unauthenticated, match="no API key"):
        keys.check("Basic new-key")
    with pytest.raises(Unauthenticated, match="not valid"):
        keys.check("Bearer # rotated 2026-12")
    assert client_metadata() == [("authorization", "Bearer env-key")]


def test_a_keys_file_that_cannot_serve_is_refused_by_name(tmp_path):
    from cluster.serving.auth import KeysFileError

    comments = tmp_path / "keys"
    comments.write_text("# nothing yet\n\n")
    with pytest.raises(KeysFileError, match="holds no key: the APIs would be open"):
        ApiKeys.load(str(comments))
    with pytest.raises(KeysFileError, match=r"api_keys_file '.*missing' cannot be read: No such file"):
        ApiKeys.load(str(tmp_path / "missing"))
