"""The request message type of each gRPC method, from descriptors (a descriptor set, or
the backend's server reflection), to read request fields with (`decide/request_fields.py`).

Files may arrive in any order and without the well-known types they import
(`google/protobuf/empty.proto`, ...): those come from the protobuf runtime's own pool.
Nothing is built until a method's type is asked for.
"""

from __future__ import annotations

from collections.abc import Iterable

from google.protobuf import descriptor_database, descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.descriptor import Descriptor
from google.protobuf.message import Message


class MessageTypes:
    def __init__(self) -> None:
        self._db = descriptor_database.DescriptorDatabase()
        self._pool = descriptor_pool.DescriptorPool(self._db)
        self._files: set[str] = set()
        #: method path -> full name of its request message type.
        self.inputs: dict[str, str] = {}
        self._classes: dict[str, type[Message] | None] = {}

    def add_files(self, files: Iterable[descriptor_pb2.FileDescriptorProto]) -> None:
        for fd in files:
            if fd.name in self._files:
                continue
            self._db.Add(fd)
            self._files.add(fd.name)
            prefix = f"{fd.package}." if fd.package else ""
            for service in fd.service:
                for m in service.method:
                    self.inputs[f"/{prefix}{service.name}/{m.name}"] = m.input_type.lstrip(".")
        self._classes.clear()  # a later file may complete a type that failed to build

    def _add_well_known(self) -> None:
        """Imports no file given here provides, from the runtime's pool (well-known types)."""
        default = descriptor_pool.Default()
        for name in list(self._files):
            for dependency in self._db.FindFileByName(name).dependency:
                if dependency in self._files:
                    continue
                try:
                    found = default.FindFileByName(dependency)
                except KeyError:
                    continue  # missing: building a type that needs it fails, and says so
                proto = descriptor_pb2.FileDescriptorProto()
                found.CopyToProto(proto)
                self.add_files([proto])

    def descriptor(self, method: str) -> Descriptor | None:
        """The request type of `method`; None when no descriptor names the method or its
        type cannot be built (a file it imports is missing)."""
        name = self.inputs.get(method)
        if name is None:
            return None
        try:
            return self._pool.FindMessageTypeByName(name)
        except (KeyError, TypeError):
            self._add_well_known()
            try:
                return self._pool.FindMessageTypeByName(name)
            except (KeyError, TypeError):
                return None

    def message_class(self, method: str) -> type[Message] | None:
        if method not in self._classes:
            found = self.descriptor(method)
            self._classes[method] = (
                None if found is None else message_factory.GetMessageClass(found)
            )
        return self._classes[method]
