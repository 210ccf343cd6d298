"""smolagents' Modal executor (``CodeAgent(executor_type="modal")``), driven by a stub model: the agent's code
runs in a Jupyter kernel gateway inside a sandbox, reached over ``https://{tunnel.host}`` with requests and a
``wss://`` WebSocket with websocket-client — the library exactly as published on PyPI."""

import json

from smolagents import CodeAgent
from smolagents.models import ChatMessage, MessageRole, Model

STEP = """Thought: read the sandbox's own files and compute.
<code>
import platform
with open("/etc/os-release") as f:
    os_name = [l for l in f if l.startswith("ID=")][0].strip()
final_answer(f"{os_name} {platform.python_version()} {sum(range(10))}")
</code>"""


class ScriptedModel(Model):
    """A model that always answers with the same code step."""

    def generate(self, messages, stop_sequences=None, response_format=None, tools_to_call_from=None, **kwargs):
        return ChatMessage(role=MessageRole.ASSISTANT, content=STEP)


agent = CodeAgent(tools=[], model=ScriptedModel(), executor_type="modal", max_steps=2)
try:
    answer = agent.run("What system are you on?")
    sandbox_id = agent.python_executor.sandbox.object_id
finally:
    agent.cleanup()
print("RESULT " + json.dumps({"answer": answer, "sandbox": sandbox_id}))
