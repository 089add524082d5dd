# ruff: noqa
# mypy: ignore-errors
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TaskKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TASK_UNSPECIFIED: _ClassVar[TaskKind]
    TASK_FIT: _ClassVar[TaskKind]
    TASK_DECODE: _ClassVar[TaskKind]
    TASK_DONE: _ClassVar[TaskKind]
    TASK_HEARTBEAT: _ClassVar[TaskKind]
TASK_UNSPECIFIED: TaskKind
TASK_FIT: TaskKind
TASK_DECODE: TaskKind
TASK_DONE: TaskKind
TASK_HEARTBEAT: TaskKind

class JoinRequest(_message.Message):
    __slots__ = ("protocol_version",)
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    def __init__(self, protocol_version: _Optional[int] = ...) -> None: ...

class JoinReply(_message.Message):
    __slots__ = ("run_id", "protocol_version", "model_json", "aggregation_json", "index", "rounds")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_JSON_FIELD_NUMBER: _ClassVar[int]
    AGGREGATION_JSON_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    protocol_version: int
    model_json: str
    aggregation_json: str
    index: int
    rounds: int
    def __init__(self, run_id: _Optional[str] = ..., protocol_version: _Optional[int] = ..., model_json: _Optional[str] = ..., aggregation_json: _Optional[str] = ..., index: _Optional[int] = ..., rounds: _Optional[int] = ...) -> None: ...

class SubscribeRequest(_message.Message):
    __slots__ = ("run_id", "key_holder")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    KEY_HOLDER_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    key_holder: bool
    def __init__(self, run_id: _Optional[str] = ..., key_holder: _Optional[bool] = ...) -> None: ...

class FitConfig(_message.Message):
    __slots__ = ("round", "lr", "epochs", "batch_size", "prox_mu", "seed", "dp_count")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    PROX_MU_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    DP_COUNT_FIELD_NUMBER: _ClassVar[int]
    round: int
    lr: float
    epochs: int
    batch_size: int
    prox_mu: float
    seed: int
    dp_count: int
    def __init__(self, round: _Optional[int] = ..., lr: _Optional[float] = ..., epochs: _Optional[int] = ..., batch_size: _Optional[int] = ..., prox_mu: _Optional[float] = ..., seed: _Optional[int] = ..., dp_count: _Optional[int] = ...) -> None: ...

class TaskHeader(_message.Message):
    __slots__ = ("kind", "run_id", "round", "task_id", "config", "body_size", "body_sha256", "message", "members")
    KIND_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    BODY_SIZE_FIELD_NUMBER: _ClassVar[int]
    BODY_SHA256_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    kind: TaskKind
    run_id: str
    round: int
    task_id: str
    config: FitConfig
    body_size: int
    body_sha256: bytes
    message: str
    members: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, kind: _Optional[_Union[TaskKind, str]] = ..., run_id: _Optional[str] = ..., round: _Optional[int] = ..., task_id: _Optional[str] = ..., config: _Optional[_Union[FitConfig, _Mapping]] = ..., body_size: _Optional[int] = ..., body_sha256: _Optional[bytes] = ..., message: _Optional[str] = ..., members: _Optional[_Iterable[int]] = ...) -> None: ...

class ServerFrame(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: TaskHeader
    chunk: bytes
    def __init__(self, header: _Optional[_Union[TaskHeader, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class UpdateHeader(_message.Message):
    __slots__ = ("run_id", "round", "task_id", "kind", "num_examples", "metrics", "body_size", "body_sha256", "error", "signature")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    BODY_SIZE_FIELD_NUMBER: _ClassVar[int]
    BODY_SHA256_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    round: int
    task_id: str
    kind: TaskKind
    num_examples: int
    metrics: _containers.ScalarMap[str, float]
    body_size: int
    body_sha256: bytes
    error: str
    signature: bytes
    def __init__(self, run_id: _Optional[str] = ..., round: _Optional[int] = ..., task_id: _Optional[str] = ..., kind: _Optional[_Union[TaskKind, str]] = ..., num_examples: _Optional[int] = ..., metrics: _Optional[_Mapping[str, float]] = ..., body_size: _Optional[int] = ..., body_sha256: _Optional[bytes] = ..., error: _Optional[str] = ..., signature: _Optional[bytes] = ...) -> None: ...

class SignedUpdate(_message.Message):
    __slots__ = ("client", "task_id", "signature", "payload")
    CLIENT_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    client: str
    task_id: str
    signature: bytes
    payload: bytes
    def __init__(self, client: _Optional[str] = ..., task_id: _Optional[str] = ..., signature: _Optional[bytes] = ..., payload: _Optional[bytes] = ...) -> None: ...

class DecodeRequest(_message.Message):
    __slots__ = ("run_id", "round", "model_digest", "updates")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    MODEL_DIGEST_FIELD_NUMBER: _ClassVar[int]
    UPDATES_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    round: int
    model_digest: bytes
    updates: _containers.RepeatedCompositeFieldContainer[SignedUpdate]
    def __init__(self, run_id: _Optional[str] = ..., round: _Optional[int] = ..., model_digest: _Optional[bytes] = ..., updates: _Optional[_Iterable[_Union[SignedUpdate, _Mapping]]] = ...) -> None: ...

class ClientFrame(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: UpdateHeader
    chunk: bytes
    def __init__(self, header: _Optional[_Union[UpdateHeader, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class SubmitReply(_message.Message):
    __slots__ = ("accepted", "message")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    message: str
    def __init__(self, accepted: _Optional[bool] = ..., message: _Optional[str] = ...) -> None: ...
