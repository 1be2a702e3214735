"""Converting the store's objects to the API's protobuf messages."""

from __future__ import annotations

from google.protobuf.timestamp_pb2 import Timestamp

from examples.backend.api.v1 import api_pb2
from examples.backend.store import Record, User


def timestamp(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1_000_000_000))
    return ts


def profile(user: User) -> api_pb2.UserProfile:
    """The full profile: for the user themself and for admins."""
    return api_pb2.UserProfile(
        user_id=user.user_id,
        email=user.email,
        username=user.username,
        created_at=timestamp(user.created_at),
        roles=list(user.roles),
    )


def public_profile(user: User) -> api_pb2.UserProfile:
    """What anyone may see: no email, no roles."""
    return api_pb2.UserProfile(
        user_id=user.user_id,
        username=user.username,
        created_at=timestamp(user.created_at),
    )


def record(rec: Record) -> api_pb2.Record:
    return api_pb2.Record(
        id=rec.id,
        owner=rec.owner,
        data=rec.data,
        created_at=timestamp(rec.created_at),
        updated_at=timestamp(rec.updated_at),
    )
