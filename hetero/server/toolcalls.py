"""DeepSeek-V3's tool-call format (its chat template's special tokens): one assistant turn

    <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME
    ```json
    ARGUMENTS
    ```<｜tool▁call▁end｜>            (further calls: "\n" then another <｜tool▁call▁begin｜>...)
    <｜tool▁calls▁end｜>

and a tool's answer in the next turn:
    <｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>CONTENT<｜tool▁output▁end｜><｜tool▁outputs▁end｜>
"""

from __future__ import annotations

CALLS_BEGIN = "<｜tool▁calls▁begin｜>"
CALLS_END = "<｜tool▁calls▁end｜>"
CALL_BEGIN = "<｜tool▁call▁begin｜>"
CALL_END = "<｜tool▁call▁end｜>"
SEP = "<｜tool▁sep｜>"
OUTPUTS_BEGIN = "<｜tool▁outputs▁begin｜>"
OUTPUTS_END = "<｜tool▁outputs▁end｜>"
OUTPUT_BEGIN = "<｜tool▁output▁begin｜>"
OUTPUT_END = "<｜tool▁output▁end｜>"
ARGS_OPEN = "\n```json\n"  # between NAME and ARGUMENTS
ARGS_CLOSE = "\n```"  # between ARGUMENTS and CALL_END
TOKENS = (CALLS_BEGIN, CALLS_END, CALL_BEGIN, CALL_END, SEP,
          OUTPUTS_BEGIN, OUTPUTS_END, OUTPUT_BEGIN, OUTPUT_END)  # fmt: skip
