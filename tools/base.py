"""The Tool interface, the registry, and what a tool may do to its call.

A tool is a name, a description and a JSON Schema for its arguments (all three are sent to
the gateway, so the AI knows when and how to call it), and ``async run(call, args)``. What
``run`` returns becomes the ``tool_result``: a string as is, anything else JSON-encoded.
Raise :class:`ToolError` with a sentence the AI can repeat to the caller.
"""

from __future__ import annotations

import abc
import contextvars
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import jsonschema

log = logging.getLogger("voxbridge.tools")

#: The id of the tool call being run (set by the router in each tool's task): HTTP tools send it
#: as an idempotency key, so a workflow that is retried can recognise the same request.
TOOL_CALL_ID: contextvars.ContextVar[str] = contextvars.ContextVar("voxbridge_tool_call_id", default="")


class ToolError(Exception):
    """A tool failed in a way the AI should hear about (``str()`` is what it is told)."""


@dataclass(slots=True)
class ChannelInfo:
    """The Asterisk channel behind a call, as AMI reported it."""

    name: str
    uniqueid: str = ""
    linkedid: str = ""
    caller_num: str = ""
    caller_name: str = ""
    context: str = ""
    exten: str = ""
    variables: dict[str, str] = field(default_factory=dict)
    #: How to act on the channel when it is not AMI (a call that came in over ARI): see ChannelDriver.
    driver: ChannelDriver | None = None


class ChannelDriver(Protocol):
    """Acts on one call's channel by a way other than AMI (bridge/ari_ingress.py: ARI).

    Each method raises :class:`ToolError` with a sentence the AI (or the API caller) can use.
    The allowlists are checked before any of them is called (tools/ami.py).
    """

    #: How the channel is reached, for messages ("ARI").
    via: str

    async def redirect(self, context: str, exten: str) -> None: ...

    async def hangup(self, cause: int) -> None: ...

    async def play_dtmf(self, digits: str, duration_ms: int) -> None: ...

    async def set_variable(self, name: str, value: str) -> None: ...


class CallControl(Protocol):
    """What a running tool can see of, and do to, its call (implemented by the session)."""

    # Read-only members (properties), so that a call whose attributes are plain, more specific
    # or mutable types (dict rather than Mapping) still satisfies the protocol.
    @property
    def call_id(self) -> str: ...

    @property
    def profile_name(self) -> str: ...

    @property
    def variables(self) -> Mapping[str, str]: ...

    @property
    def metadata(self) -> Mapping[str, Any]: ...

    @property
    def channel(self) -> ChannelInfo | None: ...

    @property
    def playout_pending_ms(self) -> int: ...

    async def wait_playout(self, max_wait: float) -> None:
        """Until the AI has finished speaking what is queued, at most ``max_wait`` s."""

    def end(self, reason: str, *, after_speech: bool = True) -> None:
        """End the call, after the AI's current sentence if ``after_speech``."""

    def note_handoff(self, reason: str | None) -> None:
        """Asterisk is about to take the channel away (Redirect, Hangup): record why, so the
        socket closing is not mistaken for the caller hanging up. ``None`` withdraws it."""

    def context(self) -> dict[str, Any]:
        """The call context sent to external tools (caller, called, channel, profile, metadata)."""


def arguments(required: Sequence[str] = (), **properties: dict[str, Any]) -> dict[str, Any]:
    """A tool's ``parameters``: a JSON Schema object with these properties and nothing else
    (``additionalProperties: false``: an argument the AI invents is an error it is told about)."""
    schema: dict[str, Any] = {"type": "object", "properties": {k: dict(v) for k, v in properties.items()}}
    if required:
        schema["required"] = list(required)
    schema["additionalProperties"] = False
    return schema


def text(description: str, **more: Any) -> dict[str, Any]:
    """A string argument."""
    return {"type": "string", "description": description, **more}


def flag(description: str) -> dict[str, Any]:
    """A boolean argument."""
    return {"type": "boolean", "description": description}


#: The reason an AI gives for ending a call (kept in the call record).
END_REASON = text("why the call ends, for the call record")
#: "After your current sentence", the default of every tool that ends or moves a call.
AFTER_SPEECH = flag("finish the current sentence first (default true)")


class Tool(abc.ABC):
    name: str
    description: str
    parameters: dict[str, Any] = {"type": "object", "properties": {}}
    #: Per-tool deadline in seconds; the router caps it at the overall tool deadline.
    timeout: float | None = None

    def spec(self) -> dict[str, Any]:
        """What the gateway is told about this tool."""
        return {"name": self.name, "description": self.description, "parameters": self.parameters}

    @abc.abstractmethod
    async def run(self, call: CallControl, args: dict[str, Any]) -> Any: ...


class ToolSource(Protocol):
    """A server whose tools are discovered while the bridge runs (tools/mcp.py): it publishes its
    current tools into the registry with :meth:`ToolRegistry.set_source_tools`."""

    @property
    def name(self) -> str: ...

    async def run(self) -> None:
        """Connect, list, keep listing and reconnect, until cancelled (a supervised part)."""

    def health(self) -> dict[str, Any]:
        """What /v1/health and /metrics say about this source."""


class ToolRegistry:
    """Tools by name, with their argument validators compiled once.

    Tools registered with :meth:`register` stay for the process's life. A tool source's set
    changes while the bridge runs (:meth:`set_source_tools` replaces it whole); a call works on
    a :meth:`snapshot` taken when it starts, so what was offered to the AI is what it may call.
    A name is held by whoever registered it first: a source's tool whose name is taken (by a
    configured tool or another source) is refused and logged with both origins.
    """

    def __init__(self) -> None:
        self._tools: dict[str, Tool] = {}
        self._validators: dict[str, jsonschema.protocols.Validator] = {}
        #: Who holds each name: "" for a registered tool, else the source's name.
        self._holder: dict[str, str] = {}
        #: Each source's tool names now, in the order it listed them.
        self._source_names: dict[str, list[str]] = {}
        #: Each source's refused names → why (logged when they first appear).
        self._refused: dict[str, dict[str, str]] = {}
        #: The sources whose tools this registry holds (bridge/app.py starts them).
        self.sources: list[ToolSource] = []

    @staticmethod
    def _compile(tool: Tool) -> jsonschema.protocols.Validator:
        if not tool.name or not tool.name.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"tool name {tool.name!r} must be letters, digits, '_' or '-'")
        cls = jsonschema.validators.validator_for(tool.parameters, default=jsonschema.Draft202012Validator)
        try:
            cls.check_schema(tool.parameters)
        except jsonschema.SchemaError as exc:
            raise ValueError(f"tool {tool.name!r} has an invalid parameters schema: {exc.message}") from None
        return cls(tool.parameters)

    def register(self, tool: Tool) -> Tool:
        validator = self._compile(tool)
        self._tools[tool.name] = tool
        self._validators[tool.name] = validator
        self._holder[tool.name] = ""
        return tool

    def add_source(self, source: ToolSource) -> ToolSource:
        """Hold ``source``'s tools (none until it publishes them)."""
        if source.name in self._source_names:
            raise ValueError(f"tool source {source.name!r} is added twice")
        self.sources.append(source)
        self._source_names[source.name] = []
        self._refused[source.name] = {}
        return source

    @staticmethod
    def _origin(holder: str) -> str:
        return f"tool source {holder!r}" if holder else "a built-in or configured tool"

    def set_source_tools(self, source: str, tools: Iterable[Tool]) -> dict[str, str]:
        """Replace the tools of ``source`` with ``tools``; returns the refused ones: name → why.

        Refused: a name held by a configured tool or another source (the first registered
        keeps it), a name twice in ``tools``, a bad name or schema. Each refusal is logged
        (warning) when it first appears, with both origins.
        """
        for name in self._source_names.get(source, []):
            if self._holder.get(name) == source:
                del self._tools[name], self._validators[name], self._holder[name]
        kept: list[str] = []
        refused: dict[str, str] = {}
        for tool in tools:
            holder = self._holder.get(tool.name)
            if tool.name in kept:
                refused[tool.name] = f"tool source {source!r} lists the name {tool.name!r} twice: the first is kept"
                continue
            if tool.name in refused:
                continue
            if holder is not None:
                refused[tool.name] = (f"tool {tool.name!r} of tool source {source!r} refused: the name is "
                                      f"already taken by {self._origin(holder)} (the first registered keeps it)")
                continue
            try:
                validator = self._compile(tool)
            except ValueError as exc:
                refused[tool.name] = f"tool source {source!r}: {exc}"
                continue
            self._tools[tool.name] = tool
            self._validators[tool.name] = validator
            self._holder[tool.name] = source
            kept.append(tool.name)
        self._source_names[source] = kept
        before = self._refused.get(source, {})
        for name, why in refused.items():
            if before.get(name) != why:
                log.warning("%s", why)
        self._refused[source] = refused
        return refused

    def source_tools(self, source: str) -> list[str]:
        """The names ``source`` has in the registry now (none if it is down or unknown)."""
        return list(self._source_names.get(source, []))

    def refused(self, source: str) -> dict[str, str]:
        """The names of ``source`` refused at its last listing: name → why."""
        return dict(self._refused.get(source, {}))

    def offered(self, tools: Sequence[str], sources: Sequence[str] = ()) -> list[str]:
        """The names a profile offers now: its ``tools``, then every tool of its ``sources``."""
        names = list(tools)
        seen = set(names)
        for source in sources:
            for name in self._source_names.get(source, []):
                if name not in seen:
                    seen.add(name)
                    names.append(name)
        return names

    def snapshot(self, names: Iterable[str]) -> ToolRegistry:
        """A registry of just these tools as they are now (unknown names are left out): a call's
        own view, unchanged by a source re-listing or going away during the call."""
        snap = ToolRegistry()
        for name in names:
            if name in self._tools:
                snap._tools[name] = self._tools[name]
                snap._validators[name] = self._validators[name]
                snap._holder[name] = self._holder[name]
        return snap

    def get(self, name: str) -> Tool | None:
        return self._tools.get(name)
    def __contains__(self, name: object) -> bool:
        return name in self._tools

    @property
    def names(self) -> set[str]:
        return set(self._tools)

    def specs(self, names: list[str]) -> list[dict[str, Any]]:
        return [self._tools[n].spec() for n in names if n in self._tools]

    def validate(self, name: str, args: dict[str, Any]) -> str | None:
        """None if ``args`` fit the tool's schema, else one sentence naming the problem."""
        errors = sorted(self._validators[name].iter_errors(args), key=lambda e: list(e.absolute_path))
        if not errors:
            return None
        parts = []
        for err in errors[:3]:
            where = "/".join(str(p) for p in err.absolute_path)
            parts.append(f"{where}: {err.message}" if where else err.message)
        return "invalid arguments: " + "; ".join(parts)
