"""The example's in-memory data: user accounts and the records each user owns.

Everything lives in dictionaries and is gone when the process stops. The methods never
await, so calls from one asyncio event loop cannot interleave and need no lock.

`Store.watch` subscribes to one owner's record changes (DataService.WatchRecords): each
subscriber is an `asyncio.Queue` that creating or updating a record of that owner feeds.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TypeVar

T = TypeVar("T")

DEFAULT_PAGE = 20
MAX_PAGE = 100
#: Changes a watcher may have waiting before it is dropped as too slow.
WATCH_BUFFER = 1000


class AlreadyExists(Exception):
    """An account with this email exists."""


@dataclass(slots=True)
class User:
    user_id: str
    email: str
    username: str
    password_hash: str
    roles: tuple[str, ...]
    created_at: float
    #: Base32 TOTP secret when the account uses 2FA.
    totp_secret: str | None = None
    #: The last TOTP time step accepted, so a code works only once.
    totp_last_step: int = -1

    def is_admin(self) -> bool:
        return "admin" in self.roles


@dataclass(slots=True)
class Record:
    id: str
    owner: str
    data: str
    created_at: float
    updated_at: float


#: A watcher's queue: record snapshots in the order they changed; None: it fell more than
#: `Store.watch_buffer` changes behind and was dropped (nothing more will come).
Changes = asyncio.Queue[Record | None]


@dataclass(slots=True)
class Store:
    clock: Callable[[], float] = time.time
    users: dict[str, User] = field(default_factory=dict)
    records: dict[str, Record] = field(default_factory=dict)
    watch_buffer: int = WATCH_BUFFER
    _by_email: dict[str, str] = field(default_factory=dict)
    #: owner -> the queues of its watchers
    _watchers: dict[str, set[Changes]] = field(default_factory=dict)

    # --- users -------------------------------------------------------------------------

    def add_user(
        self,
        email: str,
        username: str,
        password_hash: str,
        roles: Sequence[str],
        totp_secret: str | None = None,
    ) -> User:
        email = normalize_email(email)
        if email in self._by_email:
            raise AlreadyExists(email)
        user = User(
            user_id=str(uuid.uuid4()),
            email=email,
            username=username,
            password_hash=password_hash,
            roles=tuple(roles),
            created_at=self.clock(),
            totp_secret=totp_secret,
        )
        self.users[user.user_id] = user
        self._by_email[email] = user.user_id
        return user

    def user(self, user_id: str) -> User | None:
        return self.users.get(user_id)

    def user_by_email(self, email: str) -> User | None:
        user_id = self._by_email.get(normalize_email(email))
        return self.users.get(user_id) if user_id else None

    def delete_user(self, user_id: str) -> bool:
        """Remove the account and every record it owns."""
        user = self.users.pop(user_id, None)
        if user is None:
            return False
        del self._by_email[user.email]
        for record_id in [r.id for r in self.records.values() if r.owner == user_id]:
            del self.records[record_id]
        return True

    def search_users(self, query: str, limit: int, offset: int) -> tuple[list[User], int]:
        """Users whose username contains `query` (case-insensitive), oldest first."""
        needle = query.strip().casefold()
        found = [u for u in self.users.values() if needle in u.username.casefold()]
        return page(found, limit, offset), len(found)

    def list_users(self, limit: int, offset: int) -> tuple[list[User], int]:
        users = list(self.users.values())
        return page(users, limit, offset), len(users)

    # --- records -----------------------------------------------------------------------

    def create_record(self, owner: str, data: str) -> Record:
        now = self.clock()
        record = Record(str(uuid.uuid4()), owner, data, now, now)
        self.records[record.id] = record
        self._changed(record)
        return record

    def record(self, owner: str, record_id: str) -> Record | None:
        """The record if `owner` owns it; someone else's record is as good as missing."""
        record = self.records.get(record_id)
        return record if record is not None and record.owner == owner else None

    def update_record(self, owner: str, record_id: str, data: str) -> Record | None:
        record = self.record(owner, record_id)
        if record is not None:
            record.data = data
            record.updated_at = self.clock()
            self._changed(record)
        return record

    def delete_record(self, owner: str, record_id: str) -> bool:
        if self.record(owner, record_id) is None:
            return False
        del self.records[record_id]
        return True

    def list_records(self, owner: str, limit: int, offset: int) -> tuple[list[Record], int]:
        own = self.records_of(owner)
        return page(own, limit, offset), len(own)

    def records_of(self, owner: str) -> list[Record]:
        """Every record `owner` owns, oldest first."""
        return [r for r in self.records.values() if r.owner == owner]

    # --- watching records --------------------------------------------------------------

    @contextmanager
    def watch(self, owner: str) -> Iterator[Changes]:
        """Subscribe to `owner`'s record changes for the block.

        The queue gets a snapshot of every record of `owner` created or updated from now
        on, in order (deletions are not reported). Nothing awaits between subscribing and
        a `records_of` call right after it, so together they miss and repeat nothing.
        """
        queue: Changes = asyncio.Queue()  # `_changed` keeps it within watch_buffer
        self._watchers.setdefault(owner, set()).add(queue)
        try:
            yield queue
        finally:
            self._unwatch(owner, queue)

    def watcher_count(self, owner: str | None = None) -> int:
        """Open watches of `owner`, or of everyone when None."""
        if owner is not None:
            return len(self._watchers.get(owner, ()))
        return sum(len(queues) for queues in self._watchers.values())

    def _changed(self, record: Record) -> None:
        for queue in list(self._watchers.get(record.owner, ())):
            if queue.qsize() < self.watch_buffer:
                queue.put_nowait(dataclasses.replace(record))  # a snapshot: records mutate
            else:  # too slow: drop its backlog, tell it, feed it no more
                while not queue.empty():
                    queue.get_nowait()
                queue.put_nowait(None)
                self._unwatch(record.owner, queue)

    def _unwatch(self, owner: str, queue: Changes) -> None:
        queues = self._watchers.get(owner)
        if queues is not None:
            queues.discard(queue)
            if not queues:
                del self._watchers[owner]


def normalize_email(email: str) -> str:
    return email.strip().lower()


def page(items: list[T], limit: int, offset: int) -> list[T]:
    """One page: `limit` <= 0 means the default size, sizes cap at MAX_PAGE."""
    size = DEFAULT_PAGE if limit <= 0 else min(limit, MAX_PAGE)
    start = max(offset, 0)
    return items[start : start + size]
