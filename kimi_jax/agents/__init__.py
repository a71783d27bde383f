"""Agents: K2.5 calling tools in a loop (Agent mode) and fanning a task out to many sub-agents
decoded together through one serving engine (Agent Swarm), with safe built-in tools."""
