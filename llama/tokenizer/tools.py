"""Llama 3.1 tool calling, as Meta's prompt_format.md (llama-models, llama3_1/) specifies it.

The instruct models were fine-tuned to call three built-in tools and any number of user-defined ones:

    system:    Environment: ipython                     <- turns tool calling (and the code interpreter) on
               Tools: brave_search, wolfram_alpha        <- the built-in tools, named
               Cutting Knowledge Date: December 2023
               Today Date: 21 September 2024
    assistant: <|python_tag|>brave_search.call(query="...")<|eom_id|>     a built-in call
               <|python_tag|>print(2 ** 10)<|eom_id|>                      code for the interpreter
               <|python_tag|>{"type": "function", "name": ..., "parameters": {...}}<|eom_id|>   a JSON tool
               <function=name>{"arg": ...}</function><|eot_id|>            the `function_tag` format
    ipython:   the tool's output, sent back for the model to read ("tool" is the same role)

`<|eom_id|>` ends a message but not the turn: the model waits for a tool's result. This module holds
the tool vocabulary (definitions in Meta's and OpenAI's shapes, the system block, the instructions
for user-defined tools, a call written as the model writes it) and reads calls back from generated
text. llama/tokenizer/chat.py puts it into tokens. Everything here is text in, text out.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

from llama.common.errors import ArgumentError

BUILTIN_TOOLS = ("brave_search", "wolfram_alpha", "photogen", "code_interpreter")
KNOWLEDGE_CUTOFF = "December 2023"  # the Llama 3.1 model card's date
TOOL_PROMPT_FORMATS = ("json", "function_tag")  # Meta's ToolPromptFormat names (json is Meta's default)
STOP_REASONS = ("end_of_turn", "end_of_message", "out_of_tokens")  # Meta's StopReason names

BUILTIN_CALL = re.compile(r'\b(?P<name>\w+)\.call\(query="(?P<query>[^"]*)"\)')
FUNCTION_TAG_CALL = re.compile(r"<function=(?P<name>[^}]+)>(?P<args>{.*?})")


@dataclass
class ToolDefinition:
    """One tool. `parameters` is Meta's {name: {"param_type", "description", "required"}}; `schema` the
    OpenAI-shaped {"type": "function", "function": {...}} (HF's template prints it as given)."""

    name: str
    description: str = ""
    parameters: dict = field(default_factory=dict)
    schema: dict = field(default_factory=dict)

    @property
    def builtin(self) -> bool:
        return self.name in BUILTIN_TOOLS


def tool_definitions(tools) -> list[ToolDefinition]:
    """Tools given as a built-in's name ("brave_search"), Meta's ToolDefinition dict ({"tool_name",
    "description", "parameters": {name: {"param_type", "description", "required"}}}) or OpenAI's
    ({"type": "function", "function": {"name", "description", "parameters": a JSON schema}}). An OpenAI
    function named like a built-in tool declares that built-in tool."""
    if tools is None:
        return []
    if not isinstance(tools, (list, tuple)):
        raise ArgumentError(f"tools is a {type(tools).__name__}: pass a list, e.g. [\"brave_search\"] or "
                            '[{"type": "function", "function": {"name": ..., "parameters": {...}}}]')
    out = []
    for i, tool in enumerate(tools):
        out.append(_definition(tool, f"tools[{i}]"))
    names = [t.name for t in out]
    if len(set(names)) != len(names):
        raise ArgumentError(f"tools name {sorted(n for n in names if names.count(n) > 1)[0]!r} twice: "
                            "give each tool once")
    return out


def _definition(tool, where: str) -> ToolDefinition:
    if isinstance(tool, str):
        if tool not in BUILTIN_TOOLS:
            raise ArgumentError(f"{where} = {tool!r} is not a built-in tool ({', '.join(BUILTIN_TOOLS)}): "
                                "define your own tools as dicts with a name, description and parameters")
        return ToolDefinition(tool, schema=_openai_schema(tool, "", {}))
    if not isinstance(tool, dict):
        raise ArgumentError(f"{where} is a {type(tool).__name__}: a tool is a built-in's name or a dict")
    if "tool_name" in tool:  # Meta's shape
        name, description, params = tool["tool_name"], tool.get("description") or "", tool.get("parameters") or {}
        _check_name(name, where)
        if not isinstance(params, dict) or not all(isinstance(p, dict) for p in params.values()):
            raise ArgumentError(f"{where}.parameters must map each name to "
                                '{"param_type": ..., "description": ..., "required": ...}')
        params = {k: {"param_type": p.get("param_type", "string"), "description": p.get("description") or "",
                      "required": bool(p.get("required", True))} for k, p in params.items()}
        return ToolDefinition(name, description, params, _openai_schema(name, description, params))
    function = tool.get("function") if tool.get("type", "function") == "function" else None
    if not isinstance(function, dict):
        raise ArgumentError(f"{where} has no 'function' object: an OpenAI tool is "
                            '{"type": "function", "function": {"name": ..., "parameters": {...}}}')
    name, description = function.get("name"), function.get("description") or ""
    _check_name(name, f"{where}.function")
    schema = function.get("parameters") or {}
    if not isinstance(schema, dict) or not isinstance(schema.get("properties", {}), dict):
        raise ArgumentError(f"{where}.function.parameters must be a JSON schema object with 'properties'")
    required = schema.get("required") or []
    params = {k: {"param_type": (p or {}).get("type", "string"), "description": (p or {}).get("description") or "",
                  "required": k in required} for k, p in schema.get("properties", {}).items()}
    return ToolDefinition(name, description, params, tool)


def _check_name(name, where: str) -> None:
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*", name):
        raise ArgumentError(f"{where} name {name!r}: a tool name is letters, digits, '_', '.' or '-'")


def _openai_schema(name: str, description: str, params: dict) -> dict:
    properties = {k: {"type": p["param_type"], "description": p["description"]} for k, p in params.items()}
    required = [k for k, p in params.items() if p["required"]]
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": properties, "required": required}}}


# ---------------------------------------------------------------------------- prompts (Meta's examples)


def system_block(tools: list[ToolDefinition], today: str | None, message: str | None) -> str:
    """The system message Meta's examples show: `Environment: ipython` when any tool is on, then the
    `Tools:` line naming the built-ins other than the code interpreter (a blank line in its place
    when there are none), the two date lines when `today` is given, then the caller's message
    between newlines."""
    text = ""
    if tools:
        named = [t.name for t in tools if t.builtin and t.name != "code_interpreter"]
        text = "Environment: ipython\n" + (f"Tools: {', '.join(named)}\n" if named else "\n")
    if today is not None:
        text += f"Cutting Knowledge Date: {KNOWLEDGE_CUTOFF}\nToday Date: {today}\n"
    return text + (f"\n{message}\n" if message else "")


def custom_tools_message(tools: list[ToolDefinition], tool_prompt_format: str) -> str | None:
    """The user message that teaches the model the user-defined tools (None if there are none)."""
    custom = [t for t in tools if not t.builtin]
    if not custom:
        return None
    if tool_prompt_format == "function_tag":
        return _function_tag_instructions(custom)
    return ("Answer the user's question by making use of the following functions if needed.\n"
            "If none of the function can be used, please say so.\n"
            "Here is a list of functions in JSON format:\n"
            + "".join(_json_definition(t) + "\n" for t in custom) + "\nReturn function calls in JSON format.")


def _json_definition(tool: ToolDefinition) -> str:
    """A tool as Meta's JSON example writes it (4-space indents; each parameter its own object in a
    list, with "type": "object" whatever its type, as in Meta's template; `required` on one line)."""
    dumps = json.dumps
    props = ",".join(f'\n                {{\n                    {dumps(k)}: {{\n                        "type": "object",'
                     f'\n                        "description": {dumps(p["description"])}\n                    }}\n'
                     "                }" for k, p in tool.parameters.items())
    required = dumps([k for k, p in tool.parameters.items() if p["required"]])
    return ('{\n    "type": "function",\n    "function": {\n'
            f'        "name": {dumps(tool.name)},\n        "description": {dumps(tool.description)},\n'
            '        "parameters": {\n            "type": "object",\n'
            f'            "properties": [{props}\n            ],\n            "required": {required}\n'
            "        }\n    }\n}")


def _function_tag_instructions(tools: list[ToolDefinition]) -> str:
    """Meta's `<function=...>` instructions: each tool as one line of JSON (parameters' keys sorted)."""
    lines = ["You have access to the following functions:\n"]
    for t in tools:
        spec = json.dumps(t.parameters, sort_keys=True)
        lines.append(f"Use the function '{t.name}' to '{t.description}':\n"
                     f'{{"name": {json.dumps(t.name)}, "description": {json.dumps(t.description)}, "parameters": {spec}}}\n')
    lines.append("Think very carefully before calling functions.\n"
                 "If you choose to call a function ONLY reply in the following format with no prefix or suffix:\n\n"
                 '<function=example_function_name>{"example_name": "example_value"}</function>\n\n'
                 "Reminder:\n"
                 "- If looking for real time information use relevant functions before falling back to brave_search\n"
                 "- Function calls MUST follow the specified format, start with <function= and end with </function>\n"
                 "- Required parameters MUST be specified\n"
                 "- Only call one function at a time\n"
                 "- Put the entire function call reply on one line")
    return "\n".join(lines)


def call_text(name: str, arguments: dict, tool_prompt_format: str) -> tuple[bool, str]:
    """(python_tag?, text) of a call as the model writes it in Meta's examples. The examples put
    <|python_tag|> before every built-in and JSON call (llama-models' chat_format.py adds it for
    code_interpreter only): we follow the examples."""
    if name == "code_interpreter":
        return True, str(arguments.get("code", ""))
    if name in BUILTIN_TOOLS:
        return True, f"{name}.call({', '.join(f'{k}={_quoted(v)}' for k, v in arguments.items())})"
    if tool_prompt_format == "function_tag":
        return False, f"<function={name}>{json.dumps(arguments)}</function>"
    return True, json.dumps({"type": "function", "name": name, "parameters": arguments}, indent=4)


def _quoted(value) -> str:
    return f'"{value}"' if isinstance(value, str) else json.dumps(value)


# ---------------------------------------------------------------------------- messages in two shapes


def tool_calls_of(message: dict, where: str) -> list[tuple[str, str, dict]]:
    """An assistant message's calls as (id, name, arguments dict), from OpenAI's shape ({"id", "type":
    "function", "function": {"name", "arguments": a JSON string}}) or Meta's ({"call_id", "tool_name",
    "arguments": a dict})."""
    calls = message.get("tool_calls") or []
    if not isinstance(calls, list):
        raise ArgumentError(f"{where}.tool_calls is a {type(calls).__name__}: it must be a list")
    out = []
    for i, call in enumerate(calls):
        here = f"{where}.tool_calls[{i}]"
        if not isinstance(call, dict):
            raise ArgumentError(f"{here} is a {type(call).__name__}: a tool call is a dict")
        if "function" in call:
            function = call["function"] if isinstance(call["function"], dict) else {}
            name, arguments, call_id = function.get("name"), function.get("arguments", "{}"), call.get("id", "")
        else:
            name, arguments, call_id = call.get("tool_name"), call.get("arguments", {}), call.get("call_id", "")
        if not isinstance(name, str) or not name:
            raise ArgumentError(f"{here} has no function name: give function.name (OpenAI) or tool_name (Meta)")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError as e:
                raise ArgumentError(f"{here}'s arguments are not JSON ({e.msg}): pass a JSON object string") from None
        if not isinstance(arguments, dict):
            raise ArgumentError(f"{here}'s arguments are a {type(arguments).__name__}: they must be a JSON object")
        out.append((str(call_id), name, arguments))
    return out


def openai_tool_call(name: str, arguments: dict) -> dict:
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": json.dumps(arguments)}}


# ---------------------------------------------------------------------------- reading calls back


def parse_tool_call(content: str, python_tag: bool) -> tuple[str, dict] | None:
    """(name, arguments) of the call in a generated message, or None. The rules of llama-models'
    decode_assistant_message: a `<function=...>` call or a JSON object with a name (a built-in
    named this way takes its first argument as the query); else a built-in's `x.call(query="...")`;
    else, after <|python_tag|>, code for the interpreter."""
    call = _custom_call(content)
    if call is not None:
        name, args = call
        if name in BUILTIN_TOOLS and name != "code_interpreter" and args:
            args = {"query": next(iter(args.values()))}
        return name, args
    m = BUILTIN_CALL.search(content)
    if m:
        return m.group("name"), {"query": m.group("query")}
    if python_tag:
        return "code_interpreter", {"code": content}
    return None


def _custom_call(content: str) -> tuple[str, dict] | None:
    m = FUNCTION_TAG_CALL.search(content)
    if m:
        try:
            args = json.loads(m.group("args").replace("'", '"'))
        except json.JSONDecodeError:
            return None
        return (m.group("name"), args) if isinstance(args, dict) else None
    try:
        obj = json.loads(content)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("parameters", obj.get("arguments", {}))
    if isinstance(args, str):  # some models write the arguments as a JSON string, like OpenAI's API
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    return (obj["name"], args) if isinstance(args, dict) else None
