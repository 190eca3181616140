from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Assignment(_message.Message):
    __slots__ = ("task_id", "chunk", "chunk_count", "attempt", "token", "payload_json", "priority")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    CHUNK_COUNT_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_JSON_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    chunk: int
    chunk_count: int
    attempt: int
    token: int
    payload_json: str
    priority: int
    def __init__(self, task_id: _Optional[str] = ..., chunk: _Optional[int] = ..., chunk_count: _Optional[int] = ..., attempt: _Optional[int] = ..., token: _Optional[int] = ..., payload_json: _Optional[str] = ..., priority: _Optional[int] = ...) -> None: ...

class DispatchRequest(_message.Message):
    __slots__ = ("leader_id", "assignments", "has_floor", "floor")
    LEADER_ID_FIELD_NUMBER: _ClassVar[int]
    ASSIGNMENTS_FIELD_NUMBER: _ClassVar[int]
    HAS_FLOOR_FIELD_NUMBER: _ClassVar[int]
    FLOOR_FIELD_NUMBER: _ClassVar[int]
    leader_id: str
    assignments: _containers.RepeatedCompositeFieldContainer[Assignment]
    has_floor: bool
    floor: int
    def __init__(self, leader_id: _Optional[str] = ..., assignments: _Optional[_Iterable[_Union[Assignment, _Mapping]]] = ..., has_floor: _Optional[bool] = ..., floor: _Optional[int] = ...) -> None: ...

class DispatchResponse(_message.Message):
    __slots__ = ("accepted", "refused")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REFUSED_FIELD_NUMBER: _ClassVar[int]
    accepted: int
    refused: int
    def __init__(self, accepted: _Optional[int] = ..., refused: _Optional[int] = ...) -> None: ...

class Result(_message.Message):
    __slots__ = ("task_id", "chunk", "attempt", "token", "ok", "exit_code", "result", "error", "node", "started_at", "finished_at", "requeue", "held", "stderr", "truncated", "output_bytes")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    REQUEUE_FIELD_NUMBER: _ClassVar[int]
    HELD_FIELD_NUMBER: _ClassVar[int]
    STDERR_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_BYTES_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    chunk: int
    attempt: int
    token: int
    ok: bool
    exit_code: int
    result: str
    error: str
    node: str
    started_at: float
    finished_at: float
    requeue: bool
    held: bool
    stderr: str
    truncated: bool
    output_bytes: int
    def __init__(self, task_id: _Optional[str] = ..., chunk: _Optional[int] = ..., attempt: _Optional[int] = ..., token: _Optional[int] = ..., ok: _Optional[bool] = ..., exit_code: _Optional[int] = ..., result: _Optional[str] = ..., error: _Optional[str] = ..., node: _Optional[str] = ..., started_at: _Optional[float] = ..., finished_at: _Optional[float] = ..., requeue: _Optional[bool] = ..., held: _Optional[bool] = ..., stderr: _Optional[str] = ..., truncated: _Optional[bool] = ..., output_bytes: _Optional[int] = ...) -> None: ...

class ReportResultsRequest(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[Result]
    def __init__(self, results: _Optional[_Iterable[_Union[Result, _Mapping]]] = ...) -> None: ...

class ReportResultsResponse(_message.Message):
    __slots__ = ("accepted", "leader_grpc", "refused")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    LEADER_GRPC_FIELD_NUMBER: _ClassVar[int]
    REFUSED_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    leader_grpc: str
    refused: int
    def __init__(self, accepted: _Optional[bool] = ..., leader_grpc: _Optional[str] = ..., refused: _Optional[int] = ...) -> None: ...

class RunningUnit(_message.Message):
    __slots__ = ("task_id", "chunk", "attempt", "token")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    chunk: int
    attempt: int
    token: int
    def __init__(self, task_id: _Optional[str] = ..., chunk: _Optional[int] = ..., attempt: _Optional[int] = ..., token: _Optional[int] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("node_id", "grpc_address", "http_address", "raft_address", "voter", "slots", "free_slots", "running", "cpu_percent", "memory_percent", "memory_rss", "accepting", "capacity", "raft_protocol", "peer_protocol", "started_at", "resources", "node_labels")
    class ResourcesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class NodeLabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    GRPC_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    HTTP_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    RAFT_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    VOTER_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    FREE_SLOTS_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    CPU_PERCENT_FIELD_NUMBER: _ClassVar[int]
    MEMORY_PERCENT_FIELD_NUMBER: _ClassVar[int]
    MEMORY_RSS_FIELD_NUMBER: _ClassVar[int]
    ACCEPTING_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    RAFT_PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    PEER_PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    RESOURCES_FIELD_NUMBER: _ClassVar[int]
    NODE_LABELS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    grpc_address: str
    http_address: str
    raft_address: str
    voter: bool
    slots: int
    free_slots: int
    running: _containers.RepeatedCompositeFieldContainer[RunningUnit]
    cpu_percent: float
    memory_percent: float
    memory_rss: int
    accepting: bool
    capacity: int
    raft_protocol: int
    peer_protocol: int
    started_at: float
    resources: _containers.ScalarMap[str, float]
    node_labels: _containers.ScalarMap[str, str]
    def __init__(self, node_id: _Optional[str] = ..., grpc_address: _Optional[str] = ..., http_address: _Optional[str] = ..., raft_address: _Optional[str] = ..., voter: _Optional[bool] = ..., slots: _Optional[int] = ..., free_slots: _Optional[int] = ..., running: _Optional[_Iterable[_Union[RunningUnit, _Mapping]]] = ..., cpu_percent: _Optional[float] = ..., memory_percent: _Optional[float] = ..., memory_rss: _Optional[int] = ..., accepting: _Optional[bool] = ..., capacity: _Optional[int] = ..., raft_protocol: _Optional[int] = ..., peer_protocol: _Optional[int] = ..., started_at: _Optional[float] = ..., resources: _Optional[_Mapping[str, float]] = ..., node_labels: _Optional[_Mapping[str, str]] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("accepted", "leader_grpc", "kill", "leader_id", "nodes")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    LEADER_GRPC_FIELD_NUMBER: _ClassVar[int]
    KILL_FIELD_NUMBER: _ClassVar[int]
    LEADER_ID_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    leader_grpc: str
    kill: _containers.RepeatedCompositeFieldContainer[RunningUnit]
    leader_id: str
    nodes: _containers.RepeatedCompositeFieldContainer[NodeOffer]
    def __init__(self, accepted: _Optional[bool] = ..., leader_grpc: _Optional[str] = ..., kill: _Optional[_Iterable[_Union[RunningUnit, _Mapping]]] = ..., leader_id: _Optional[str] = ..., nodes: _Optional[_Iterable[_Union[NodeOffer, _Mapping]]] = ...) -> None: ...

class NodeOffer(_message.Message):
    __slots__ = ("node_id", "slots", "resources", "node_labels")
    class ResourcesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class NodeLabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    RESOURCES_FIELD_NUMBER: _ClassVar[int]
    NODE_LABELS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    slots: int
    resources: _containers.ScalarMap[str, float]
    node_labels: _containers.ScalarMap[str, str]
    def __init__(self, node_id: _Optional[str] = ..., slots: _Optional[int] = ..., resources: _Optional[_Mapping[str, float]] = ..., node_labels: _Optional[_Mapping[str, str]] = ...) -> None: ...

class HoldRequest(_message.Message):
    __slots__ = ("min_priority", "fan_out", "task_ids")
    MIN_PRIORITY_FIELD_NUMBER: _ClassVar[int]
    FAN_OUT_FIELD_NUMBER: _ClassVar[int]
    TASK_IDS_FIELD_NUMBER: _ClassVar[int]
    min_priority: int
    fan_out: bool
    task_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, min_priority: _Optional[int] = ..., fan_out: _Optional[bool] = ..., task_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class HoldResponse(_message.Message):
    __slots__ = ("handed_back", "accepted")
    HANDED_BACK_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    handed_back: int
    accepted: bool
    def __init__(self, handed_back: _Optional[int] = ..., accepted: _Optional[bool] = ...) -> None: ...

class KillRequest(_message.Message):
    __slots__ = ("units",)
    UNITS_FIELD_NUMBER: _ClassVar[int]
    units: _containers.RepeatedCompositeFieldContainer[RunningUnit]
    def __init__(self, units: _Optional[_Iterable[_Union[RunningUnit, _Mapping]]] = ...) -> None: ...

class KillResponse(_message.Message):
    __slots__ = ("killed",)
    KILLED_FIELD_NUMBER: _ClassVar[int]
    killed: int
    def __init__(self, killed: _Optional[int] = ...) -> None: ...
