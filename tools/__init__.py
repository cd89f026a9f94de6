"""The AI's tool calls: the router (deadline, exactly-once results) and the tools themselves."""
