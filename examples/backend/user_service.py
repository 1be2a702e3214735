"""UserService: profiles, with no authentication code at all.

The proxy decides who may call what (policy.yaml: SearchPublicUsers is public, ListUsers
needs role admin, the rest an access token). This service only reads who is calling from
`x-auth-subject` and `x-auth-roles`, to know whose profile "mine" is and whether the
caller may act on someone else's.
"""

from __future__ import annotations

import grpc

from examples.backend import messages
from examples.backend.api.v1 import api_pb2, api_pb2_grpc
from examples.backend.identity import Caller, abort, require_caller
from examples.backend.store import Store
from examples.backend.validation import username_problem

ADMIN = "admin"


class UserService(api_pb2_grpc.UserServiceServicer):
    def __init__(self, store: Store) -> None:
        self.store = store

    async def SearchPublicUsers(
        self, request: api_pb2.SearchRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.SearchResponse:
        users, total = self.store.search_users(request.query, request.limit, request.offset)
        return api_pb2.SearchResponse(
            users=[messages.public_profile(u) for u in users], total_count=total
        )

    async def GetProfile(
        self, request: api_pb2.GetProfileRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.UserProfile:
        caller = await require_caller(context)
        user_id = _target(caller, request.user_id)
        user = self.store.user(user_id)
        if user is None:
            await abort(context, grpc.StatusCode.NOT_FOUND, f"no user {user_id!r}")
        return messages.profile(user)

    async def UpdateProfile(
        self, request: api_pb2.UpdateProfileRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.UserProfile:
        caller = await require_caller(context)
        user = self.store.user(caller.subject)
        if user is None:
            await abort(context, grpc.StatusCode.NOT_FOUND, f"no user {caller.subject!r}")
        username = request.username.strip()
        problem = username_problem(username)
        if problem:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, problem)
        user.username = username
        return messages.profile(user)

    async def DeleteAccount(
        self, request: api_pb2.DeleteAccountRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.DeleteAccountResponse:
        caller = await require_caller(context)
        user_id = _target(caller, request.user_id)
        if not self.store.delete_user(user_id):
            await abort(context, grpc.StatusCode.NOT_FOUND, f"no user {user_id!r}")
        return api_pb2.DeleteAccountResponse(
            user_id=user_id, message=f"account deleted by {caller.subject}"
        )

    async def ListUsers(
        self, request: api_pb2.ListUsersRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.ListUsersResponse:
        # Only admins get here: the proxy's policy requires the role for this method.
        caller = await require_caller(context)
        users, total = self.store.list_users(request.limit, request.offset)
        return api_pb2.ListUsersResponse(
            users=[messages.profile(u) for u in users],
            total_count=total,
            requested_by=caller.subject,
        )


def _target(caller: Caller, user_id: str) -> str:
    """The user a request is about: the caller when empty, else the one named. Who may
    name another user is the proxy's to decide (policy.yaml: a `request:` rule lets only
    admins), so this service holds no authorization code."""
    return user_id or caller.subject
