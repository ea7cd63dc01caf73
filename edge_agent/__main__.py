from edge_agent.cli import agent_app

# The agent group: no sub-command runs the daemon, `enroll` enrolls.
agent_app()
