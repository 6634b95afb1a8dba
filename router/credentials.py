"""Tokens for Headwater's calls to OpenStack services on a project's behalf: the subscription's Keystone trust."""

from __future__ import annotations

from router.keystone import InvalidToken, Keystone, KeystoneUnavailable
from router.plugins import CredentialsUnavailable, Subscription


class TrustCredentials:
    """router.plugins.Credentials through Keystone trusts: a subscription made under Keystone holds a
    trust from its creator to Headwater's service user, so a call made with its token is the
    creator's, in the subscription's project, and reaches only that project's queues, objects and
    alarms. Without Keystone (keystone None) there are no tokens."""

    def __init__(self, keystone: Keystone | None):
        self._keystone = keystone
        self.active = keystone is not None

    async def token(self, subscription: Subscription, *, fresh: bool = False) -> str | None:
        trust_id = (subscription.options or {}).get("trust_id")
        if self._keystone is None or not trust_id:
            return None
        if fresh:
            self._keystone.forget_trust_token(trust_id)
        try:
            token, identity = await self._keystone.trust_token(trust_id)
        except (InvalidToken, KeystoneUnavailable) as exc:
            raise CredentialsUnavailable(str(exc)) from None
        if identity.project_id != subscription.project_id:
            # A trust is made for the creating token's project, which is the subscription's; this
            # would be a store that was edited by hand. Never act in another project.
            raise CredentialsUnavailable(f"the trust of subscription {subscription.id} is for another project")
        return token
