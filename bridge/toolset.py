"""The tool factory: the one registry of tools every call draws from.

Built-ins (tools/builtin.py), the telephony tools over AMI (tools/ami.py, behind the allowlists of
``allow.transfer`` and ``allow.originate``), the HTTP and n8n tools of the configuration
(tools/http.py), and any extra tools the embedding code passes; and the tool sources (MCP servers,
tools/mcp.py), whose tools the registry holds while they are up. The bridge reaches the tools
package only through here and through the interfaces tools/base.py and tools/router.py expose.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tools.ami import AMI_TOOLS, Telephony
from tools.base import Tool, ToolRegistry
from tools.builtin import BUILTINS
from tools.http import build_http_tools, expand_headers
from tools.http import make_client as make_http_client
from tools.mcp import build_mcp_sources
from tools.mcp import first_listing as first_tool_listing

from .config import Config

__all__ = ["build_tools", "expand_headers", "first_tool_listing", "make_http_client", "make_telephony"]

if TYPE_CHECKING:
    from .ami import AmiClient


def make_telephony(config: Config, ami: AmiClient | None = None) -> Telephony:
    """What the AMI tools (and the fallback, and the API) may do to Asterisk, under the allowlists."""
    o = config.originate
    return Telephony(ami, transfer_allow=config.allow.transfer, originate_allow=config.allow.originate,
                     originate_channel=o.channel, originate_context=o.context, originate_exten=o.exten,
                     ring_timeout=o.ring_timeout, caller_id=o.caller_id)


def build_tools(config: Config, extra: list[Tool] | None = None, telephony: Telephony | None = None,
                http_client: Any = None) -> ToolRegistry:
    """The registry every call draws from: built-ins, telephony tools, configured tools, ``extra``."""
    registry = ToolRegistry()
    for cls in BUILTINS.values():
        registry.register(cls())
    telephony = telephony or make_telephony(config)
    for ami_cls in AMI_TOOLS:
        registry.register(ami_cls(telephony))
    for tool in build_http_tools(config.tools, http_client):
        registry.register(tool)
    for extra_tool in extra or []:
        registry.register(extra_tool)
    # MCP servers (tool_sources): their tools arrive once bridge/app.py starts the sources.
    for source in build_mcp_sources(config.tool_sources, registry.set_source_tools):
        registry.add_source(source)
    return registry
