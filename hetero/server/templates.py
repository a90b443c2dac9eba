"""Chat templates: the checkpoint's own, or ours when it cannot show the model the tools.

DeepSeek-V3's official template renders tool calls and tool outputs but no tool *definitions*
(it never reads `tools`). For such a checkpoint a request with tools is rendered with TOOL_TEMPLATE:
V3's format, with render_tools_system's text (the `tools_text` variable) after the system prompt.
As in V3's template, consecutive tool messages share one OUTPUTS_BEGIN..OUTPUTS_END block and the
assistant turn goes on after it with no new <｜Assistant｜> (nor does the generation prompt add
one). Unlike it, every assistant turn after tool outputs does so, with or without calls, and an
assistant turn with calls after tool outputs closes the outputs block first.
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING

import jinja2
from jinja2 import meta

from hetero.server import reasoning
from hetero.server import toolcalls as tc

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"

# The template's words for the format's strings (so the template text reads as its structure).
_NAMES = {
    "user": USER,
    "assistant": ASSISTANT,
    "eos": tc.EOS,
    "calls_begin": tc.CALLS_BEGIN,
    "calls_end": tc.CALLS_END,
    "call_begin": tc.CALL_BEGIN,
    "call_end": tc.CALL_END,
    "sep": tc.SEP,
    "args_open": tc.ARGS_OPEN,
    "args_close": tc.ARGS_CLOSE,
    "outputs_begin": tc.OUTPUTS_BEGIN,
    "outputs_end": tc.OUTPUTS_END,
    "output_begin": tc.OUTPUT_BEGIN,
    "output_end": tc.OUTPUT_END,
    "think_close": reasoning.CLOSE,
}

_BODY = """
{%- set ns = namespace(system='', after_tool=false) -%}
{%- for m in messages if m['role'] == 'system' -%}
  {%- set ns.system = ns.system + ('\\n\\n' if ns.system else '') + m['content'] -%}
{%- endfor -%}
{%- if tools and tools_text is defined and tools_text -%}
  {%- set ns.system = ns.system + ('\\n\\n' if ns.system else '') + tools_text -%}
{%- endif -%}
{{- bos_token + ns.system -}}
{%- for m in messages if m['role'] != 'system' -%}
  {%- if ns.after_tool and m['role'] != 'tool' -%}{{- outputs_end -}}{%- endif -%}
  {%- if m['role'] == 'user' -%}
    {{- user + m['content'] -}}
  {%- elif m['role'] == 'assistant' -%}
    {%- set content = m.get('content') or '' -%}
    {%- if strip_reasoning and think_close in content -%}
      {%- set content = content.split(think_close)[-1].lstrip('\\n') -%}
    {%- endif -%}
    {{- ('' if ns.after_tool else assistant) + content -}}
    {%- if m.get('tool_calls') -%}
      {{- calls_begin -}}
      {%- for call in m['tool_calls'] -%}
        {{- ('' if loop.first else '\\n') + call_begin + (call.get('type') or 'function') + sep -}}
        {{- call['function']['name'] + args_open + call['function']['arguments'] -}}
        {{- args_close + call_end -}}
      {%- endfor -%}
      {{- calls_end -}}
    {%- endif -%}
    {{- eos -}}
  {%- elif m['role'] == 'tool' -%}
    {{- ('\\n' if ns.after_tool else outputs_begin) + output_begin + m['content'] + output_end -}}
  {%- else -%}
    {{- raise_exception('unknown message role: ' + m['role']) -}}
  {%- endif -%}
  {%- set ns.after_tool = m['role'] == 'tool' -%}
{%- endfor -%}
{%- if ns.after_tool -%}{{- outputs_end -}}{%- endif -%}
{%- if add_generation_prompt and not ns.after_tool -%}{{- generation_prompt -}}{%- endif -%}
"""


def _template(generation_prompt: str, strip_reasoning: bool) -> str:
    values = {**_NAMES, "generation_prompt": generation_prompt, "strip_reasoning": strip_reasoning}
    prelude = "".join(
        f"{{%- set {k} = {json.dumps(v, ensure_ascii=False)} -%}}" for k, v in values.items()
    )
    return prelude + _BODY.strip()


# DeepSeek-V3's format with tools; the caller renders the tools into `tools_text`.
TOOL_TEMPLATE = _template(ASSISTANT, strip_reasoning=False)
# DeepSeek-R1's: the prompt ends inside the reasoning, and past turns lose theirs.
THINK_TEMPLATE = _template(ASSISTANT + reasoning.OPEN + "\n", strip_reasoning=True)


def needs_tool_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    """True when the template the tokenizer uses with tools does not read `tools`."""
    try:
        template = tokenizer.get_chat_template(None, tools=[])
    except ValueError:  # no template at all
        return True
    try:
        env = jinja2.Environment(extensions=["jinja2.ext.loopcontrols"])
        return "tools" not in meta.find_undeclared_variables(env.parse(template))
    except jinja2.TemplateSyntaxError:  # a tag only transformers knows ({% generation %})
        return re.search(r"\btools\b", template) is None


def thinks(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the checkpoint's template starts the reply inside a reasoning block (R1's)."""
    try:
        prompt = render_chat(tokenizer, [{"role": "user", "content": "hi"}])
    except ValueError:
        return False
    return reasoning.prompt_starts_reasoning(prompt)


def render_chat(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict],
    tools: list[dict] | None = None,
    add_generation_prompt: bool = True,
) -> str:
    """The prompt text of OpenAI chat messages (converted by chat_messages_for_template), with
    the checkpoint's template or, for tools it cannot show, TOOL_TEMPLATE. A conversation the
    template cannot render raises ValueError."""
    kwargs = {}
    if tools:
        kwargs = {"tools": tools, "tools_text": tc.render_tools_system(tools)}
        if needs_tool_template(tokenizer):
            kwargs["chat_template"] = TOOL_TEMPLATE
    try:
        return tokenizer.apply_chat_template(
            tc.chat_messages_for_template(messages),
            add_generation_prompt=add_generation_prompt,
            tokenize=False,
            **kwargs,
        )
    except (jinja2.TemplateError, TypeError, KeyError) as e:
        raise ValueError(f"the chat template cannot render these messages: {e}") from e
