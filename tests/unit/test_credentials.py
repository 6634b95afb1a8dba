"""TrustCredentials: a subscription's token is its trust's, in its own project, or none at all."""

from __future__ import annotations

import pytest

from router.credentials import TrustCredentials
from router.keystone import Identity, InvalidToken, KeystoneUnavailable
from router.plugins import CredentialsUnavailable, Subscription


class FakeKeystone:
    def __init__(self, answers: dict):
        self.answers, self.forgotten = answers, []

    def forget_trust_token(self, trust_id: str) -> None:
        self.forgotten.append(trust_id)

    async def trust_token(self, trust_id: str):
        answer = self.answers[trust_id]
        if isinstance(answer, Exception):
            raise answer
        token, project = answer
        return token, Identity(user_id="u", user_name="alice", project_id=project, project_name=None, roles=("member",),
                               expires_at=None, trust_id=trust_id)


def sub(trust_id: str | None = None, project: str = "p1") -> Subscription:
    return Subscription(id="s1", project_id=project, source="zaqar", options={"trust_id": trust_id} if trust_id else {})


async def test_the_token_of_the_subscriptions_trust_and_a_fresh_one_on_request():
    keystone = FakeKeystone({"t1": ("tok", "p1")})
    credentials = TrustCredentials(keystone)
    assert credentials.active and await credentials.token(sub("t1")) == "tok"
    assert await credentials.token(sub("t1"), fresh=True) == "tok" and keystone.forgotten == ["t1"]
    assert await credentials.token(sub(None)) is None  # no trust, no token (never the service user's)


async def test_without_keystone_there_are_no_tokens():
    credentials = TrustCredentials(None)
    assert not credentials.active and await credentials.token(sub("t1")) is None


@pytest.mark.parametrize("answer, fault", [
    (InvalidToken("Trust t1 can no longer be used"), "can no longer be used"),
    (KeystoneUnavailable("Keystone at http://k is unreachable"), "unreachable"),
    (("tok", "p2"), "for another project"),  # never act in a project other than the subscription's
])
async def test_a_trust_that_cannot_serve_is_credentials_unavailable(answer, fault):
    with pytest.raises(CredentialsUnavailable, match=fault):
        await TrustCredentials(FakeKeystone({"t1": answer})).token(sub("t1"))
