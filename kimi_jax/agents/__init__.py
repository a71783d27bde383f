"""Agents: K2.5 calling tools in a loop (Agent mode) and fanning a task out to many sub-agents
decoded together through one serving engine (Agent Swarm), with safe built-in tools."""

from kimi_jax.agents.agent import (
    CONTEXT_POLICIES,
    Agent,
    AgentEvent,
    AgentResult,
    Step,
    ToolCallRecord,
)
from kimi_jax.agents.files import file_tools
from kimi_jax.agents.sandbox import python_tool, run_python
from kimi_jax.agents.swarm import SubagentRun, Swarm, SwarmResult
from kimi_jax.agents.tools import Tool, as_tool, calculator

__all__ = [
    "CONTEXT_POLICIES", "Agent", "AgentEvent", "AgentResult", "Step", "SubagentRun", "Swarm", "SwarmResult", "Tool",
    "ToolCallRecord", "as_tool", "calculator", "file_tools", "python_tool", "run_python",
]
