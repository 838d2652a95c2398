"""API keys on the public APIs: `Authorization: Bearer KEY` on HTTP, and the same in gRPC metadata.

Keys come from MOECLUSTER_API_KEY (one key) and the serving config's `api_keys_file` (one key a line, so keys
can be rotated: add the new one, move the clients over, remove the old one). With no key the APIs are open.
"""

import hmac
import os
from pathlib import Path

from cluster.errors import Unauthenticated

ENV = "MOECLUSTER_API_KEY"


class KeysFileError(ValueError):
    pass


class ApiKeys:
    def __init__(self, keys: list[str]):
        self._keys = [key.encode() for key in keys]

    @classmethod
    def load(cls, keys_file: str | None) -> "ApiKeys":
        """Raises KeysFileError for a keys file that cannot be read or holds no key (the APIs would be open)."""
        keys = [os.environ[ENV]] if os.environ.get(ENV) else []
        if keys_file:
            try:
                lines = Path(keys_file).read_text().splitlines()
            except (OSError, UnicodeDecodeError) as error:
                reason = error.strerror if isinstance(error, OSError) else "it is not text"
                raise KeysFileError(f"api_keys_file {keys_file!r} cannot be read: {reason}") from None
            in_file = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
            if not in_file:
                raise KeysFileError(f"api_keys_file {keys_file!r} holds no key: the APIs would be open to anyone")
            keys += in_file
        return cls(keys)

    @property
    def open(self) -> bool:
        return not self._keys

    def check(self, authorization: str | None) -> None:
        """Raise Unauthenticated unless `authorization` is "Bearer KEY" with a configured key."""
        if self.open:
            return
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise Unauthenticated("no API key: send the header Authorization: Bearer KEY")
        matches = [hmac.compare_digest(token.strip().encode(), key) for key in self._keys]  # each in constant time
        if not any(matches):
            raise Unauthenticated("the API key is not valid")


def client_metadata() -> list[tuple[str, str]]:
    """gRPC metadata carrying MOECLUSTER_API_KEY, for moecluster's own clients; none when it is unset."""
    key = os.environ.get(ENV)
    return [("authorization", f"Bearer {key}")] if key else []
