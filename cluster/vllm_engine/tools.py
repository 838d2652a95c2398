"""Tool calls with `tool_choice` "required" or a named function, for any model.

vLLM constrains such a call to the tools' JSON schema, and parses the output into tool calls, only through a tool
parser: with none, the model writes free text and `tool_calls` comes back empty. `ForcedToolCalls` is the parser
for models with no tool-call format of their own: vLLM's JSON path for "required" and named choices, and "auto"
refused by name, as there is no format to find a call in free text.
"""

from vllm.entrypoints.generate.base.protocol import ExtractedToolCallInformation
from vllm.exceptions import VLLMValidationError
from vllm.tool_parsers import ToolParser, ToolParserManager

NAME = "moecluster-forced"  # its --tool-call-parser name


class ForcedToolCalls(ToolParser):
    def adjust_request(self, request):
        if request.tools and request.tool_choice in ("auto", None):
            raise VLLMValidationError('tool_choice "auto": not supported by this server (the model has no tool-call '
                                      'format): give "required", a named function or "none"',
                                      parameter="tool_choice")
        return super().adjust_request(request)

    def extract_tool_calls(self, model_output: str, request) -> ExtractedToolCallInformation:
        """Free text holds no call: only "auto" asks for one, and it is refused."""
        return ExtractedToolCallInformation(tools_called=False, tool_calls=[], content=model_output)


def register() -> None:
    ToolParserManager.register_module(NAME, module=ForcedToolCalls)
