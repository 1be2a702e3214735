"""DataService: records that belong to whoever `x-auth-subject` names. No auth code.

Every method needs an access token (policy.yaml: `/api.v1.DataService/*: access`); the
proxy checks it. Someone else's record is answered as NOT_FOUND, so record ids of other
users cannot be probed.

WatchRecords streams the caller's records as they change (`Store.watch`): the existing ones
first when asked, then each create and update, until the client cancels or the server
stops. A watcher that falls `Store.watch_buffer` changes behind ends with
RESOURCE_EXHAUSTED (it may watch again, with include_existing, to catch up).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import NoReturn

import grpc
from google.protobuf import empty_pb2

from examples.backend import messages
from examples.backend.api.v1 import api_pb2, api_pb2_grpc
from examples.backend.identity import abort, require_caller
from examples.backend.store import Store
from examples.backend.validation import record_problem

WATCH_FELL_BEHIND = "the watch fell too far behind the changes; watch again"


class DataService(api_pb2_grpc.DataServiceServicer):
    def __init__(self, store: Store) -> None:
        self.store = store

    async def CreateRecord(
        self, request: api_pb2.CreateRecordRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.Record:
        caller = await require_caller(context)
        await _check_data(context, request.data)
        return messages.record(self.store.create_record(caller.subject, request.data))

    async def GetRecord(
        self, request: api_pb2.GetRecordRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.Record:
        caller = await require_caller(context)
        record = self.store.record(caller.subject, request.id)
        if record is None:
            await _not_found(context, request.id)
        return messages.record(record)

    async def UpdateRecord(
        self, request: api_pb2.UpdateRecordRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.Record:
        caller = await require_caller(context)
        await _check_data(context, request.data)
        record = self.store.update_record(caller.subject, request.id, request.data)
        if record is None:
            await _not_found(context, request.id)
        return messages.record(record)

    async def DeleteRecord(
        self, request: api_pb2.DeleteRecordRequest, context: grpc.aio.ServicerContext
    ) -> empty_pb2.Empty:
        caller = await require_caller(context)
        if not self.store.delete_record(caller.subject, request.id):
            await _not_found(context, request.id)
        return empty_pb2.Empty()

    async def ListRecords(
        self, request: api_pb2.ListRecordsRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.ListRecordsResponse:
        caller = await require_caller(context)
        records, total = self.store.list_records(caller.subject, request.limit, request.offset)
        return api_pb2.ListRecordsResponse(
            records=[messages.record(r) for r in records], total_count=total
        )

    async def WatchRecords(
        self, request: api_pb2.WatchRecordsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[api_pb2.Record]:
        caller = await require_caller(context)
        with self.store.watch(caller.subject) as changes:
            # Converted now, with no await since subscribing: later changes are queued.
            existing = (
                [messages.record(r) for r in self.store.records_of(caller.subject)]
                if request.include_existing
                else []
            )
            for message in existing:
                yield message
            while (record := await changes.get()) is not None:
                yield messages.record(record)
        await abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED, WATCH_FELL_BEHIND)


async def _check_data(context: grpc.aio.ServicerContext, data: str) -> None:
    problem = record_problem(data)
    if problem:
        await abort(context, grpc.StatusCode.INVALID_ARGUMENT, problem)


async def _not_found(context: grpc.aio.ServicerContext, record_id: str) -> NoReturn:
    await abort(context, grpc.StatusCode.NOT_FOUND, f"no record {record_id!r}")
