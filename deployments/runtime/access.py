"""Who may call a deployment's prediction URL, as the runtime checks it on every request."""

import hashlib
import hmac
from dataclasses import dataclass


@dataclass(frozen=True)
class Access:
    """Who may call a deployment: anyone, or holders of one of its keys (SHA-256 digests)."""

    private: bool = False
    key_digests: frozenset[bytes] = frozenset()

    def allows(self, headers: dict[bytes, bytes], internal_token: bytes) -> bool:
        if not self.private:
            return True
        if hmac.compare_digest(headers.get(b"x-serveml-internal", b""), internal_token):
            return True
        presented = headers.get(b"x-api-key") or headers.get(b"authorization", b"").removeprefix(b"Bearer ")
        if not presented:
            return False
        digest = hashlib.sha256(presented).hexdigest().encode()
        # Compare against every key, without stopping early, in constant time each.
        matches = [hmac.compare_digest(digest, known) for known in self.key_digests]
        return any(matches)


def access_for(deployment) -> Access:
    """The rules of a deployment row (its keys prefetched, or read here)."""
    digests = [key.key_sha256.encode() for key in deployment.keys.all() if key.is_active()]
    return Access(deployment.is_private, frozenset(digests))
