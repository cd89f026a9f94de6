"""Built-in tools that need nothing but the call itself."""

from __future__ import annotations

from typing import Any

from .base import END_REASON, CallControl, Tool, arguments


class EndCall(Tool):
    """Ends the call after the AI's current sentence (the goodbye is not cut off)."""

    name = "end_call"
    description = (
        "End the phone call. Use it when the caller says goodbye or the conversation is finished. "
        "Say your goodbye first: the call ends after you finish your current sentence."
    )
    parameters = arguments(reason=END_REASON)

    async def run(self, call: CallControl, args: dict[str, Any]) -> str:
        call.end("ai:" + (args.get("reason") or "end_call"), after_speech=True)
        return "ok: the call ends after your current sentence"


BUILTINS: dict[str, type[Tool]] = {EndCall.name: EndCall}
