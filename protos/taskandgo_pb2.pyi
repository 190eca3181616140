from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TaskSpec(_message.Message):
    __slots__ = ("id", "priority", "data", "argv", "call", "args_json", "strategy", "shards", "items_json", "timeout_s", "retries", "labels", "on_every_node", "run_at", "delay_s", "after", "after_any", "resources", "require", "prefer", "concurrency_keys")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class ResourcesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    ARGV_FIELD_NUMBER: _ClassVar[int]
    CALL_FIELD_NUMBER: _ClassVar[int]
    ARGS_JSON_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    ITEMS_JSON_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    RETRIES_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    ON_EVERY_NODE_FIELD_NUMBER: _ClassVar[int]
    RUN_AT_FIELD_NUMBER: _ClassVar[int]
    DELAY_S_FIELD_NUMBER: _ClassVar[int]
    AFTER_FIELD_NUMBER: _ClassVar[int]
    AFTER_ANY_FIELD_NUMBER: _ClassVar[int]
    RESOURCES_FIELD_NUMBER: _ClassVar[int]
    REQUIRE_FIELD_NUMBER: _ClassVar[int]
    PREFER_FIELD_NUMBER: _ClassVar[int]
    CONCURRENCY_KEYS_FIELD_NUMBER: _ClassVar[int]
    id: str
    priority: str
    data: str
    argv: _containers.RepeatedScalarFieldContainer[str]
    call: str
    args_json: str
    strategy: str
    shards: int
    items_json: str
    timeout_s: float
    retries: int
    labels: _containers.ScalarMap[str, str]
    on_every_node: bool
    run_at: str
    delay_s: float
    after: _containers.RepeatedScalarFieldContainer[str]
    after_any: bool
    resources: _containers.ScalarMap[str, float]
    require: _containers.RepeatedScalarFieldContainer[str]
    prefer: _containers.RepeatedScalarFieldContainer[str]
    concurrency_keys: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, id: _Optional[str] = ..., priority: _Optional[str] = ..., data: _Optional[str] = ..., argv: _Optional[_Iterable[str]] = ..., call: _Optional[str] = ..., args_json: _Optional[str] = ..., strategy: _Optional[str] = ..., shards: _Optional[int] = ..., items_json: _Optional[str] = ..., timeout_s: _Optional[float] = ..., retries: _Optional[int] = ..., labels: _Optional[_Mapping[str, str]] = ..., on_every_node: _Optional[bool] = ..., run_at: _Optional[str] = ..., delay_s: _Optional[float] = ..., after: _Optional[_Iterable[str]] = ..., after_any: _Optional[bool] = ..., resources: _Optional[_Mapping[str, float]] = ..., require: _Optional[_Iterable[str]] = ..., prefer: _Optional[_Iterable[str]] = ..., concurrency_keys: _Optional[_Iterable[str]] = ...) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("index", "status", "attempts", "node", "exit_code", "result", "error", "started_at", "finished_at", "stderr", "truncated", "output_bytes")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    STDERR_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_BYTES_FIELD_NUMBER: _ClassVar[int]
    index: int
    status: str
    attempts: int
    node: str
    exit_code: int
    result: str
    error: str
    started_at: float
    finished_at: float
    stderr: str
    truncated: bool
    output_bytes: int
    def __init__(self, index: _Optional[int] = ..., status: _Optional[str] = ..., attempts: _Optional[int] = ..., node: _Optional[str] = ..., exit_code: _Optional[int] = ..., result: _Optional[str] = ..., error: _Optional[str] = ..., started_at: _Optional[float] = ..., finished_at: _Optional[float] = ..., stderr: _Optional[str] = ..., truncated: _Optional[bool] = ..., output_bytes: _Optional[int] = ...) -> None: ...

class Task(_message.Message):
    __slots__ = ("id", "spec", "priority", "strategy", "status", "attempts", "node", "exit_code", "result", "error", "created_at", "started_at", "finished_at", "chunks", "chunk_count", "chunks_done", "priority_name", "stderr", "truncated", "output_bytes", "run_at", "schedule_id", "slot", "parents", "children", "pending_reason")
    ID_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    CHUNK_COUNT_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_DONE_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_NAME_FIELD_NUMBER: _ClassVar[int]
    STDERR_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_BYTES_FIELD_NUMBER: _ClassVar[int]
    RUN_AT_FIELD_NUMBER: _ClassVar[int]
    SCHEDULE_ID_FIELD_NUMBER: _ClassVar[int]
    SLOT_FIELD_NUMBER: _ClassVar[int]
    PARENTS_FIELD_NUMBER: _ClassVar[int]
    CHILDREN_FIELD_NUMBER: _ClassVar[int]
    PENDING_REASON_FIELD_NUMBER: _ClassVar[int]
    id: str
    spec: TaskSpec
    priority: int
    strategy: str
    status: str
    attempts: int
    node: str
    exit_code: int
    result: str
    error: str
    created_at: float
    started_at: float
    finished_at: float
    chunks: _containers.RepeatedCompositeFieldContainer[Chunk]
    chunk_count: int
    chunks_done: int
    priority_name: str
    stderr: str
    truncated: bool
    output_bytes: int
    run_at: float
    schedule_id: str
    slot: float
    parents: _containers.RepeatedScalarFieldContainer[str]
    children: _containers.RepeatedScalarFieldContainer[str]
    pending_reason: str
    def __init__(self, id: _Optional[str] = ..., spec: _Optional[_Union[TaskSpec, _Mapping]] = ..., priority: _Optional[int] = ..., strategy: _Optional[str] = ..., status: _Optional[str] = ..., attempts: _Optional[int] = ..., node: _Optional[str] = ..., exit_code: _Optional[int] = ..., result: _Optional[str] = ..., error: _Optional[str] = ..., created_at: _Optional[float] = ..., started_at: _Optional[float] = ..., finished_at: _Optional[float] = ..., chunks: _Optional[_Iterable[_Union[Chunk, _Mapping]]] = ..., chunk_count: _Optional[int] = ..., chunks_done: _Optional[int] = ..., priority_name: _Optional[str] = ..., stderr: _Optional[str] = ..., truncated: _Optional[bool] = ..., output_bytes: _Optional[int] = ..., run_at: _Optional[float] = ..., schedule_id: _Optional[str] = ..., slot: _Optional[float] = ..., parents: _Optional[_Iterable[str]] = ..., children: _Optional[_Iterable[str]] = ..., pending_reason: _Optional[str] = ...) -> None: ...

class SubmitTaskRequest(_message.Message):
    __slots__ = ("task",)
    TASK_FIELD_NUMBER: _ClassVar[int]
    task: TaskSpec
    def __init__(self, task: _Optional[_Union[TaskSpec, _Mapping]] = ...) -> None: ...

class SubmitTaskResponse(_message.Message):
    __slots__ = ("task_id", "created", "status")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    created: bool
    status: str
    def __init__(self, task_id: _Optional[str] = ..., created: _Optional[bool] = ..., status: _Optional[str] = ...) -> None: ...

class SubmitTasksRequest(_message.Message):
    __slots__ = ("tasks",)
    TASKS_FIELD_NUMBER: _ClassVar[int]
    tasks: _containers.RepeatedCompositeFieldContainer[TaskSpec]
    def __init__(self, tasks: _Optional[_Iterable[_Union[TaskSpec, _Mapping]]] = ...) -> None: ...

class SubmitTasksResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[SubmitTaskResponse]
    def __init__(self, results: _Optional[_Iterable[_Union[SubmitTaskResponse, _Mapping]]] = ...) -> None: ...

class GetTaskRequest(_message.Message):
    __slots__ = ("task_id",)
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    def __init__(self, task_id: _Optional[str] = ...) -> None: ...

class GetTaskResponse(_message.Message):
    __slots__ = ("task",)
    TASK_FIELD_NUMBER: _ClassVar[int]
    task: Task
    def __init__(self, task: _Optional[_Union[Task, _Mapping]] = ...) -> None: ...

class ListTasksRequest(_message.Message):
    __slots__ = ("status", "labels", "limit", "page_token")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    status: str
    labels: _containers.RepeatedScalarFieldContainer[str]
    limit: int
    page_token: str
    def __init__(self, status: _Optional[str] = ..., labels: _Optional[_Iterable[str]] = ..., limit: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListTasksResponse(_message.Message):
    __slots__ = ("tasks", "next_page_token", "total")
    TASKS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    tasks: _containers.RepeatedCompositeFieldContainer[Task]
    next_page_token: str
    total: int
    def __init__(self, tasks: _Optional[_Iterable[_Union[Task, _Mapping]]] = ..., next_page_token: _Optional[str] = ..., total: _Optional[int] = ...) -> None: ...

class CancelTaskRequest(_message.Message):
    __slots__ = ("task_id",)
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    def __init__(self, task_id: _Optional[str] = ...) -> None: ...

class CancelTaskResponse(_message.Message):
    __slots__ = ("task_id", "status")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    status: str
    def __init__(self, task_id: _Optional[str] = ..., status: _Optional[str] = ...) -> None: ...

class WaitTasksRequest(_message.Message):
    __slots__ = ("task_ids", "timeout_s")
    TASK_IDS_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    task_ids: _containers.RepeatedScalarFieldContainer[str]
    timeout_s: float
    def __init__(self, task_ids: _Optional[_Iterable[str]] = ..., timeout_s: _Optional[float] = ...) -> None: ...

class WaitTasksResponse(_message.Message):
    __slots__ = ("tasks", "complete")
    TASKS_FIELD_NUMBER: _ClassVar[int]
    COMPLETE_FIELD_NUMBER: _ClassVar[int]
    tasks: _containers.RepeatedCompositeFieldContainer[Task]
    complete: bool
    def __init__(self, tasks: _Optional[_Iterable[_Union[Task, _Mapping]]] = ..., complete: _Optional[bool] = ...) -> None: ...

class WatchTasksRequest(_message.Message):
    __slots__ = ("task_ids", "after_seq")
    TASK_IDS_FIELD_NUMBER: _ClassVar[int]
    AFTER_SEQ_FIELD_NUMBER: _ClassVar[int]
    task_ids: _containers.RepeatedScalarFieldContainer[str]
    after_seq: int
    def __init__(self, task_ids: _Optional[_Iterable[str]] = ..., after_seq: _Optional[int] = ...) -> None: ...

class TaskEvent(_message.Message):
    __slots__ = ("seq", "kind", "task_id", "status", "chunk", "node", "at", "detail")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    seq: int
    kind: str
    task_id: str
    status: str
    chunk: int
    node: str
    at: float
    detail: str
    def __init__(self, seq: _Optional[int] = ..., kind: _Optional[str] = ..., task_id: _Optional[str] = ..., status: _Optional[str] = ..., chunk: _Optional[int] = ..., node: _Optional[str] = ..., at: _Optional[float] = ..., detail: _Optional[str] = ...) -> None: ...

class NodeStatusRequest(_message.Message):
    __slots__ = ("include_digest",)
    INCLUDE_DIGEST_FIELD_NUMBER: _ClassVar[int]
    include_digest: bool
    def __init__(self, include_digest: _Optional[bool] = ...) -> None: ...

class NodeStatus(_message.Message):
    __slots__ = ("id", "role", "raft_term", "commit_index", "applied_index", "leader_id", "queue_by_priority", "queued", "running", "slots", "free_slots", "cpu_percent", "memory_percent", "memory_rss", "grpc_address", "http_address", "raft_address", "voter", "strategy", "ready", "last_seen_s", "state_digest", "prefetch", "held_back", "fatal", "cluster_id", "fsync", "foreign_peers", "raft_syncs", "sandbox", "resources_source", "cpu_limit_cores", "memory_used", "memory_limit", "cgroup", "strategy_configured", "offer", "node_labels")
    class QueueByPriorityEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class OfferEntry(_message.Message):
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
    ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    RAFT_TERM_FIELD_NUMBER: _ClassVar[int]
    COMMIT_INDEX_FIELD_NUMBER: _ClassVar[int]
    APPLIED_INDEX_FIELD_NUMBER: _ClassVar[int]
    LEADER_ID_FIELD_NUMBER: _ClassVar[int]
    QUEUE_BY_PRIORITY_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    FREE_SLOTS_FIELD_NUMBER: _ClassVar[int]
    CPU_PERCENT_FIELD_NUMBER: _ClassVar[int]
    MEMORY_PERCENT_FIELD_NUMBER: _ClassVar[int]
    MEMORY_RSS_FIELD_NUMBER: _ClassVar[int]
    GRPC_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    HTTP_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    RAFT_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    VOTER_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_S_FIELD_NUMBER: _ClassVar[int]
    STATE_DIGEST_FIELD_NUMBER: _ClassVar[int]
    PREFETCH_FIELD_NUMBER: _ClassVar[int]
    HELD_BACK_FIELD_NUMBER: _ClassVar[int]
    FATAL_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_ID_FIELD_NUMBER: _ClassVar[int]
    FSYNC_FIELD_NUMBER: _ClassVar[int]
    FOREIGN_PEERS_FIELD_NUMBER: _ClassVar[int]
    RAFT_SYNCS_FIELD_NUMBER: _ClassVar[int]
    SANDBOX_FIELD_NUMBER: _ClassVar[int]
    RESOURCES_SOURCE_FIELD_NUMBER: _ClassVar[int]
    CPU_LIMIT_CORES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_USED_FIELD_NUMBER: _ClassVar[int]
    MEMORY_LIMIT_FIELD_NUMBER: _ClassVar[int]
    CGROUP_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_CONFIGURED_FIELD_NUMBER: _ClassVar[int]
    OFFER_FIELD_NUMBER: _ClassVar[int]
    NODE_LABELS_FIELD_NUMBER: _ClassVar[int]
    id: str
    role: str
    raft_term: int
    commit_index: int
    applied_index: int
    leader_id: str
    queue_by_priority: _containers.ScalarMap[str, int]
    queued: int
    running: _containers.RepeatedScalarFieldContainer[str]
    slots: int
    free_slots: int
    cpu_percent: float
    memory_percent: float
    memory_rss: int
    grpc_address: str
    http_address: str
    raft_address: str
    voter: bool
    strategy: str
    ready: bool
    last_seen_s: float
    state_digest: str
    prefetch: int
    held_back: int
    fatal: str
    cluster_id: str
    fsync: str
    foreign_peers: _containers.RepeatedScalarFieldContainer[str]
    raft_syncs: int
    sandbox: str
    resources_source: str
    cpu_limit_cores: float
    memory_used: int
    memory_limit: int
    cgroup: str
    strategy_configured: str
    offer: _containers.ScalarMap[str, float]
    node_labels: _containers.ScalarMap[str, str]
    def __init__(self, id: _Optional[str] = ..., role: _Optional[str] = ..., raft_term: _Optional[int] = ..., commit_index: _Optional[int] = ..., applied_index: _Optional[int] = ..., leader_id: _Optional[str] = ..., queue_by_priority: _Optional[_Mapping[str, int]] = ..., queued: _Optional[int] = ..., running: _Optional[_Iterable[str]] = ..., slots: _Optional[int] = ..., free_slots: _Optional[int] = ..., cpu_percent: _Optional[float] = ..., memory_percent: _Optional[float] = ..., memory_rss: _Optional[int] = ..., grpc_address: _Optional[str] = ..., http_address: _Optional[str] = ..., raft_address: _Optional[str] = ..., voter: _Optional[bool] = ..., strategy: _Optional[str] = ..., ready: _Optional[bool] = ..., last_seen_s: _Optional[float] = ..., state_digest: _Optional[str] = ..., prefetch: _Optional[int] = ..., held_back: _Optional[int] = ..., fatal: _Optional[str] = ..., cluster_id: _Optional[str] = ..., fsync: _Optional[str] = ..., foreign_peers: _Optional[_Iterable[str]] = ..., raft_syncs: _Optional[int] = ..., sandbox: _Optional[str] = ..., resources_source: _Optional[str] = ..., cpu_limit_cores: _Optional[float] = ..., memory_used: _Optional[int] = ..., memory_limit: _Optional[int] = ..., cgroup: _Optional[str] = ..., strategy_configured: _Optional[str] = ..., offer: _Optional[_Mapping[str, float]] = ..., node_labels: _Optional[_Mapping[str, str]] = ...) -> None: ...

class GetTaskOutputRequest(_message.Message):
    __slots__ = ("task_id", "chunk", "stream", "offset", "limit", "local")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    STREAM_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    LOCAL_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    chunk: int
    stream: str
    offset: int
    limit: int
    local: bool
    def __init__(self, task_id: _Optional[str] = ..., chunk: _Optional[int] = ..., stream: _Optional[str] = ..., offset: _Optional[int] = ..., limit: _Optional[int] = ..., local: _Optional[bool] = ...) -> None: ...

class GetTaskOutputResponse(_message.Message):
    __slots__ = ("task_id", "chunk", "node", "stream", "offset", "data", "kept", "written", "complete", "attempt")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    STREAM_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    KEPT_FIELD_NUMBER: _ClassVar[int]
    WRITTEN_FIELD_NUMBER: _ClassVar[int]
    COMPLETE_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    chunk: int
    node: str
    stream: str
    offset: int
    data: bytes
    kept: int
    written: int
    complete: bool
    attempt: int
    def __init__(self, task_id: _Optional[str] = ..., chunk: _Optional[int] = ..., node: _Optional[str] = ..., stream: _Optional[str] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ..., kept: _Optional[int] = ..., written: _Optional[int] = ..., complete: _Optional[bool] = ..., attempt: _Optional[int] = ...) -> None: ...

class ClusterStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ClusterStatusResponse(_message.Message):
    __slots__ = ("leader_id", "nodes", "tasks_by_status", "dropped_results", "committed_results", "queue_by_priority")
    class TasksByStatusEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class QueueByPriorityEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    LEADER_ID_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    TASKS_BY_STATUS_FIELD_NUMBER: _ClassVar[int]
    DROPPED_RESULTS_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_RESULTS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_BY_PRIORITY_FIELD_NUMBER: _ClassVar[int]
    leader_id: str
    nodes: _containers.RepeatedCompositeFieldContainer[NodeStatus]
    tasks_by_status: _containers.ScalarMap[str, int]
    dropped_results: int
    committed_results: int
    queue_by_priority: _containers.ScalarMap[str, int]
    def __init__(self, leader_id: _Optional[str] = ..., nodes: _Optional[_Iterable[_Union[NodeStatus, _Mapping]]] = ..., tasks_by_status: _Optional[_Mapping[str, int]] = ..., dropped_results: _Optional[int] = ..., committed_results: _Optional[int] = ..., queue_by_priority: _Optional[_Mapping[str, int]] = ...) -> None: ...

class GetPolicyRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Policy(_message.Message):
    __slots__ = ("limits", "held", "weights", "tenant_label")
    class LimitsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class HeldEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class WeightsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    HELD_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    TENANT_LABEL_FIELD_NUMBER: _ClassVar[int]
    limits: _containers.ScalarMap[str, int]
    held: _containers.ScalarMap[str, int]
    weights: _containers.ScalarMap[str, float]
    tenant_label: str
    def __init__(self, limits: _Optional[_Mapping[str, int]] = ..., held: _Optional[_Mapping[str, int]] = ..., weights: _Optional[_Mapping[str, float]] = ..., tenant_label: _Optional[str] = ...) -> None: ...

class SetPolicyRequest(_message.Message):
    __slots__ = ("limits", "remove_limits", "weights", "remove_weights", "tenant_label", "set_tenant_label")
    class LimitsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class WeightsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    REMOVE_LIMITS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    REMOVE_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    TENANT_LABEL_FIELD_NUMBER: _ClassVar[int]
    SET_TENANT_LABEL_FIELD_NUMBER: _ClassVar[int]
    limits: _containers.ScalarMap[str, int]
    remove_limits: _containers.RepeatedScalarFieldContainer[str]
    weights: _containers.ScalarMap[str, float]
    remove_weights: _containers.RepeatedScalarFieldContainer[str]
    tenant_label: str
    set_tenant_label: bool
    def __init__(self, limits: _Optional[_Mapping[str, int]] = ..., remove_limits: _Optional[_Iterable[str]] = ..., weights: _Optional[_Mapping[str, float]] = ..., remove_weights: _Optional[_Iterable[str]] = ..., tenant_label: _Optional[str] = ..., set_tenant_label: _Optional[bool] = ...) -> None: ...

class GetSettingsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Settings(_message.Message):
    __slots__ = ("default_strategy",)
    DEFAULT_STRATEGY_FIELD_NUMBER: _ClassVar[int]
    default_strategy: str
    def __init__(self, default_strategy: _Optional[str] = ...) -> None: ...

class Schedule(_message.Message):
    __slots__ = ("id", "cron", "time_zone", "task", "overlap", "missed", "catchup_s", "paused", "created_at", "last_slot", "next_fire", "fires_total", "skipped_total", "recent", "last_task")
    ID_FIELD_NUMBER: _ClassVar[int]
    CRON_FIELD_NUMBER: _ClassVar[int]
    TIME_ZONE_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    OVERLAP_FIELD_NUMBER: _ClassVar[int]
    MISSED_FIELD_NUMBER: _ClassVar[int]
    CATCHUP_S_FIELD_NUMBER: _ClassVar[int]
    PAUSED_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    LAST_SLOT_FIELD_NUMBER: _ClassVar[int]
    NEXT_FIRE_FIELD_NUMBER: _ClassVar[int]
    FIRES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    RECENT_FIELD_NUMBER: _ClassVar[int]
    LAST_TASK_FIELD_NUMBER: _ClassVar[int]
    id: str
    cron: str
    time_zone: str
    task: TaskSpec
    overlap: str
    missed: str
    catchup_s: float
    paused: bool
    created_at: float
    last_slot: float
    next_fire: float
    fires_total: int
    skipped_total: int
    recent: _containers.RepeatedCompositeFieldContainer[ScheduleFire]
    last_task: str
    def __init__(self, id: _Optional[str] = ..., cron: _Optional[str] = ..., time_zone: _Optional[str] = ..., task: _Optional[_Union[TaskSpec, _Mapping]] = ..., overlap: _Optional[str] = ..., missed: _Optional[str] = ..., catchup_s: _Optional[float] = ..., paused: _Optional[bool] = ..., created_at: _Optional[float] = ..., last_slot: _Optional[float] = ..., next_fire: _Optional[float] = ..., fires_total: _Optional[int] = ..., skipped_total: _Optional[int] = ..., recent: _Optional[_Iterable[_Union[ScheduleFire, _Mapping]]] = ..., last_task: _Optional[str] = ...) -> None: ...

class ScheduleFire(_message.Message):
    __slots__ = ("slot", "task_id", "outcome", "task_status")
    SLOT_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    TASK_STATUS_FIELD_NUMBER: _ClassVar[int]
    slot: float
    task_id: str
    outcome: str
    task_status: str
    def __init__(self, slot: _Optional[float] = ..., task_id: _Optional[str] = ..., outcome: _Optional[str] = ..., task_status: _Optional[str] = ...) -> None: ...

class CreateScheduleRequest(_message.Message):
    __slots__ = ("schedule",)
    SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    schedule: Schedule
    def __init__(self, schedule: _Optional[_Union[Schedule, _Mapping]] = ...) -> None: ...

class ScheduleRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class ListSchedulesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListSchedulesResponse(_message.Message):
    __slots__ = ("schedules",)
    SCHEDULES_FIELD_NUMBER: _ClassVar[int]
    schedules: _containers.RepeatedCompositeFieldContainer[Schedule]
    def __init__(self, schedules: _Optional[_Iterable[_Union[Schedule, _Mapping]]] = ...) -> None: ...
